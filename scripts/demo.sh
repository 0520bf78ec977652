#!/usr/bin/env bash
# The main job end to end on embedded defaults. Idempotent: a second run redoes it in place.
#
# Today (what has landed): generate paired site logs in MuJoCo (base site and a shifted site),
# extract 3D flow from RGB-D the way a real robot's logs would need it, score it against the
# simulator's ground truth, and inspect / validate / fingerprint the logs. Backbone pretraining,
# finetune, audit and promotion join this script as they land.
set -euo pipefail
OUT=${DEMO_OUT:-$PWD/demo_out}
export DYNAFLIP_HOME=${DYNAFLIP_HOME:-$OUT/home}
EPISODES=${DEMO_EPISODES:-12}
mkdir -p "$OUT/logs"
da() { dynaflip-adapt "$@"; }

echo "==> where the registry lives"
da store info

echo "==> site logs: base site and a shifted site (same episode seeds: paired)"
da sim generate "$OUT/logs/base.h5" --site base -n "$EPISODES" --seed 0 --export robomimic
da sim generate "$OUT/logs/night_shift.h5" --site night_shift -n "$EPISODES" --seed 0

echo "==> what the logs hold"
da data inspect "$OUT/logs"
da data validate "$OUT/logs"
da data fingerprint "$OUT/logs/night_shift.h5"

echo "==> 3D flow from RGB-D (OpenCV DIS + kornia), scored against the simulator's ground truth"
da flow extract "$OUT/logs/night_shift.h5" --overwrite
da flow eval "$OUT/logs/night_shift.h5"
da flow extract "$OUT/logs/night_shift.h5" --stride 4 --overwrite
da flow eval "$OUT/logs/night_shift.h5" --source dis_s4 --reference ground_truth_s4

echo "==> recipes for the next steps (pretrain / finetune)"
da recipes list
echo "demo done: logs in $OUT/logs, registry home $DYNAFLIP_HOME"
