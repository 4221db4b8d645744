#!/usr/bin/env bash
# One GPU session: prebuild the CUTLASS kernels (first-use compile time), run the GPU tests,
# reload the cache from a second process (cached-load time), run benchmarks/linear.py.
# Usage (repo root, on the H100): OUT=/some/dir [SKIP_BUILD=1] bash benchmarks/gpu_check.sh
set -u
OUT=${OUT:-/tmp/svdq-gpu}; mkdir -p "$OUT"
export SVDQ_KERNEL_CACHE=${SVDQ_KERNEL_CACHE:-/tmp/svdq-kcache} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c "import torch,triton;print(torch.__version__,torch.version.cuda,triton.__version__,torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"
[ -n "${SKIP_BUILD:-}" ] && echo "build skipped" > "$OUT/build.log" || ( t0=$(date +%s); python3 -m svdq_format.cli kernels build -v > "$OUT/build.log" 2>&1; echo "build rc=$? wall=$(( $(date +%s) - t0 )) s" >> "$OUT/build.log" ) &
BUILD=$!
python3 benchmarks/gemm_datapaths.py --out "$OUT/gemm_datapaths.json" 2>&1 | tee "$OUT/gemm_datapaths.log"
python3 -m pytest -q -p no:cacheprovider tests/test_kernels_gpu.py tests/test_kernels_dispatch.py 2>&1 | tee "$OUT/pytest.log" | tail -25
wait $BUILD; tail -4 "$OUT/build.log"
[ -n "${SKIP_BUILD:-}" ] || python3 - <<'PY' 2>&1 | tee -a "$OUT/build.log"
import time, torch
t0 = time.perf_counter()
from svdq_kernels.build import load_kernel, build_kernel
from svdq_kernels.configs import DEFAULT_CONFIGS
for c in DEFAULT_CONFIGS:
    r = build_kernel(c); op = load_kernel(c)
    print(c.name, "cached" if r.cached else "BUILT", f"load+import {time.perf_counter()-t0:.2f} s")
PY
python3 benchmarks/linear.py --out "$OUT/linear.json" 2>&1 | tee "$OUT/bench.log"
