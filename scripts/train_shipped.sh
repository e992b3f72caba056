#!/bin/bash
# The training runs behind the shipped models and the ablations (docs/experiments.md).
# Same recipe and step budget for every run; the validation benchmark is made from held-out
# images (scripts/split_pool.py + rdcd make-benchmark), never from devbench.
#   bash scripts/train_shipped.sh [STEPS]        # default 600 steps of 16 images at 160 px
set -euo pipefail
STEPS=${1:-600}
POOL=${POOL:-../shared/data/train}
[ -f runs/split/train.txt ] || python scripts/split_pool.py --pool "$POOL" --output runs/split
[ -d runs/valbench ] || rdcd make-benchmark --images runs/split/holdout.txt --output runs/valbench --seed 7
common=(--data runs/split/train.txt --teacher sscd --student tf_efficientnet_lite0 --pretrained
        --size 160 --eval-size 160 --batch-size 16 --steps "$STEPS" --lr 0.005 --head-lr 0.03
        --bn frozen --head-init teacher --head-init-images 512 --queue-size 4096
        --workers 1 --threads 2 --log-every 10 --checkpoint-every 100
        --val-benchmark runs/valbench --val-every 200)
run() {  # name, extra flags; resumes a run that was interrupted
  local name=$1; shift
  [ -f "runs/$name/model.pt" ] && { echo "runs/$name done"; return; }
  rdcd train "${common[@]}" --output "runs/$name" --resume "$@" >> "runs/$name.out" 2>&1
}
run r128 --dim 128
run r64 --dim 64
run r256 --dim 256
run r128_norel --dim 128 --no-rel
run r128_nohn --dim 128 --no-hn
run r64_norel --dim 64 --no-rel
run r256_norel --dim 256 --no-rel
# does a 3x longer schedule help? (chosen or not on valbench, docs/experiments.md)
run r128_long --dim 128 --steps 1800 --val-every 600
run r256_long --dim 256 --steps 1800 --val-every 600
# the 64-d model on the same longer schedule
run r64_long --dim 64 --steps 1800 --val-every 600
# a second seed of the 128-d and 256-d L_rel ablations (same 600-step budget; docs/experiments.md)
run r128_s1 --dim 128 --seed 1
run r128_norel_s1 --dim 128 --no-rel --seed 1
run r256_s1 --dim 256 --seed 1
run r256_norel_s1 --dim 256 --no-rel --seed 1
