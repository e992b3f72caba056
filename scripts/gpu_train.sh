#!/usr/bin/env bash
# Train an RDCD student on a GPU machine inside one time-boxed run, and bring the checkpoint back.
#
#   bash scripts/gpu_train.sh                 # on the GPU machine, from the repository root
#
# The run folder ($OUT/run: checkpoint.pt, log.csv, config.json, model.pt when finished) is what
# comes back; on a CPU machine continue the same run with
#
#   rdcd train <the same settings> --output RUN --resume        # (config.json's "argv" has them)
#
# or run this script again on the next GPU slot with RESUME=RUN (the folder copied back).
# Everything is a setting of the environment:
#   OUT (default out), BUDGET seconds of training (480: a 9-minute slot less start-up and checkpoint),
#   STEPS (total schedule, default 20000), BATCH (per process, 128), WORKERS (data processes, 12),
#   DATA (image list; default: the training pool without the held-out slice, made here),
#   TEACHER (sscd), STUDENT (tf_efficientnet_lite0), DIM (128), SIZE (160),
#   WHEELS (a folder of wheels to install first where packages are missing), EXTRA (more rdcd train options).
# The SSCD teacher is an int8 ONNX file: it runs in ONNX Runtime on the CPU cores, inside the data
# workers (--teacher-in-workers), while the student trains on the GPU.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-out}
BUDGET=${BUDGET:-480}
STEPS=${STEPS:-20000}
BATCH=${BATCH:-128}
WORKERS=${WORKERS:-12}
TEACHER=${TEACHER:-sscd}
STUDENT=${STUDENT:-tf_efficientnet_lite0}
DIM=${DIM:-128}
SIZE=${SIZE:-160}
EXTRA=${EXTRA:-}

if ! python -c "import rdcd" 2>/dev/null; then
    if [ -n "${WHEELS:-}" ]; then
        python -m pip install --no-index --find-links "$WHEELS" -e ".[dev]"
    else
        python -m pip install -e ".[dev]"
    fi
fi

if [ -z "${DATA:-}" ]; then
    python scripts/split_pool.py --pool ../shared/data/train --output "$OUT/split" >/dev/null
    DATA="$OUT/split/train.txt"
fi

RUN="$OUT/run"
mkdir -p "$OUT"
if [ -n "${RESUME:-}" ] && [ "$RESUME" != "$RUN" ]; then
    cp -r "$RESUME" "$RUN"
fi
resume=()
[ -f "$RUN/checkpoint.pt" ] && resume=(--resume)

# shellcheck disable=SC2086  # EXTRA is a list of options
OMP_WAIT_POLICY=PASSIVE rdcd train --data "$DATA" --teacher "$TEACHER" --student "$STUDENT" --pretrained \
    --dim "$DIM" --size "$SIZE" --eval-size "$SIZE" --batch-size "$BATCH" --steps "$STEPS" \
    --head-init pcaw --feature-norm --bn frozen --queue-size 16384 \
    --workers "$WORKERS" --teacher-in-workers --log-every 20 --checkpoint-every 500 --no-tensorboard \
    --max-seconds "$BUDGET" --output "$RUN" "${resume[@]}" $EXTRA
ls -la "$RUN"
