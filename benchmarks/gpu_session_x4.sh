#!/usr/bin/env bash
# The open GPU measurements on one 4-GPU host, in two calls of under 10 minutes each.
#   OUT=dir bash benchmarks/gpu_session_x4.sh parallel   # 4 independent lanes, one GPU each
#   OUT=dir bash benchmarks/gpu_session_x4.sh scaling    # quantizer on 1, 2, 4 GPUs (idle host), 33 B on 4
# Lanes of `parallel` (each step has its own time limit and log; a failing step does not stop
# the next): GPU 0 the GPU tests, then the GEMM datapaths; GPU 1 the FLUX step; GPU 2 the 33 B
# source, then the 33 B model from disk on one GPU; GPU 3 every layer kind vs bf16 (eager and
# CUDA graphs). Timings of one lane are not disturbed by the others' GPUs, but they share the
# host's CPUs: the GEMM/layer timings are GPU-bound, the quantizer's are checked in `scaling`.
set -u
OUT=${OUT:-/tmp/svdq-x4}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
Q32=${Q32:-/tmp/q32b}
status() { echo "$(date +%T) $*" | tee -a "$OUT/status.txt"; }
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader > "$OUT/gpus.txt"
case ${1:-parallel} in
parallel)
  ( export CUDA_VISIBLE_DEVICES=0
    timeout 270 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels_gpu.py tests/test_device_read.py \
      tests/test_quantize_streaming.py > "$OUT/pytest_gpu.log" 2>&1; status "tests rc=$?"
    timeout 150 python3 benchmarks/gemm_datapaths.py --out "$OUT/gemm_datapaths.json" > "$OUT/gemm.log" 2>&1
    status "gemm rc=$?"
    timeout 110 python3 benchmarks/gemm_datapaths.py --graphs --ms 1,16,64 --datapaths f16t,fp8t,f16s \
      --out "$OUT/gemm_small_m_graphs.json" > "$OUT/gemm_graphs.log" 2>&1; status "gemm graphs rc=$?" ) &
  ( export CUDA_VISIBLE_DEVICES=1
    SVDQ_EXPERIMENTAL_KERNELS=1 timeout 560 python3 benchmarks/flux_step.py --compile --compile-mode default --fast \
      --out "$OUT/flux_step.json" > "$OUT/flux_step.log" 2>&1; status "flux step rc=$?" ) &
  ( export CUDA_VISIBLE_DEVICES=2
    if [ ! -f "$Q32/src/diffusion_pytorch_model.safetensors.index.json" ]; then
      timeout 230 python3 benchmarks/quantize_32b.py --workdir "$Q32" --write-only > "$OUT/q32b_write.log" 2>&1
      status "q32b write rc=$?"
    fi
    timeout 330 python3 benchmarks/quantize_32b.py --src "$Q32/src" --workdir "$Q32" --out "$OUT/q32b1" --fast \
      --samples 4 > "$OUT/q32b1.log" 2>&1; status "q32b 1 GPU rc=$?" ) &
  ( export CUDA_VISIBLE_DEVICES=3
    SVDQ_EXPERIMENTAL_KERNELS=1 timeout 300 python3 benchmarks/linear_modes.py --out "$OUT/linear_modes.json" \
      > "$OUT/linear_modes.log" 2>&1; status "linear modes rc=$?"
    SVDQ_EXPERIMENTAL_KERNELS=1 timeout 200 python3 benchmarks/linear_modes.py --graphs --ms 1,7,16,64,256 \
      --out "$OUT/linear_modes_graphs.json" > "$OUT/linear_modes_graphs.log" 2>&1; status "linear modes graphs rc=$?" ) &
  wait ;;
scaling)
  D=benchmarks/quantize_flux_dist.py
  timeout 200 python3 $D --device cuda --out "$OUT/d1" > "$OUT/d1.log" 2>&1; status "d1 rc=$?"
  timeout 150 torchrun --nproc_per_node 2 $D --device cuda --out "$OUT/d2" --baseline "$OUT/d1/quantize_flux_dist.json" \
    > "$OUT/d2.log" 2>&1; status "d2 rc=$?"
  timeout 120 torchrun --nproc_per_node 4 $D --device cuda --out "$OUT/d4" --baseline "$OUT/d1/quantize_flux_dist.json" \
    > "$OUT/d4.log" 2>&1; status "d4 rc=$?"
  if [ -f "$Q32/src/diffusion_pytorch_model.safetensors.index.json" ]; then
    timeout 170 python3 benchmarks/quantize_32b.py --src "$Q32/src" --workdir "$Q32" --out "$OUT/q32b4" --fast \
      --samples 4 --gpus 4 > "$OUT/q32b4.log" 2>&1; status "q32b 4 GPUs rc=$?"
  fi ;;
*) echo "unknown step $1" ;;
esac
grep -h "rc=" "$OUT/status.txt" | tail -12
