#!/usr/bin/env bash
# The checks to run when a GPU machine is at hand (docs/bench.md, "On a GPU"; docs/training.md, FSDP2):
#   train  a few steps of train.py config/train_tinyllama_shared.py under torchrun (one rank), compiled, with DDP
#          and with FSDP2 (--fsdp=True) side by side: do they train, evaluate and checkpoint? (~3.5 min on an H200)
#   bench  then alone: bench.py --preset tinyllama --dtype bf16 --compile --reference hf, the timings (~7 min)
# Data: data/shakespeare (GPT-2 BPE; `python data/shakespeare/prepare.py` first: tinystories needs a download).
#
#   PY=python3 bash experiments/gpu_checks.sh                  # long: ~11 min on an H200, most of it compiling
#   PY=python3 STEPS=bench OUT=out-gpu bash experiments/gpu_checks.sh   # long: one step only (~7 min)
#
# Each step's whole log goes to $OUT/<step>.log; the last lines of each are printed at the end.
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-out-gpu}
SCRATCH=${SCRATCH:-$(mktemp -d)}  # checkpoints of the train steps (~13 GB each): not kept
mkdir -p "$OUT"; : >"$OUT/status.txt"
export PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)" |
    tee -a "$OUT/gpu.txt"

# a few steps: 4 micro-steps of 4 x 2048 tokens a step, 6 steps, one evaluation (and checkpoint) at the end
TRAIN=(config/train_tinyllama_shared.py --dataset=shakespeare --batch_size=4 --gradient_accumulation_steps=4
       --max_iters=6 --warmup_iters=2 --eval_interval=6 --eval_iters=4 --log_interval=1)
run_train() {  # run_train NAME ARGS...: one rank under torchrun, its log in $OUT/NAME.log
    local name=$1; shift
    timeout "${TRAIN_TIMEOUT:-200}" $PY -m torch.distributed.run --standalone --nproc_per_node=1 --master_port="$1" \
        train.py "${TRAIN[@]}" "${@:2}" >"$OUT/$name.log" 2>&1
    echo "$name: exit $?" >>"$OUT/status.txt"
}
STEPS=${STEPS:-train bench}
t0=$SECONDS
[[ $STEPS == *train* ]] && {
run_train train_ddp 29511 --out_dir="$SCRATCH/ddp" &
run_train train_fsdp 29512 --out_dir="$SCRATCH/fsdp" --fsdp=True &
wait
echo "train checks: $((SECONDS - t0)) s" >>"$OUT/status.txt"
rm -rf "$SCRATCH/ddp" "$SCRATCH/fsdp"
}

t0=$SECONDS
[[ $STEPS == *bench* ]] && {
timeout "${BENCH_TIMEOUT:-480}" $PY bench.py --preset tinyllama --dtype bf16 --compile --reference hf \
    --repeats="${REPEATS:-3}" --out="$OUT/bench-tinyllama.json" >"$OUT/bench.log" 2>&1
echo "bench: exit $? in $((SECONDS - t0)) s" >>"$OUT/status.txt"
}

for f in train_ddp train_fsdp bench; do [ -f "$OUT/$f.log" ] && { echo "=== $f"; tail -n "${TAIL:-25}" "$OUT/$f.log"; }; done
cat "$OUT/status.txt"
