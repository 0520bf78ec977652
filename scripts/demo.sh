#!/usr/bin/env bash
# The main job end to end on embedded defaults (sqlite MLflow store under $DYNAFLIP_HOME,
# generated site logs, the shipped backbone). Idempotent: a second run redoes it in place and
# adds new versions to the same registry.
#
#   base site logs -> reference policies on the shipped backbone -> shifted-site logs
#   -> 3D flow check -> finetune a LoRA adapter (held to the pinned policies' own loss on both
#   sites' demonstrations, at the strength the audit accepts) -> attention maps -> audit -> promote
#   -> evaluate on held-out episodes (the gain, offline and in closed loop) -> history -> roll back
#   -> export the merged encoder
set -euo pipefail
OUT=${DEMO_OUT:-$PWD/demo_out}
export DYNAFLIP_HOME=${DYNAFLIP_HOME:-$OUT/home}
EPISODES=${DEMO_EPISODES:-64}
STEPS=${DEMO_STEPS:-300}
SITE=${DEMO_SITE:-night_shift}
mkdir -p "$OUT/logs"
da() { dynaflip-adapt "$@"; }

echo "==> registry: $(da store info --json | python -c 'import json,sys; print(json.load(sys.stdin)["tracking_uri"])')"
da backbones list

echo "==> site logs in MuJoCo: the base site and a shifted site '$SITE'"
da sim generate "$OUT/logs/base.h5" --site base -n "$EPISODES" --seed 100 --overwrite
da sim generate "$OUT/logs/$SITE.h5" --site "$SITE" -n "$EPISODES" --seed 200 --overwrite
echo "==> held-out episodes (never trained on), rendered at both sites from the same seeds"
mkdir -p "$OUT/heldout"
da sim generate "$OUT/heldout/base.h5" --site base -n 12 --seed 300 --overwrite
da sim generate "$OUT/heldout/$SITE.h5" --site "$SITE" -n 12 --seed 300 --overwrite
da data inspect "$OUT/logs"
da data validate "$OUT/logs"

echo "==> 3D flow from RGB-D, scored against the simulator's ground truth"
da flow extract "$OUT/logs/$SITE.h5" --overwrite
da flow eval "$OUT/logs/$SITE.h5"

echo "==> reference policies on frozen base features, pinned to the base backbone:"
echo "    behaviour cloning, a diffusion policy, and a proprio-only control (reads no image)"
da policies train "$OUT/logs/base.h5" --site "$SITE" --name "$SITE-bc" --tolerance 0.25
da policies train "$OUT/logs/base.h5" --site "$SITE" --name "$SITE-diffusion" --head diffusion --tolerance 0.25
da policies train "$OUT/logs/base.h5" --site "$SITE" --name "$SITE-proprio" --head proprio_only --tolerance 0.25

echo "==> finetune a LoRA adapter for the shifted site (recipe finetune/policies): anchors, the frozen"
echo "    teacher on source replay and on the base-site logs the policies were trained on (--retain),"
echo "    and the pinned policies' own loss on the site's and the retained demonstrations;"
echo "    --strength auto scales the update down until the audit passes"
da finetune "$OUT/logs/$SITE.h5" --site "$SITE" --steps "$STEPS" \
  --retain "$OUT/logs/base.h5" --recipe finetune/policies --strength auto
NEW=$(da adapters list --site "$SITE" --json | python -c 'import json,sys; print(json.load(sys.stdin)[0]["version"])')

echo "==> where the base and the adapted encoders attend (attention rollout)"
da inspect "$OUT/logs/$SITE.h5" --adapter "$NEW" --out "$OUT/attention.png" --overwrite

echo "==> audit adapter v$NEW against the policies pinned to '$SITE', then promote"
da audit "$NEW" || true
da promote "$NEW" --site "$SITE" || da promote "$NEW" --site "$SITE" --force --reason "demo: promote despite the audit"

echo "==> the gain: action error on held-out '$SITE' episodes, base encoder vs adapter v$NEW,"
echo "    and on held-out base episodes (retention)"
da eval logs "$OUT/heldout/$SITE.h5" --adapter "$NEW" --base-logs "$OUT/heldout/base.h5" \
  --paired-logs "$OUT/heldout/base.h5" --out "$OUT/eval_logs.json" --overwrite
echo "==> closed loop: does the robot still succeed? Success at both sites, base encoder vs adapter v$NEW,"
echo "    on 20 paired episodes per site (the held-out episodes' scenes), the scripted expert as the ceiling"
da eval rollout --site "$SITE" --site base --policies-of "$SITE" --adapter "$NEW" --episodes 20 --seed 300 \
  --out "$OUT/rollout.json" --overwrite
da history --site "$SITE"

echo "==> roll back (to the previous promotion, if there is one)"
BACK=$(da history --site "$SITE" --json | python -c "import json, sys; print(json.load(sys.stdin)['rollback_to'] or '')")
if [ -n "$BACK" ]; then
  da rollback --site "$SITE" --reason "demo rollback"
else
  echo "(nothing to roll back to yet: the site has one promotion; a second run of the demo adds one)"
fi

echo "==> export the merged image-only encoder (standalone, verified)"
da export "$NEW" --out "$OUT/export" --format torchscript --overwrite
echo
echo "==> summary"
python "$(dirname "$0")/demo_summary.py" "$OUT" "$SITE" "$NEW" "$SECONDS"
echo "logs in $OUT/logs, MLflow store in $DYNAFLIP_HOME (mlflow ui --backend-store-uri sqlite:///$DYNAFLIP_HOME/mlflow.db)"
