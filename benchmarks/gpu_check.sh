#!/usr/bin/env bash
# GPU checks of the fast path, in one run of a few minutes on a CUDA machine:
#   1. the CUDA tests of tests/test_fast_path.py: golden logits on CUDA in float64 (< 1e-9) and float32
#      (< 1e-4) on both paths, fast and straightforward training steps agreeing in float64, and fp16 AMP
#      (GradScaler) training steps of DFvT-T with finite gradients and a falling loss;
#   2. the benchmark of all three variants in fp32 and under fp16 autocast, then DFvT-T compiled.
# Installs nothing: python (or $PYTHON) must import torch, timm, yacs and numpy (set PYTHONPATH).
# Usage: benchmarks/gpu_check.sh [LOG]   (LOG: file for the whole output; default stdout)
set -uo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] && exec >"$1" 2>&1

status=0
step() {
  echo "== $* ($(date +%T))"
  "$@" || { echo "!! failed: $*"; status=1; }
}

step "${PYTHON:-python}" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible'; \
print('torch', torch.__version__, 'on', torch.cuda.get_device_name())"
step "${PYTHON:-python}" -m pytest -q -rA -p no:cacheprovider tests/test_fast_path.py -k cuda
step "${PYTHON:-python}" benchmarks/benchmark.py --device cuda --variants tiny small base
step "${PYTHON:-python}" benchmarks/benchmark.py --device cuda --amp --variants tiny small base
step "${PYTHON:-python}" benchmarks/benchmark.py --device cuda --amp --compile --variants tiny --no-memory
echo "== done ($(date +%T)), status $status"
exit $status
