#!/usr/bin/env bash
# One-GPU measurements in one command on one H100 (docs/benchmarks.md). Every step has its own
# time limit and log; a failing step does not stop the next. Usage (repo root, wheels installed
# as the device README says):
#   OUT=/some/dir bash benchmarks/gpu_session.sh [n1] [n2] [next] [tests] [gemm] [step] [fast8] [fast8b] [step8] [p23] [p23b] …
#   (default: next.) After 2026-12-07 the plan is two calls with .whl and .kcache carried: `lr4`
#   (the FLUX step with the fused prologue, the default since then, and with Inductor's quantizer,
#   beside the FP8 peer; ~8 min; `lr2` is the full table with bf16 compiled), then `seg` (the segmented test, its split, fp8_accumulation.py: cuBLAS with and without fast
#   accumulation on the K = 12288 operands; ~5 min).
#   Issue 23 lever 5: `ss` (the pre-converted kernel's tests and timing, ~5 min), measured 2026-12-07 and the
#   default since. `p24` (third session) named the "other" GPU time (rank-0 layers) and `cg` passed.
#   Fourth session: `p30` (the step with the rank-0 fixes, 123.6 ms), `p31` (SS candidates, post-GELU
#   accumulation, rank-0 and shift-bias GPU tests), `p32` (the step with the tuned tilings and
#   PROMOTE_SHIFTED off: 114.0 ms against FP8 97.6; 31 GPU tests). Fifth session: the e4m3 pass's
#   blockings (`fast8_preconverted.py --pass-sweep`), `p35` (the W4A16 GEMV, the prologue's parts, the
#   segmented GPU test). Next: the step with this session's defaults, `p37` (beside FP8, ~5.5 min) or `p34`
#   (the full table with bf16 compiled, ~10 min). A fresh machine needs the kernels in .kcache/kcache.tgz:
#   `svdq kernels build --torch-dir` on the CPU (docs/kernels.md, ~30 min for the 17 defaults), or p29's build.
# `next`: what was written after the last GPU run (small-M split-K and prologue splits): their
# GPU tests, then timings with and without them. (The f16h/fp8h datapaths it also timed were
# removed untimed.)
set -u
OUT=${OUT:-/tmp/svdq-gpu-session}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
STEPS=${*:-next}
# A kernel cache prebuilt elsewhere (`svdq kernels build --torch-dir`, docs/kernels.md), carried as
# .kcache/kcache.tgz: unpacked once into this machine's cache, so no step waits for nvcc.
KC=${SVDQ_KERNEL_CACHE:-$HOME/.cache/svdquant/kernels}
if [ -f .kcache/kcache.tgz ] && [ ! -e "$KC/.unpacked" ]; then
  mkdir -p "$KC" && tar -C "$KC" -xzf .kcache/kcache.tgz && touch "$KC/.unpacked"; fi
build_g64() {  # $1: parallel nvcc jobs; $2: which kernels — all: GROUP64_CONFIGS + the candidates;
               # lut: the auto tilings with and without the table conversion; w4a16: the W4A16
               # kernels; n1: GROUP64_CONFIGS, the plain twins of the auto tilings and W4A16; lr: the auto
               # tilings and their low-rank-k-tile twins; p23: the large-M low-rank tilings, their
               # producer-conversion twins, its candidates and timing probes; ss: the low-rank tilings and
               # the pre-converted kernels (SS_LOWRANK_CONFIGS); step: what the default step runs (the
               # tuned pre-converted kernels, the low-rank tilings, the promoted pair); ssc:
               # SS_LOWRANK_CANDIDATES; else GROUP64_CONFIGS
  python3 -c "import sys; from dataclasses import replace; from svdq_format.cli import main; from svdq_kernels.configs import GROUP64_CONFIGS as G, GROUP64_CANDIDATES as C, AUTO_GROUP64_CONFIGS as A, AUTO_GROUP64_W4A16_CONFIGS as W, AUTO_GROUP64_LR_CONFIGS as R, PRODUCER_CONVERT_CONFIGS as PC, PRODUCER_CONVERT_CANDIDATES as PX, PRODUCER_CONVERT_PROBES as PP, SS_LOWRANK_CONFIGS as S, SS_LOWRANK_CANDIDATES as SC, SS_TUNED_CONFIGS as ST, PROMOTED_GROUP64_CONFIGS as PR; P = tuple(replace(c, lut=False) for c in A); cs = {'all': G + C, 'lut': A + P, 'w4a16': W, 'n1': G + P + W, 'lr': A + R, 'p23': R[:2] + PC + PX + PP, 'ss': R + S, 'step': ST + R + PR, 'ssc': SC}.get(sys.argv[2], G); sys.exit(main(['kernels', 'build', '--jobs', sys.argv[1]] + [a for c in cs for a in ('--config', c.name)]))" "$1" "${2:-}"
}
step_vs_fp8() {  # $1: name, $2: time limit (s), then extra flags: one FLUX.1-dev step of SVDQuant's defaults
                # compiled (reduce-overhead, fused q|k|v) beside the FP8 peer and bf16 eager, GPU time by kind
  local name=$1 limit=$2; shift 2
  timeout "$limit" python3 benchmarks/flux_step.py --fast --mode auto --compile --compile-mode reduce-overhead \
    --fuse-qkv --fp8-peer --no-bf16-compile --no-svdq-eager --profile "$@" \
    --out "$OUT/flux_step_$name.json" > "$OUT/flux_step_$name.log" 2>&1
  echo "step rc=$?"; grep -E "ms/step|by kind|: other |vs FP8|rel err" "$OUT/flux_step_$name.log" | cut -c1-300
}
rank0_tests() {  # $1: time limit (s): the rank-0 GPU tests (low-rank kernels with a zero k-tile, compiled)
  timeout "$1" python3 -m pytest -q -p no:cacheprovider tests/test_kernels_ss_gpu.py tests/test_kernels_fast8_gpu.py \
    -k "rank0" > "$OUT/pytest_rank0.log" 2>&1
  echo "rank0 tests rc=$?"; grep -E "passed|failed|Error|assert" "$OUT/pytest_rank0.log" | tail -8 | cut -c1-300
}
fp8_accumulation() {  # $1: time limit (s): fp8_accumulation.py (post-GELU shifted / unshifted / signed operands)
  timeout "$1" python3 benchmarks/fp8_accumulation.py --out "$OUT/fp8_accumulation_unshifted.json" > "$OUT/fp8_acc.log" 2>&1
  echo "fp8 accumulation rc=$?"; grep -v Warn "$OUT/fp8_acc.log" | tail -14 | cut -c1-250
}
shift_bias_tests() {  # $1: time limit (s): the GELU-shift-in-the-bias GPU tests, their errors printed
  timeout "$1" python3 -m pytest -q -p no:cacheprovider tests/test_fp8_shift_bias_gpu.py -s > "$OUT/pytest_shift_bias.log" 2>&1
  echo "shift-bias tests rc=$?"; grep -E "passed|failed|rel|Error|assert" "$OUT/pytest_shift_bias.log" | tail -14 | cut -c1-250
}
python3 -c "import torch,triton;print(torch.__version__,triton.__version__,torch.cuda.get_device_name())" | tee "$OUT/gpu.txt"
for step in $STEPS; do
  case $step in
    next)
      timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels_gpu.py \
        -k "split_k or datapaths" > "$OUT/pytest_next.log" 2>&1; echo "next tests rc=$?"; tail -3 "$OUT/pytest_next.log"
      timeout 100 python3 benchmarks/gemm_datapaths.py --no-small-m-splits --graphs --ms 1,16,64 --datapaths f16t,fp8t --out "$OUT/sm_base.json" \
        > "$OUT/sm_base.log" 2>&1; echo "small-M base rc=$?"
      timeout 100 python3 benchmarks/gemm_datapaths.py --graphs --ms 1,16,64 \
        --datapaths f16t,fp8t --out "$OUT/sm_split.json" > "$OUT/sm_split.log" 2>&1; echo "small-M split rc=$?"
      paste <(grep -v Warn "$OUT/sm_base.log" | cut -c1-120) <(grep -v Warn "$OUT/sm_split.log" | cut -c60-200) | tail -10 ;;
    tests)  # every GPU test, the experimental exact / W4A16 / nvfp4 kernels included
      timeout 420 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels_gpu.py tests/test_device_read.py \
        tests/test_lora.py tests/test_memory_bounds.py > "$OUT/pytest_gpu.log" 2>&1; echo "tests rc=$?"; tail -3 "$OUT/pytest_gpu.log" ;;
    gemm)   # all datapaths incl. f16s; small M also inside CUDA graphs
      timeout 300 python3 benchmarks/gemm_datapaths.py --out "$OUT/gemm_datapaths.json" > "$OUT/gemm.log" 2>&1
      echo "gemm rc=$?"; grep -v Warn "$OUT/gemm.log" | tail -16
      timeout 200 python3 benchmarks/gemm_datapaths.py --graphs --ms 1,16,64 --out "$OUT/gemm_small_m_graphs.json" > "$OUT/gemm_graphs.log" 2>&1
      echo "gemm graphs rc=$?"; grep -v Warn "$OUT/gemm_graphs.log" | tail -16 ;;
    step)   # one FLUX.1-dev step; the experimental paths on (W4A16 AdaLN layers on the GPU kernels)
      SVDQ_EXPERIMENTAL_KERNELS=1 timeout 540 python3 benchmarks/flux_step.py --compile --fast \
        --out "$OUT/flux_step.json" > "$OUT/flux_step.log" 2>&1; echo "step rc=$?"; tail -8 "$OUT/flux_step.log" ;;
    fast8)  # the fast8 path: prebuild every group-64 kernel (candidates too), its GPU tests, the
            # benchmark with all tilings (stream-K small-M candidates included), a FLUX step
      build_g64 12 all > "$OUT/build.log" 2>&1; echo "build rc=$?"; grep -c "built\|cached" "$OUT/build.log"
      timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_fast8_gpu.py > "$OUT/pytest_fast8.log" 2>&1
      echo "fast8 tests rc=$?"; tail -2 "$OUT/pytest_fast8.log"
      timeout 300 python3 benchmarks/fast8_linear.py --configs all --no-reference --out "$OUT/fast8_linear.json" \
        > "$OUT/fast8_linear.log" 2>&1; echo "fast8 bench rc=$?"; grep -v Warn "$OUT/fast8_linear.log" | tail -10 | cut -c1-400
      timeout 420 python3 benchmarks/flux_step.py --fast --mode fast8 --compile --compile-mode reduce-overhead \
        --no-bf16-compile --out "$OUT/flux_step_fast8.json" > "$OUT/flux_step_fast8.log" 2>&1
      echo "fast8 step rc=$?"; tail -5 "$OUT/flux_step_fast8.log" ;;
    fast8b)  # every group-64 kernel (small-M candidates too) into $SVDQ_KERNEL_CACHE, the fast8 GPU
             # tests (compiled path included), small M in CUDA graphs with every tiling, large M quick
      build_g64 14 all > "$OUT/build.log" 2>&1; echo "build rc=$?"; tail -2 "$OUT/build.log"
      timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_fast8_gpu.py > "$OUT/pytest_fast8.log" 2>&1
      echo "fast8 tests rc=$?"; grep -E "passed|failed|Error" "$OUT/pytest_fast8.log" | tail -4
      timeout 150 python3 benchmarks/fast8_linear.py --shapes small --graphs --configs all --no-reference \
        --out "$OUT/fast8_small_graphs.json" > "$OUT/fast8_small.log" 2>&1; echo "small rc=$?"
      grep -v Warn "$OUT/fast8_small.log" | tail -8 | cut -c1-700
      timeout 120 python3 benchmarks/fast8_linear.py --shapes quick --no-reference --out "$OUT/fast8_quick.json" \
        > "$OUT/fast8_quick.log" 2>&1; echo "quick rc=$?"; grep -v Warn "$OUT/fast8_quick.log" | tail -3 | cut -c1-700 ;;
    step8)   # one FLUX.1-dev step in fast8 mode, eager and compiled, with the GPU time by kernel kind
      build_g64 4 > "$OUT/build.log" 2>&1; echo "build rc=$?"
      timeout 560 python3 benchmarks/flux_step.py --fast --mode fast8 --compile --compile-mode reduce-overhead \
        --no-bf16-compile --profile --out "$OUT/flux_step_fast8.json" > "$OUT/flux_step_fast8.log" 2>&1
      echo "fast8 step rc=$?"; grep -E "ms/step|by kind|quantized" "$OUT/flux_step_fast8.log" ;;
    fast8c)  # the fast8 GPU tests, then the layer benchmark: every shape (default tilings), small M in graphs
      build_g64 6 > "$OUT/build.log" 2>&1; echo "build rc=$?"
      timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_fast8_gpu.py > "$OUT/pytest_fast8.log" 2>&1
      echo "fast8 tests rc=$?"; grep -E "passed|failed|Error" "$OUT/pytest_fast8.log" | tail -4
      timeout 200 python3 benchmarks/fast8_linear.py --out "$OUT/fast8_linear.json" > "$OUT/fast8_linear.log" 2>&1
      echo "bench rc=$?"; grep -v Warn "$OUT/fast8_linear.log" | tail -12 | cut -c1-420
      timeout 90 python3 benchmarks/fast8_linear.py --shapes small --graphs --no-reference --out "$OUT/fast8_small_graphs.json" \
        > "$OUT/fast8_small.log" 2>&1; echo "small rc=$?"; grep -v Warn "$OUT/fast8_small.log" | tail -8 | cut -c1-420 ;;
    smallm)  # Triton only (no CUTLASS build): lowrank_down tilings vs cuBLAS, then the small-M split-K
             # kernels: their GPU tests and CUDA-graph timings without (--no-small-m-splits) and with them
      timeout 150 python3 benchmarks/lowrank_down.py --out "$OUT/lowrank_down.json" > "$OUT/lowrank_down.log" 2>&1
      echo "lowrank_down rc=$?"; grep -v Warn "$OUT/lowrank_down.log" | tail -7
      timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels_gpu.py \
        -k "split_k" > "$OUT/pytest_split_k.log" 2>&1; echo "split-k tests rc=$?"; tail -2 "$OUT/pytest_split_k.log"
      timeout 100 python3 benchmarks/gemm_datapaths.py --no-small-m-splits --graphs --ms 1,16,64 --datapaths f16t,fp8t,f16s \
        --out "$OUT/sm_base.json" > "$OUT/sm_base.log" 2>&1; echo "small-M base rc=$?"
      timeout 100 python3 benchmarks/gemm_datapaths.py --graphs --ms 1,16,64 \
        --datapaths f16t,fp8t,f16s --out "$OUT/sm_split.json" > "$OUT/sm_split.log" 2>&1; echo "small-M split rc=$?"
      paste <(grep -v Warn "$OUT/sm_base.log" | cut -c1-150) <(grep -v Warn "$OUT/sm_split.log" | cut -c40-200) | tail -16 ;;
    step8q)  # the FLUX step as a user gets it: the default `auto` mode, compiled only (bf16 eager as the
             # peer), with the GPU time by kernel kind; first use builds the kernels `auto` needs
      timeout 560 python3 benchmarks/flux_step.py --fast --mode auto --compile --compile-mode reduce-overhead \
        --no-bf16-compile --no-svdq-eager --profile --out "$OUT/flux_step_auto.json" > "$OUT/flux_step_auto.log" 2>&1
      echo "auto step rc=$?"; grep -E "ms/step|by kind|quantized|svdq kernels" "$OUT/flux_step_auto.log" ;;
    lut)  # the table-lookup conversion: same bits as the fp16 one (GPU tests), then both timed
      build_g64 16 lut > "$OUT/build.log" 2>&1; echo "build rc=$?"; tail -2 "$OUT/build.log"
      timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_fast8_gpu.py -k "table_conversion or float64" \
        > "$OUT/pytest_lut.log" 2>&1; echo "lut tests rc=$?"; grep -E "passed|failed|Error" "$OUT/pytest_lut.log" | tail -4
      timeout 200 python3 benchmarks/fast8_linear.py --configs lut --no-reference --out "$OUT/fast8_lut.json" \
        > "$OUT/fast8_lut.log" 2>&1; echo "bench rc=$?"; grep -v Warn "$OUT/fast8_lut.log" | tail -12 | cut -c1-300
      timeout 90 python3 benchmarks/fast8_linear.py --configs lut --shapes small --graphs --no-reference \
        --out "$OUT/fast8_lut_small_graphs.json" > "$OUT/fast8_lut_small.log" 2>&1; echo "small rc=$?" ;;
    w4a16c)  # int4 W4A16 on the CUTLASS group-64 GEMM with fp16 activations (experimental): its
             # kernels, its GPU tests, then it against the Triton W4A16 layer and bf16 in CUDA graphs
      build_g64 8 w4a16 > "$OUT/build_w4a16.log" 2>&1; echo "build rc=$?"; tail -2 "$OUT/build_w4a16.log"
      timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_fast8_gpu.py -k cutlass_w4a16 \
        > "$OUT/pytest_w4a16c.log" 2>&1; echo "w4a16c tests rc=$?"; grep -E "passed|failed|Error" "$OUT/pytest_w4a16c.log" | tail -4
      timeout 150 python3 benchmarks/linear_modes.py --graphs --modes w4a16,w4a16c --ms 1,16,64,256,4608 \
        --out "$OUT/w4a16c_graphs.json" > "$OUT/w4a16c.log" 2>&1; echo "bench rc=$?"; grep -v Warn "$OUT/w4a16c.log" | tail -21 ;;
    step8f)  # step8q with fused q/k/v projections in both models (diffusers' fuse_qkv_projections)
      timeout 560 python3 benchmarks/flux_step.py --fast --mode auto --compile --compile-mode reduce-overhead \
        --no-bf16-compile --no-svdq-eager --fuse-qkv --profile --out "$OUT/flux_step_auto_fused.json" \
        > "$OUT/flux_step_auto_fused.log" 2>&1
      echo "fused step rc=$?"; grep -E "ms/step|by kind|quantized|svdq kernels" "$OUT/flux_step_auto_fused.log"
      timeout 150 python3 benchmarks/fast8_linear.py --shapes qkv --no-reference --out "$OUT/fast8_qkv.json" \
        > "$OUT/fast8_qkv.log" 2>&1; echo "qkv layers rc=$?"; grep -v Warn "$OUT/fast8_qkv.log" | tail -6 | cut -c1-260 ;;
    n1)  # next session, call 1 (~9 min on a fresh H100): every kernel the defaults and the experimental
         # W4A16 path use, built at once; the fast8 GPU tests (table conversion, stream-K, fused q|k|v,
         # CUTLASS W4A16); then the FLUX step as a user gets it (auto mode, compiled)
      build_g64 16 n1 > "$OUT/build.log" 2>&1; echo "build rc=$?"; tail -1 "$OUT/build.log"
      # (the older candidate tilings are not built here: their float64 tests are left out)
      timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_fast8_gpu.py \
        -k "not (c2x1 or 256x128x128 or 64x256x128 or _p4 or 128x64x128 or 128x32x128 or 64x32x128 or 128x128x128_c1x1_cooperative_sk)" \
        > "$OUT/pytest_fast8.log" 2>&1; echo "fast8 tests rc=$?"; grep -E "passed|failed|Error" "$OUT/pytest_fast8.log" | tail -4
      timeout 330 python3 benchmarks/flux_step.py --fast --mode auto --compile --compile-mode reduce-overhead \
        --no-bf16-compile --no-svdq-eager --profile --out "$OUT/flux_step_auto.json" > "$OUT/flux_step_auto.log" 2>&1
      echo "auto step rc=$?"; grep -E "ms/step|by kind|quantized" "$OUT/flux_step_auto.log" ;;
    n2)  # next session, call 2 (same warm machine, kernels cached): the step with fused q|k|v, the
         # fused-vs-separate layers, and the CUTLASS W4A16 path against the Triton one and bf16
      timeout 330 python3 benchmarks/flux_step.py --fast --mode auto --compile --compile-mode reduce-overhead \
        --no-bf16-compile --no-svdq-eager --fuse-qkv --profile --out "$OUT/flux_step_auto_fused.json" \
        > "$OUT/flux_step_auto_fused.log" 2>&1
      echo "fused step rc=$?"; grep -E "ms/step|by kind|quantized" "$OUT/flux_step_auto_fused.log"
      timeout 100 python3 benchmarks/fast8_linear.py --shapes qkv --no-reference --out "$OUT/fast8_qkv.json" \
        > "$OUT/fast8_qkv.log" 2>&1; echo "qkv layers rc=$?"
      timeout 120 python3 benchmarks/linear_modes.py --graphs --modes w4a16,w4a16c --ms 1,16,64,4608 \
        --out "$OUT/w4a16c_graphs.json" > "$OUT/w4a16c.log" 2>&1; echo "w4a16c rc=$?"; grep -v Warn "$OUT/w4a16c.log" | tail -17 ;;
    lr1)  # issue 23, call 1 (~9 min on a fresh H100): the automatic tilings' plain and low-rank-k-tile
          # kernels built at once; the k-tiles' GPU tests and the plain path's; the compiled layer against
          # FP8 rowwise at FLUX shapes; the kernel cache to $OUT/kcache.tgz (carried into call 2)
      build_g64 16 lr > "$OUT/build.log" 2>&1; echo "build rc=$?"; tail -1 "$OUT/build.log"
      timeout 170 python3 -m pytest -q -p no:cacheprovider -x tests/test_kernels_lowrank_gpu.py > "$OUT/pytest_lowrank.log" 2>&1
      echo "lowrank tests rc=$?"; grep -E "passed|failed|Error|assert" "$OUT/pytest_lowrank.log" | tail -12
      timeout 80 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_fast8_gpu.py \
        -k "fast8_layer_matches or ranks_bias or weights_are" > "$OUT/pytest_fast8.log" 2>&1
      echo "fast8 tests rc=$?"; grep -E "passed|failed|Error" "$OUT/pytest_fast8.log" | tail -4
      tar -C "$KC" -czf "$OUT/kcache.tgz" . ; ls -la "$OUT/kcache.tgz"
      timeout 200 python3 benchmarks/fast8_vs_fp8.py --out "$OUT/fast8_vs_fp8.json" > "$OUT/fast8_vs_fp8.log" 2>&1
      echo "layer bench rc=$?"; grep -v Warn "$OUT/fast8_vs_fp8.log" | tail -11 ;;
    lr2)  # issue 23, call 2: one FLUX.1-dev step (fused q|k|v, reduce-overhead) of bf16 eager and compiled,
          # FP8 rowwise W8A8 compiled and SVDQuant compiled with the low-rank branch in the GEMM and as
          # before, each with its GPU time by kernel kind; kernels from call 1's cache (.kcache/kcache.tgz, unpacked above)
      timeout 470 python3 benchmarks/flux_step.py --fast --mode auto --compile --compile-mode reduce-overhead \
        --fuse-qkv --fp8-peer --no-svdq-eager --profile --lowrank gemm --out "$OUT/flux_step_vs_fp8.json" \
        > "$OUT/flux_step_vs_fp8.log" 2>&1
      echo "step rc=$?"; grep -E "ms/step|by kind|quantized|vs FP8|svdq kernels" "$OUT/flux_step_vs_fp8.log" | cut -c1-400
      timeout 90 python3 benchmarks/quantizer_variants.py --out "$OUT/quantizer_variants.json" --code "$OUT/qcode" \
        > "$OUT/quantizer_variants.log" 2>&1; echo "quantizer rc=$?"; grep -v Warn "$OUT/quantizer_variants.log" | tail -3 | cut -c1-300
      tar -czf "$OUT/qcode.tgz" -C "$OUT" qcode 2>/dev/null; rm -rf "$OUT/qcode" ;;
    p23b)  # issue 23, levers 2 and 3 (~5 min on an H100, kernels from .kcache/kcache.tgz): the GPU tests of the
           # reciprocal quantizer and the fused prologue; the stand-alone quantizer (old division, reciprocal,
           # the FP8 peer's); the compiled fast8 layer with the default and the fused prologue at M = 4608
      if [ -f .kcache/kcache.tgz ]; then mkdir -p "${SVDQ_KERNEL_CACHE:-$HOME/.cache/svdquant/kernels}" && \
        tar -C "${SVDQ_KERNEL_CACHE:-$HOME/.cache/svdquant/kernels}" -xzf .kcache/kcache.tgz; fi
      timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_fused_prologue_gpu.py \
        tests/test_kernels_gpu.py::test_fp8_codes_and_token_scales_are_the_reference_ones \
        tests/test_kernels_fast8_gpu.py::test_inductor_quantizer_gives_the_prologues_codes tests/test_kernels_lowrank_gpu.py \
        -k "not against_float64 and not (matches_the_reference and not 4608)" > "$OUT/pytest_p23b.log" 2>&1
      echo "p23b tests rc=$?"; grep -E "passed|failed|Error|^E " "$OUT/pytest_p23b.log" | tail -8 | cut -c1-300
      timeout 60 python3 benchmarks/quantizer_variants.py --variants peer,ours,ours_rcp_const,ours_div,ours_recip \
        --out "$OUT/quantizer_variants.json" \
        > "$OUT/quantizer_variants.log" 2>&1; echo "quantizer rc=$?"; grep -v Warn "$OUT/quantizer_variants.log" | tail -4 | cut -c1-300
      timeout 170 python3 benchmarks/fast8_prologue.py --peers gelu --out "$OUT/fast8_prologue.json" \
        > "$OUT/fast8_prologue.log" 2>&1
      echo "prologue bench rc=$?"; grep -v Warn "$OUT/fast8_prologue.log" | tail -9 | cut -c1-300 ;;
    lr3)  # issue 23, after p23: one FLUX.1-dev step (fused q|k|v, reduce-overhead) of the FP8 W8A8 peer and
          # SVDQuant with the consumer and the producer conversion (bf16 compiled left out to fit 10 min;
          # bf16 eager kept), GPU time by kernel kind
      timeout 560 python3 benchmarks/flux_step.py --fast --mode auto --compile --compile-mode reduce-overhead \
        --fuse-qkv --fp8-peer --no-bf16-compile --no-svdq-eager --profile --convert both \
        --out "$OUT/flux_step_producer.json" > "$OUT/flux_step_producer.log" 2>&1
      echo "step rc=$?"; grep -E "ms/step|by kind|quantized|vs FP8|svdq kernels" "$OUT/flux_step_producer.log" | cut -c1-400 ;;
    lr4)  # issue 23: one FLUX.1-dev step (fused q|k|v, reduce-overhead) of the FP8 W8A8 peer and SVDQuant with
          # the fused prologue (the default since 2026-12-07) and with Inductor's quantizer, in one run
          # (bf16 compiled left out to fit 10 min), GPU time by kernel kind
      timeout 560 python3 benchmarks/flux_step.py --fast --mode auto --compile --compile-mode reduce-overhead \
        --fuse-qkv --fp8-peer --no-bf16-compile --no-svdq-eager --profile --prologue both \
        --out "$OUT/flux_step_prologue.json" > "$OUT/flux_step_prologue.log" 2>&1
      echo "step rc=$?"; grep -E "ms/step|by kind|quantized|vs FP8|svdq kernels" "$OUT/flux_step_prologue.log" | cut -c1-400 ;;
    lr5)  # issue 23, the short form of lr4 (~7 min): one FLUX.1-dev step (fused q|k|v, reduce-overhead) of the
          # FP8 W8A8 peer and SVDQuant with today's defaults (fused prologue), GPU time by kernel kind
      timeout 480 python3 benchmarks/flux_step.py --fast --mode auto --compile --compile-mode reduce-overhead \
        --fuse-qkv --fp8-peer --no-bf16-compile --no-svdq-eager --profile --prologue fused \
        --out "$OUT/flux_step_defaults.json" > "$OUT/flux_step_defaults.log" 2>&1
      echo "step rc=$?"; grep -E "ms/step|by kind|quantized|vs FP8|svdq kernels" "$OUT/flux_step_defaults.log" | cut -c1-400 ;;
    lr6)  # issue 23 lever 5 in the step (~9 min): one FLUX.1-dev step (fused q|k|v, reduce-overhead) of the FP8
          # W8A8 peer and SVDQuant with today's defaults, then with SVDQ_FAST8_WEIGHTS=e4m3 (per-call e4m3
          # weight pass + the pre-converted SS kernel), GPU time by kernel kind
      timeout 570 python3 benchmarks/flux_step.py --fast --mode auto --compile --compile-mode reduce-overhead \
        --fuse-qkv --fp8-peer --no-bf16-compile --no-svdq-eager --profile --prologue fused --weights both \
        --out "$OUT/flux_step_weights.json" > "$OUT/flux_step_weights.log" 2>&1
      echo "step rc=$?"; grep -E "ms/step|by kind|quantized|vs FP8|svdq kernels" "$OUT/flux_step_weights.log" | cut -c1-400 ;;
    seg2) # the k-segmented layers' error, hardware or kernel (~2 min): cuBLAS with and without fast accumulation
          # and our GEMM on the K = 12288 MLP half's operands (benchmarks/fp8_accumulation.py)
      timeout 150 python3 benchmarks/fp8_accumulation.py --out "$OUT/fp8_accumulation.json" > "$OUT/fp8_accumulation.log" 2>&1
      echo "fp8 accumulation rc=$?"; grep -v Warn "$OUT/fp8_accumulation.log" | tail -12 | cut -c1-250 ;;
    lr7)  # issue 23 lever 5, the short form of lr6 (~7.5 min, room for seg2 in the same call): one FLUX.1-dev step
          # (fused q|k|v, reduce-overhead) of the FP8 W8A8 peer and SVDQuant with SVDQ_FAST8_WEIGHTS=e4m3
      timeout 440 python3 benchmarks/flux_step.py --fast --mode auto --compile --compile-mode reduce-overhead \
        --fuse-qkv --fp8-peer --no-bf16-compile --no-svdq-eager --profile --prologue fused --weights e4m3 \
        --out "$OUT/flux_step_e4m3.json" > "$OUT/flux_step_e4m3.log" 2>&1
      echo "step rc=$?"; grep -E "ms/step|by kind|quantized|vs FP8|svdq kernels" "$OUT/flux_step_e4m3.log" | cut -c1-400 ;;
    prof) # issue 23 (~5 min): which ops are the compiled step's 12.4 ms of "other" GPU time (an ATen
          # elementwise kernel, 171 calls, since the fused prologue): SVDQuant's default compiled also without
          # CUDA graphs and profiled by op and input shapes (flux_step.py --profile-shapes)
      timeout 420 python3 benchmarks/flux_step.py --fast --mode auto --compile --compile-mode reduce-overhead \
        --fuse-qkv --no-bf16-compile --no-svdq-eager --profile --profile-shapes \
        --out "$OUT/flux_step_ops.json" > "$OUT/flux_step_ops.log" 2>&1
      echo "step rc=$?"; grep -E "ms/step|by kind|: other " "$OUT/flux_step_ops.log" | cut -c1-400
      grep -A40 "by op and input shapes" "$OUT/flux_step_ops.log" | cut -c1-260 | head -45 ;;
    p24)  # issue 23, one call (~7 min): the FLUX.1-dev step (fused q|k|v, reduce-overhead) of the FP8 W8A8 peer
          # and SVDQuant's defaults, GPU time by kernel kind with the "other" kernels' full names, then
          # SVDQuant compiled without CUDA graphs by op and input shapes (what launches "other")
      step_vs_fp8 p24 470 --profile-shapes
      grep -A40 "by op and input shapes" "$OUT/flux_step_p24.log" | cut -c1-260 | head -45 ;;
    p25)  # issue 23 (~7 min): rank-0 layers on the low-rank kernels (one zero k-tile) and quantized in the
          # compiled graph (x never written): their GPU tests, then the step beside the FP8 peer (as p24, no
          # by-op profile)
      timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_ss_gpu.py tests/test_kernels_fast8_gpu.py \
        -k "rank0 or reduce_overhead" > "$OUT/pytest_rank0.log" 2>&1
      echo "rank0 tests rc=$?"; grep -E "passed|failed|Error|assert" "$OUT/pytest_rank0.log" | tail -8 | cut -c1-300
      step_vs_fp8 p25 420 ;;
    p26)  # issue 23, one call (~8 min): the rank-0 GPU tests, the step beside the FP8 peer (rank-0 layers on
          # the low-rank kernels and quantized in the graph; shifted layers quantized unshifted, still
          # promoted), then fp8_accumulation.py's post_gelu_unshifted case (decides PROMOTE_SHIFTED) and
          # the shift-bias GPU tests
      rank0_tests 100
      step_vs_fp8 p26 330
      fp8_accumulation 90
      shift_bias_tests 120 ;;
    p27)  # issue 23, the short form of p26 (~5.5 min): the step beside the FP8 peer first, then the rank-0 GPU tests
      step_vs_fp8 p27 320
      rank0_tests 100 ;;
    p29)  # p27 on a machine without a carried cache for all of it (~9.5 min): the step's kernels built here
          # on 16 cores (those in .kcache/kcache.tgz are found), the step beside FP8, then the post-GELU
          # unshifted accumulation (fp8_accumulation.py: whether PROMOTE_SHIFTED can go off)
      build_g64 16 step > "$OUT/build.log" 2>&1; echo "build rc=$? ($(grep -c compiling "$OUT/build.log") compiled)"
      step_vs_fp8 p29 330
      fp8_accumulation 60 ;;
    p30)  # the step alone, beside FP8 (~9 min: bf16 eager and FP8 ~2.5 min, quantizing 64 s, SVDQuant's eager
          # call, compile and profile the rest; p29's 330 s were too short): all kernels from .kcache/kcache.tgz
      step_vs_fp8 p30 565 ;;
    p31)  # after p30 (~9.5 min): the SS candidate tilings (ssc), then the post-GELU unshifted accumulation
          # (decides PROMOTE_SHIFTED), the rank-0 GPU tests and the shift-bias GPU tests
      bash "$0" ssc
      fp8_accumulation 80
      rank0_tests 100
      shift_bias_tests 90 ;;
    p32)  # after p31 (~9.5 min): the step with the tuned pre-converted tilings (SS_TUNED_CONFIGS) and
          # PROMOTE_SHIFTED off, beside FP8 (all 24 kernels in .kcache/kcache.tgz), then the GPU tests of
          # what changed: the tuned tilings (the candidates' test), the rank-0 and the shift-bias tests
      step_vs_fp8 p32 420
      timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_ss_gpu.py tests/test_kernels_fast8_gpu.py \
        tests/test_fp8_shift_bias_gpu.py -k "candidate or rank0 or gelu_shifted" > "$OUT/pytest_p32.log" 2>&1
      echo "tests rc=$?"; grep -E "passed|failed|Error|assert" "$OUT/pytest_p32.log" | tail -8 | cut -c1-300 ;;
    p35)  # fifth session (~9 min; the e4m3 pass sweep ran alone first, Triton only): the W4A16 GEMV's GPU
          # tests and its timing against the f16s GEMM at one token (AdaLN shapes), where the fused prologue's
          # time goes (its two kernels, one-read floors, the one-read prologue — 2.6x slower, removed since —,
          # the tuned pass and SS GEMM), then the segmented GPU test with PROMOTE_SHIFTED off
      SVDQ_GEMV_MAX_M=4 timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_gpu.py -k "w4a16" \
        > "$OUT/pytest_w4a16_gpu.log" 2>&1; echo "w4a16 tests rc=$?"; grep -E "passed|failed|assert" "$OUT/pytest_w4a16_gpu.log" | tail -6 | cut -c1-300
      timeout 150 python3 benchmarks/w4a16_gemv.py --ms 1 --out "$OUT/w4a16_gemv.json" > "$OUT/w4a16_gemv.log" 2>&1
      echo "gemv bench rc=$?"; grep -v Warn "$OUT/w4a16_gemv.log" | tail -48 | cut -c1-200
      timeout 130 python3 benchmarks/fast8_prologue.py --producers x --peers x --shapes 3 --out "$OUT/fast8_prologue_parts.json" \
        > "$OUT/fast8_prologue_parts.log" 2>&1; echo "prologue parts rc=$?"; grep -v Warn "$OUT/fast8_prologue_parts.log" | tail -9 | cut -c1-300
      timeout 140 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels_segmented_gpu.py > "$OUT/pytest_segmented_gpu.log" 2>&1
      echo "segmented gpu tests rc=$?"; grep -E "passed|failed" "$OUT/pytest_segmented_gpu.log" | tail -5 ;;
    p36)  # fifth session's step (~7.5 min): the default with the pass's tuned blocking and the W4A16 GEMV,
          # beside FP8 and bf16 eager (the device time left did not hold p34's bf16 compile)
      step_vs_fp8 p36 450 ;;
    p37)  # p36 without the profile (~5.5 min, the least device time a same-run step against FP8 takes)
      timeout 340 python3 benchmarks/flux_step.py --fast --mode auto --compile --compile-mode reduce-overhead \
        --fuse-qkv --fp8-peer --no-bf16-compile --no-svdq-eager --steps 6 --warmup 2 --out "$OUT/flux_step_p37.json" \
        > "$OUT/flux_step_p37.log" 2>&1
      echo "step rc=$?"; grep -E "ms/step|vs FP8|rel err" "$OUT/flux_step_p37.log" | cut -c1-300 ;;
    p34)  # the issue's full step table in one run (~10 min): bf16 eager and compiled (reduce-overhead), FP8,
          # SVDQuant's default, GPU time by kind for each
      timeout 590 python3 benchmarks/flux_step.py --fast --mode auto --compile --compile-mode reduce-overhead \
        --fuse-qkv --fp8-peer --no-svdq-eager --profile --out "$OUT/flux_step_p34.json" > "$OUT/flux_step_p34.log" 2>&1
      echo "step rc=$?"; grep -E "ms/step|by kind|vs FP8|rel err" "$OUT/flux_step_p34.log" | cut -c1-300 ;;
    p28)  # p27 with the rank-0 graph quantizer timed on and off in one run (~7 min): what each rank-0 fix gives
      step_vs_fp8 p28 420 --rank0-graph both ;;
    q25)  # issue 25 (~5 min, 7 at most): GPTQ's compiled Triton column loop against the torch loop
          # (tests/test_gptq_gpu.py), then the FLUX.1-dev-shaped quantize (random weights built on the
          # GPU from the config: nothing downloads), the recipe before issue 25 (uniform rank 32, no
          # GPTQ), then today's default (GPTQ, rank allocation under the rank-32 budget) on the same
          # machine. State (statistics with Hessians, finished blocks) in /tmp, removed after; JSON +
          # logs in $OUT. Q25_MODEL="--tiny --device cpu" runs the quantize part on a CPU (a check of
          # the step itself).
      timeout 60 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gptq_gpu.py > "$OUT/pytest_gptq_gpu.log" 2>&1
      rc=$?; echo "gptq gpu tests rc=$rc"; grep -E "passed|failed|Error" "$OUT/pytest_gptq_gpu.log" | tail -4
      if [ $rc -ne 0 ]; then export SVDQ_GPTQ_KERNEL=torch; echo "(the default recipe runs GPTQ's torch column loop)"; fi
      timeout 90 python3 benchmarks/sdpa_backward_probe.py --out "$OUT/sdpa_backward_probe.json" 2>&1 | tail -4
      for r in default old; do
        lim=$([ "$r" = old ] && echo 140 || echo 230)
        rm -rf "/tmp/q25_state_$r"
        timeout $lim python3 benchmarks/quantize_flux.py ${Q25_MODEL:---device cuda} --recipe $r \
          --time-budget $((lim - 30)) --state-dir "/tmp/q25_state_$r" --out "$OUT/q25_$r" > "$OUT/q25_$r.log" 2>&1
        echo "q25 $r rc=$? (3: stopped at the time budget, partial timings in the JSON)"
        grep -E "^(calibration|smoothing_search|svd|residual|report|io|sensitivity|rank_allocation|total) |peak GPU|stopped|Error" \
          "$OUT/q25_$r.log" | tail -14
        rm -rf "/tmp/q25_state_$r"
        if [ "$r" = default ] && grep -q "illegal memory access" "$OUT/q25_$r.log"; then  # where it faults, then stop
          CUDA_LAUNCH_BLOCKING=1 timeout 200 python3 benchmarks/quantize_flux.py ${Q25_MODEL:---device cuda} \
            --recipe default --state-dir /tmp/q25_state_clb --out "$OUT/q25_clb" > "$OUT/q25_clb.log" 2>&1
          grep -B30 -m1 "illegal memory access" "$OUT/q25_clb.log" | grep -E "File|Error" | tail -12; rm -rf /tmp/q25_state_clb
          break
        fi
      done
      unset SVDQ_GPTQ_KERNEL ;;
    p23)  # issue 23 lever 1 (<= 8 min on a fresh H100): the producer conversion (convert="producer":
          # the producer warpgroup converts int4 -> e4m3 into shared memory, SS FP8 wgmmas) and its
          # consumer twins (128x256 and stream-K, low-rank k-tiles) built at once; a 30 s smoke call
          # (a pipeline hang stops the step there); its GPU tests (bits against the consumer kernel at
          # M 1/17/4608 on the six FLUX shapes, float64 and reference bounds); then both timed with
          # torch's FP8 rowwise GEMM and layer at M = 4608 ($OUT/fast8_producer.json)
      build_g64 16 p23 > "$OUT/build_p23.log" 2>&1; echo "build rc=$?"; tail -2 "$OUT/build_p23.log"
      timeout 60 python3 -c "
import torch, svdq_kernels
from svdq_format import ops
from svdq_kernels import cutlass_fast8 as f, lowrank_tiles as t
from svdq_kernels.configs import PRODUCER_CONVERT_CONFIGS as PC
m, n, k = 4608, 3072, 3072
x = torch.randn(m, k, device='cuda', dtype=torch.bfloat16); qw = torch.randint(0, 256, (n, k // 2), device='cuda', dtype=torch.uint8)
ws = (torch.rand(n, k // 64, device='cuda') * 0.004 + 0.001).to(torch.bfloat16); down = torch.randn(32, k, device='cuda', dtype=torch.bfloat16) / 64
q, a = ops.quantize_fp8_rows(x.float()); lr, ag = t.lowrank_tiles(x, down, a.reshape(m).float())
s, ri = f.fast8_lowrank_weights(qw, ws, 1); l1 = t.padded_up(torch.randn(n, 32, device='cuda', dtype=torch.bfloat16), ri)
for c in PC:
    y = f.group64_gemm_lowrank(qw, s, ri, q, ag, None, lr, l1, config=c); torch.cuda.synchronize(); print('smoke', c.name, 'ok', bool(y.isfinite().all()))
" > "$OUT/smoke_p23.log" 2>&1; rc=$?; echo "p23 smoke rc=$rc"; tail -3 "$OUT/smoke_p23.log" | cut -c1-300
      if [ $rc -eq 0 ]; then
        timeout 210 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_producer_gpu.py > "$OUT/pytest_p23.log" 2>&1
        echo "p23 tests rc=$?"; grep -E "passed|failed|Error|assert" "$OUT/pytest_p23.log" | tail -12 | cut -c1-300
        timeout 150 python3 benchmarks/fast8_producer.py --no-layer --out "$OUT/fast8_producer.json" > "$OUT/fast8_producer.log" 2>&1
        echo "p23 bench rc=$?"; grep -v Warn "$OUT/fast8_producer.log" | tail -8 | cut -c1-250
      fi ;;
    seg)  # the k-segmented layers (Nunchaku FLUX single blocks' proj_out) on the kernels: the GPU test, then
          # on a failure the per-segment, per-path errors (benchmarks/segmented_parts.py; ~3 min in all).
          # Since the promoted-kernel fix (act_unsigned, M > 16: g64 ..._p1 pair, two-step path) 9/9
          # expected; the pair must be in the carried kernel cache (GROUP64_CONFIGS), else its first use
          # compiles it (~2 min, past this timeout).
      timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels_segmented_gpu.py > "$OUT/pytest_segmented_gpu.log" 2>&1
      rc=$?; echo "segmented gpu tests rc=$rc"; grep -E "passed|failed" "$OUT/pytest_segmented_gpu.log" | tail -5
      if [ $rc -ne 0 ]; then timeout 120 python3 benchmarks/segmented_parts.py > "$OUT/segmented_parts.log" 2>&1
        echo "parts rc=$?"; grep -v Warn "$OUT/segmented_parts.log" | tail -18; fi
      # hardware or kernel? cuBLAS on the same K = 12288 operands with and without fast accumulation
      timeout 150 python3 benchmarks/fp8_accumulation.py --out "$OUT/fp8_accumulation.json" 2>&1 | grep -v Warn | tail -3 ;;
    ss)  # issue 23 lever 5 (~5 min on an H100; kernels from .kcache-ss.tgz, else built here, ~3 min on 16
         # cores): the pre-converted kernel (SVDQ_FAST8_WEIGHTS=e4m3: the e4m3 pass + a dense SS FP8 mainloop
         # with the low-rank k-tiles); a 60 s smoke call (a pipeline hang stops the step there); its GPU tests
         # (bits against the consumer kernel at M 2048/4608 on six FLUX shapes, ranks 32/64, with and without
         # bias; float64 and reference bounds); then timed beside _scaled_mm and the consumer kernel at
         # M = 4608 ($OUT/fast8_preconverted.json)
      if [ -f .kcache-ss.tgz ]; then mkdir -p "$KC" && tar -C "$KC" -xzf .kcache-ss.tgz; fi
      build_g64 16 ss > "$OUT/build_ss.log" 2>&1; echo "build rc=$?"; tail -2 "$OUT/build_ss.log"
      timeout 60 python3 -c "
import torch, svdq_kernels
from svdq_format import ops
from svdq_kernels import cutlass_fast8 as f, lowrank_tiles as t
from svdq_kernels.configs import SS_LOWRANK_CONFIGS as SS
from svdq_kernels.weights_e4m3 import e4m3_weights
m, n, k = 4608, 3072, 3072
x = torch.randn(m, k, device='cuda', dtype=torch.bfloat16); qw = torch.randint(0, 256, (n, k // 2), device='cuda', dtype=torch.uint8)
ws = (torch.rand(n, k // 64, device='cuda') * 0.004 + 0.001).to(torch.bfloat16); down = torch.randn(64, k, device='cuda', dtype=torch.bfloat16) / 64
q, a = ops.quantize_fp8_rows(x.float()); lr, ag = t.lowrank_tiles(x, down, a.reshape(m).float())
s16, ri = f.fast8_weights(qw, ws); w8 = e4m3_weights(qw, s16); l1 = t.padded_up64(torch.randn(n, 64, device='cuda', dtype=torch.bfloat16), ri)
for c in SS:
    y = f.ss_gemm_lowrank(w8, ri, q, ag, None, lr, l1, config=c); torch.cuda.synchronize(); print('smoke', c.name, 'ok', bool(y.isfinite().all()))
" > "$OUT/smoke_ss.log" 2>&1; rc=$?; echo "ss smoke rc=$rc"; tail -3 "$OUT/smoke_ss.log" | cut -c1-300
      if [ $rc -eq 0 ]; then
        timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_ss_gpu.py > "$OUT/pytest_ss.log" 2>&1
        echo "ss tests rc=$?"; grep -E "passed|failed|Error|assert" "$OUT/pytest_ss.log" | tail -12 | cut -c1-300
        timeout 150 python3 benchmarks/fast8_preconverted.py --out "$OUT/fast8_preconverted.json" > "$OUT/fast8_preconverted.log" 2>&1
        echo "ss bench rc=$?"; grep -v Warn "$OUT/fast8_preconverted.log" | tail -9 | cut -c1-250
      fi ;;
    ssc)  # issue 23: the pre-converted kernel's other tilings (SS_LOWRANK_CANDIDATES: 2x1 / 1x2 clusters with TMA
          # multicast, 256 x 128, pingpong), prebuilt on the CPU into .kcache/kcache-ss-cand.tgz (~5 min on an H100;
          # today's SS_LOWRANK_CONFIGS from .kcache/kcache.tgz): a 60 s smoke call (each cached candidate once; a
          # pipeline hang stops the step there), then every candidate that ran timed beside _scaled_mm and today's
          # kernels at M = 4608 on the seven shapes, bits against today's pick ($OUT/fast8_ss_candidates.json)
      if [ -f .kcache/kcache-ss-cand.tgz ]; then mkdir -p "$KC" && tar -C "$KC" -xzf .kcache/kcache-ss-cand.tgz; fi
      timeout 60 python3 benchmarks/fast8_preconverted.py --smoke > "$OUT/smoke_ssc.log" 2>&1; rc=$?
      echo "ssc smoke rc=$rc"; grep -E "^smoke (ok|error|skip)|Error" "$OUT/smoke_ssc.log" | tail -14 | cut -c1-250
      [ $rc -eq 0 ] || { echo "ssc: smoke failed or hung at: $(grep '^smoke start' "$OUT/smoke_ssc.log" | tail -1)"; }
      ok=$(awk '$1 == "smoke" && $2 == "ok" {print $3}' "$OUT/smoke_ssc.log" | paste -sd, -)
      if [ $rc -eq 0 ] && [ -n "$ok" ]; then
        timeout 240 python3 benchmarks/fast8_preconverted.py --candidates "$ok" --out "$OUT/fast8_ss_candidates.json" \
          > "$OUT/fast8_ss_candidates.log" 2>&1
        echo "ssc bench rc=$?"; grep -v Warn "$OUT/fast8_ss_candidates.log" | tail -100 | cut -c1-200
      fi ;;
    cg)  # the CUDA-graph pool fix (~1-2 min with the kernels in .kcache; else first use builds them): a
         # two-layer fast8 model compiled with mode="reduce-overhead" and called first compiled (empty
         # per-weight caches), default int4 and e4m3 weights, against its eager output
      timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_fast8_gpu.py \
        -k reduce_overhead_compiles_on_a_first_call > "$OUT/pytest_cg.log" 2>&1
      echo "cg tests rc=$?"; grep -E "passed|failed|Error|assert" "$OUT/pytest_cg.log" | tail -8 | cut -c1-300 ;;
    *) echo "unknown step $step" ;;
  esac
done
