#!/usr/bin/env bash
# Reproduces the backbone shipped in dynaflip_adapt/assets/backbone:
#   generated simulator logs from the base site and 24 random sites x 24 episodes (appearance and
#   camera-pose diversity: 8 sites were too few; episodes per site: docs/results/2026-11-backbone.md "The
#   backbone"), then `pretrain --recipe pretrain/small` (2400 steps, one site per batch).
# About 43 minutes on 2 CPU cores (logs ~5, pretraining ~38); deterministic (same fingerprint)
# with the simulator it was made with (0.2.0): later simulators record other logs (CHANGELOG),
# so the same command now trains another backbone.
# Usage: scripts/make_shipped_backbone.sh [WORKDIR [PRETRAIN OPTIONS]]
# Other backbones the same way: SITES, EPISODES, RECIPE (default pretrain/small) and EXPORT
# (default: the shipped bundle's folder) from the environment.
set -euo pipefail
WORK=${1:-$PWD/shipped_backbone_work}
shift || true
SITES=${SITES:-24}
EPISODES=${EPISODES:-24}
RECIPE=${RECIPE:-pretrain/small}
EXPORT=${EXPORT:-dynaflip_adapt/assets/backbone}
mkdir -p "$WORK/logs"
export DYNAFLIP_HOME=${DYNAFLIP_HOME:-$WORK/home}
dynaflip-adapt sim generate "$WORK/logs/base.h5" --site base -n "$EPISODES" --seed 1000 --workers 2
for s in $(seq 1 "$SITES"); do
  [ -f "$WORK/logs/site_$s.h5" ] || \
    dynaflip-adapt sim generate "$WORK/logs/site_$s.h5" --site random --site-seed "$s" -n "$EPISODES" --seed "$s" --workers 2
done
dynaflip-adapt pretrain "$WORK/logs" --recipe "$RECIPE" --seed 0 --workdir "$WORK/run" \
  --export-bundle "$EXPORT" --overwrite "$@"
