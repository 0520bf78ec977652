#!/usr/bin/env bash
# Set-up and entry points. Creates/reuses a virtual environment and installs what it needs.
#
#   ./run.sh demo    the main job end to end on embedded defaults (sqlite MLflow store under
#                    $DYNAFLIP_HOME, default ./demo_out/home; generated site logs)
#   ./run.sh test    lint (ruff), types (mypy) and the whole test suite (pytest)
#   ./run.sh bench   the benchmarks (ratios measured side by side)
#
# Environment: VENV (default .venv), PYTHON (default python3), DEMO_OUT (default ./demo_out).
set -euo pipefail
cd "$(dirname "$0")"

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_VERSION=2.13.0

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    echo "==> creating virtual environment $VENV"
    "$PYTHON" -m venv "$VENV"
  fi
  local py="$VENV/bin/python"
  # torch first, pinned: an unpinned torch (or a dependency asking for one) pulls a multi-GB
  # CUDA build; this version's CPU wheel is what these machines have locally.
  if ! "$py" -c "import torch" >/dev/null 2>&1; then
    echo "==> installing torch==$TORCH_VERSION"
    "$py" -m pip install -q --disable-pip-version-check "torch==$TORCH_VERSION"
  fi
  # Reinstall only when pyproject.toml changed since the last install.
  local stamp="$VENV/.dynaflip-installed"
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "==> installing dynaflip-adapt and its dependencies"
    "$py" -m pip install -q --disable-pip-version-check -e ".[dev,sim,export,plots,server]"
    touch "$stamp"
  fi
  export PATH="$PWD/$VENV/bin:$PATH"
}

cmd=${1:-}
shift || true
case "$cmd" in
  test)
    setup
    echo "==> ruff"
    ruff check dynaflip_adapt tests benchmarks
    ruff format --check dynaflip_adapt tests benchmarks
    echo "==> mypy"
    mypy
    echo "==> pytest"
    python -m pytest "$@"
    ;;
  demo)
    setup
    bash scripts/demo.sh "$@"
    ;;
  bench)
    setup
    python benchmarks/bench_cli_startup.py
    python benchmarks/bench_data.py
    python benchmarks/bench_sim.py
    python benchmarks/bench_rollout.py
    python benchmarks/bench_flow.py
    python benchmarks/bench_pretrain.py
    python benchmarks/bench_finetune.py
    python benchmarks/bench_export.py
    ;;
  *)
    echo "usage: ./run.sh {demo|test|bench} [args...]" >&2
    exit 2
    ;;
esac
