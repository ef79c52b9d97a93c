#!/bin/bash
# Speed pairing at STEPS steps (default 40): dense full fine-tune against the shipped set (LoRA r32 on every linear of
# every layer, the shipped map) and the set on layers 12-29 (q, o, gate, up, down; the searched map of consumers 12 and
# up), each with the teacher at every step and from its top 64.
cd "$(dirname "$0")/../../.."  # the repository root
COMMON="--init_from=data/smollm2/smollm2-135m-instruct.pt --dataset=data/shakespeare_smollm2 --batch_size=4 --block_size=256 --dtype=bfloat16 --compile=False --max_iters=${STEPS:-40} --eval_interval=1000 --eval_iters=1 --log_interval=1 --seed=1337 --threads=2 --overwrite=True --always_save_checkpoint=False"
SHIPPED=0,1,2,3,4,5,0,0,8,0,10,11,12,13,14,15,16,0,18,19,20,21,0,23,24,25,0,27,12,0
MIDDLE=0,1,2,3,4,5,6,7,8,9,10,11,12,13,0,15,16,0,18,19,0,21,0,23,24,0,0,27,12,0
KL="--adapt_mode=abrupt --lora_rank=32 --lora_alpha=64 --learning_rate=1e-3 --weight_decay=0.0 --distill_teacher=data/smollm2/smollm2-135m-instruct.pt --distill_alpha=1.0"
ALL="--adapt_target=$SHIPPED --lora_targets=q,k,v,o,gate,up,down $KL"
MID="--adapt_target=$MIDDLE --lora_targets=q,o,gate,up,down --lora_layers=$(seq -s, 12 29) $KL"
O=out-shipped-pairing-${STEPS:-40}; mkdir -p $O
run() { name=$1; shift; .venv/bin/python train.py $COMMON "$@" --out_dir=$O/out-$name > $O/$name.$ROUND.log 2>&1; echo "$name round $ROUND: $(grep -E 'on average' $O/$name.$ROUND.log | tail -1); median step $(grep -oE '[0-9.]+ ms/iter' $O/$name.$ROUND.log | tail -n +2 | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}') ms"; }
ROUND=0; run make-top64 $ALL --distill_cache=$O/top64.pt
for ROUND in 1 2; do
  run dense --learning_rate=1e-5 --min_lr=1e-6
  run all-teacher $ALL
  run all-top64 $ALL --distill_cache=$O/top64.pt
  run from12-teacher $MID
  run from12-top64 $MID --distill_cache=$O/top64.pt
done
