#!/usr/bin/env bash
# One GPU session's worth of checks (device time is scarce: under 5 minutes on an H200).
# Run from the repository root on the GPU machine:
#     bash benchmarks/gpu_check.sh            # results under $OUT (or ./gpu-results)
# It needs numpy and cupy (torch optional; numba, requests and pytest are not required).
set -uo pipefail
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export NUMRES_HOME="$OUT/home"      # never touch a real cache
{
  echo "== machine"; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import numpy, cupy; print('numpy', numpy.__version__, 'cupy', cupy.__version__)"
  python3 -c "import torch; print('torch', torch.__version__, torch.version.cuda)" || true
  echo "== kernels compile and the backend starts"
  python3 -c "import numres; b = numres.get_backend('cupy'); print('backend', b.name)"
  if python3 -c "import pytest" 2>/dev/null; then
    echo "== gpu tests"
    timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/backends/test_cupy.py
  fi
  echo "== checks and benchmark"
  timeout 240 python3 -m numres.bench_gpu --rounds 5 --json "$OUT/gpu.json"
} 2>&1 | tee "$OUT/gpu_check.log"
