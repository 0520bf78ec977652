#!/usr/bin/env bash
# The main job end to end on embedded defaults. Idempotent: a second run reuses what exists.
set -euo pipefail
OUT=${DEMO_OUT:-$PWD/demo_out}
export DYNAFLIP_HOME=${DYNAFLIP_HOME:-$OUT/home}
mkdir -p "$OUT"
da() { dynaflip-adapt "$@"; }

echo "==> store"
da store info
echo "==> recipes"
da recipes list
da recipes validate $(da recipes list --json | python -c "import json,sys; print(' '.join(r['name'] for r in json.load(sys.stdin)))")
