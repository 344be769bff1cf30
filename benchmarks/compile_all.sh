#!/usr/bin/env bash
# Compile every kernel configuration the launchers pick with another Triton version (default 3.6.0,
# the one on common GPU images: vLLM / NGC PyTorch containers), offline for sm_90, in its own venv,
# and write the `fastppo inspect` rows as JSON. No GPU needed.
#
#   benchmarks/compile_all.sh                       # Triton 3.6.0 -> benchmarks/results/inspect-triton3.6.0-sm_90.json
#   TRITON_VERSION=3.4.0 benchmarks/compile_all.sh out.json
#   VENV=/path/to/venv benchmarks/compile_all.sh    # reuse a venv (installs only what is missing)
#   INSPECT_ARGS="--target sm_90,sm_80" benchmarks/compile_all.sh
#
# Exit status: that of `fastppo inspect` (1 if any configuration failed to compile).
set -euo pipefail

TRITON_VERSION=${TRITON_VERSION:-3.6.0}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${VENV:-$ROOT/.venv-triton$TRITON_VERSION}
OUT=${1:-$ROOT/benchmarks/results/inspect-triton$TRITON_VERSION-sm_90.json}
PY=$VENV/bin/python

if [ ! -x "$PY" ]; then
    python3 -m venv "$VENV"
    "$PY" -m pip install -q --upgrade pip
fi
have() { "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('$1') != '$2')" 2>/dev/null; }
# The CPU build of torch: no CUDA packages (on a machine with CUDA, any torch works for inspect).
have torch "$TORCH_VERSION" || have torch "$TORCH_VERSION+cpu" ||
    "$PY" -m pip install -q "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu ||
    "$PY" -m pip install -q "torch==$TORCH_VERSION"
have triton "$TRITON_VERSION" || "$PY" -m pip install -q "triton==$TRITON_VERSION" "numpy<2.4"
# fastppo itself from this checkout; inspect needs torch and triton only.
"$PY" - <<PYEOF || "$PY" -m pip install -q --no-deps -e "$ROOT"
import fastppo.kernels, os, sys
sys.exit(os.path.realpath(os.path.dirname(fastppo.kernels.__file__)) != os.path.realpath("$ROOT/kernels"))
PYEOF

mkdir -p "$(dirname "$OUT")"
cd "$ROOT"
env -u TRITON_INTERPRET "$PY" -m fastppo.inspect --all-configs --json "$OUT" ${INSPECT_ARGS:-}
