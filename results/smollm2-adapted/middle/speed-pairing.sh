#!/bin/bash
# Speed pairing: dense full fine-tune against LoRA distillation from the teacher's top 64 on q, o, gate, up, down of
# layers L-29 (nothing below L trains, so the backward stops at L), for L = 6, 9, 12 and 17; STEPS steps each
# (default 40: the dense run's first steps are slow and uneven, so 8 steps flatter the LoRA runs).
# The map is the same for every L (consumers 17 and up): which layers read whose K/V barely moves the step's time;
# where the backward stops does.
cd "$(dirname "$0")/../../.."  # the repository root
COMMON="--init_from=data/smollm2/smollm2-135m-instruct.pt --dataset=data/shakespeare_smollm2 --batch_size=4 --block_size=256 --dtype=bfloat16 --compile=False --max_iters=${STEPS:-40} --eval_interval=1000 --eval_iters=1 --log_interval=1 --seed=1337 --threads=2 --overwrite=True --always_save_checkpoint=False"
UPPER=0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,0,0,19,0,21,0,0,24,25,0,27,12,0
KL="--adapt_target=$UPPER --adapt_mode=abrupt --lora_rank=32 --lora_alpha=64 --learning_rate=1e-3 --weight_decay=0.0 --distill_teacher=data/smollm2/smollm2-135m-instruct.pt --distill_alpha=1.0"
O=out-middle-pairing-${STEPS:-40}; mkdir -p $O
from() { seq -s, "$1" 29; }
run() { name=$1; shift; .venv/bin/python train.py $COMMON "$@" --out_dir=$O/out-$name > $O/$name.$ROUND.log 2>&1; echo "$name round $ROUND: $(grep -E 'on average' $O/$name.$ROUND.log | tail -1); median step $(grep -oE '[0-9.]+ ms/iter' $O/$name.$ROUND.log | tail -n +2 | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}') ms"; }
ROUND=0; run make-top64 $KL --lora_targets=q,o,gate,up,down --distill_cache=$O/top64.pt
for ROUND in 1 2; do
  run dense --learning_rate=1e-5 --min_lr=1e-6
  for L in 6 9 12 17; do
    run from$L-top64 $KL --lora_targets=q,o,gate,up,down --lora_layers=$(from $L) --distill_cache=$O/top64.pt
  done
done
