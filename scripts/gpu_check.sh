#!/usr/bin/env bash
# The GPU check of a real-size backbone, in one run (under 10 minutes on one data-centre GPU):
#   a ViT-S/16 checkpoint (CKPT, else random weights under timm's names) imported at 224 px,
#   simulator logs of a base and a shifted site, `finetune` for STEPS steps in PRECISION on
#   DEVICE, `export`, parity of the export against the adapter, and the step's frames/s and
#   achieved FLOP/s (forward + activation-backward FLOPs per frame, the LoRA step's count).
# Usage: scripts/gpu_check.sh [WORKDIR]
# Environment: CKPT (a timm-named .safetensors), ARCH (vit_small_patch16_224), STEPS (200),
#   DEVICE (cuda), PRECISION (bf16), BATCH (32), EPISODES (8). A CPU smoke run of the same path:
#   DEVICE=cpu PRECISION=fp32 STEPS=2 BATCH=4 EPISODES=2 scripts/gpu_check.sh /tmp/gpu_check
set -euo pipefail
WORK=${1:-$PWD/gpu_check_work}
ARCH=${ARCH:-vit_small_patch16_224}
STEPS=${STEPS:-200}
DEVICE=${DEVICE:-cuda}
PRECISION=${PRECISION:-bf16}
BATCH=${BATCH:-32}
EPISODES=${EPISODES:-8}
PY=${PYTHON:-python}
CLI=(dynaflip-adapt)
command -v dynaflip-adapt >/dev/null || CLI=("$PY" -m dynaflip_adapt)
mkdir -p "$WORK"
export DYNAFLIP_HOME=${DYNAFLIP_HOME:-$WORK/home}
export MUJOCO_GL=${MUJOCO_GL:-egl}
t0=$(date +%s)

if [ -z "${CKPT:-}" ]; then
  CKPT=$WORK/$ARCH.safetensors
  "$PY" - "$ARCH" "$CKPT" <<'EOF'
import sys, torch
from safetensors.torch import save_file
from dynaflip_adapt.models.vit import TIMM_ARCHS, VisionTransformer
patch, width, depth, heads = TIMM_ARCHS[sys.argv[1]]
torch.manual_seed(0)
vit = VisionTransformer(224, patch, width, depth, heads, 4.0)
save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, sys.argv[2])
EOF
fi
for site in base night_shift; do
  [ -f "$WORK/$site.h5" ] || "${CLI[@]}" sim generate "$WORK/$site.h5" --site "$site" \
    -n "$EPISODES" --size 128 --seed 7 --flow-stride 4 --overwrite >/dev/null
done
"${CLI[@]}" backbones import "$CKPT" --arch "$ARCH" --json > "$WORK/import.json"
BACKBONE=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['backbone']['version'])" "$WORK/import.json")
"${CLI[@]}" finetune "$WORK/night_shift.h5" --site gpu-check -b "$BACKBONE" --retain "$WORK/base.h5" \
  --steps "$STEPS" --device "$DEVICE" --precision "$PRECISION" --set optim.batch_size="$BATCH" \
  --json > "$WORK/finetune.json"
ADAPTER=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['adapter']['version'])" "$WORK/finetune.json")
# --overwrite replaces only a previous export's files (a rerun), never anything else there.
"${CLI[@]}" export "$ADAPTER" --out "$WORK/export" --overwrite --json > "$WORK/export.json"

"$PY" - "$WORK" "$ARCH" "$PRECISION" "$DEVICE" "$(( $(date +%s) - t0 ))" <<'EOF'
import json, sys
from pathlib import Path
import torch
from torch.utils.flop_counter import FlopCounterMode
from dynaflip_adapt.models.vit import TIMM_ARCHS, VisionTransformer

work, arch, precision, device, wall = Path(sys.argv[1]), *sys.argv[2:5], int(sys.argv[5])
ft = json.loads((work / "finetune.json").read_text())
ex = json.loads((work / "export.json").read_text())
patch, width, depth, heads = TIMM_ARCHS[arch]
with FlopCounterMode(display=False) as counter, torch.no_grad():
    VisionTransformer(224, patch, width, depth, heads, 4.0)(torch.zeros(1, 3, 224, 224))
per_frame = 2 * counter.get_total_flops()  # forward + activation backward (frozen weights)
fps = ft["frames_per_second"]
ok = ex["merged_vs_unmerged_max_abs"] < 1e-3 and ex["export_vs_merged_max_abs"] < 1e-3
print(f"{arch} at 224 px on {device} in {precision}: {ft['steps']} steps, {fps:.1f} frames/s, "
      f"{fps * per_frame / 1e12:.2f} TFLOP/s achieved (forward + activation backward)")
print(f"export parity: merged vs unmerged {ex['merged_vs_unmerged_max_abs']:.2e}, "
      f"export vs merged {ex['export_vs_merged_max_abs']:.2e}: {'PASS' if ok else 'FAIL'}")
print(f"wall {wall} s (goal < 600)")
sys.exit(0 if ok else 1)
EOF
