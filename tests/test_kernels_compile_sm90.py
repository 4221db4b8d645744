"""Every Triton kernel variant the Hopper backend can launch (and the W4A16 GEMV's per-step K sum)
compiles for sm_90 — on a machine without a GPU (Triton's compiler and its bundled ptxas need none).

The interpreter tests (``test_kernels_interpreter.py``) check the kernels' arithmetic; this checks
what the interpreter cannot: that each constexpr combination (datapath, split-K, permuted
activations, weight decodings, prologue modes) lowers to sm_90 code. It runs in a child process,
because the interpreter tests switch Triton into interpreter mode for this one. Skipped without
triton.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

# (not imported here: the interpreter tests must be the first to import triton in this process)
if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]

# (kernel, constexprs, pointer dtypes that differ from *fp32, num_warps)
_CHILD = r'''
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from svdq_kernels import lowrank_tiles, triton_gemm, triton_gemv, triton_prologue, weights_e4m3

kernels = {**triton_prologue.kernels(), **triton_gemm.kernels(), "lowrank_tiles": lowrank_tiles._kernel(),
           "e4m3_weights": weights_e4m3._kernel(),
           "gemv": triton_gemv._kernel()}
LR = dict(HAS_LR=True, BM=32, BR=32)
GEMM_T = dict(F16=False, SCALED=False, EXACT=False, NVFP4=False, HAS_A=True, HAS_LR=True,
              HAS_LRS=True, HAS_BIAS=True, SPLIT_K=1, BR=32, BM=128, BN=128, GROUP_N=8)
W = dict(w_ptr="*u8", wst_ptr="*bf16", l1_ptr="*bf16", b_ptr="*bf16", y_ptr="*bf16")
FP8, F16 = dict(W, q_ptr="*fp8e4nv"), dict(W, q_ptr="*fp16")
CASES = [
    ("prologue_stats", dict(LR, AMAX=True), dict(x_ptr="*bf16", s_ptr="*bf16", l2_ptr="*bf16")),
    ("prologue_stats", dict(LR, AMAX=False), dict(x_ptr="*bf16", s_ptr="*bf16", l2_ptr="*bf16")),  # lowrank_down
    ("lowrank_sum", dict(HAS_LRS=True, BM=32, BR=32), dict(lr_ptr="*bf16", lrs_ptr="*bf16")),
    ("prologue_quant", dict(LR, LR16=False, HAS_LRS=False, Q16=False, W16=False),
     dict(x_ptr="*bf16", s_ptr="*bf16", q_ptr="*fp8e4nv")),
    ("prologue_quant", dict(LR, LR16=False, HAS_LRS=False, Q16=True, W16=False),
     dict(x_ptr="*bf16", s_ptr="*bf16", q_ptr="*fp16")),
    ("prologue_quant", dict(LR, LR16=False, HAS_LRS=False, Q16=False, W16=True),
     dict(x_ptr="*bf16", s_ptr="*bf16", q_ptr="*fp16")),
    ("prologue_quant", dict(LR, LR16=True, HAS_LRS=True, Q16=False, W16=False),  # fast8: lr as bf16 hi|lo
     dict(x_ptr="*bf16", s_ptr="*bf16", q_ptr="*fp8e4nv", lr_ptr="*bf16", lrs_ptr="*bf16")),
    ("prologue_quant", dict(LR, LR16=True, HAS_LRS=True, Q16=False, W16=True),  # CUTLASS W4A16
     dict(x_ptr="*bf16", s_ptr="*bf16", q_ptr="*fp16", lr_ptr="*bf16", lrs_ptr="*bf16")),
    ("prologue_stats", dict(LR, AMAX=True, RCP=True, BM=64),  # fast modes: x · (1/s); quantize_lowrank's stats
     dict(x_ptr="*bf16", l2_ptr="*bf16")),
    ("prologue_quant", dict(LR, LR16=False, HAS_LRS=False, Q16=False, W16=False, RCP=True),  # codes = x̂ · (1/a)
     dict(x_ptr="*bf16", q_ptr="*fp8e4nv")),
    ("codes_tiles", dict(HAS_LRS=True, BM=32, PBR=64, BR=64, RT=64),  # quantize_lowrank's codes + k-tiles
     dict(x_ptr="*bf16", q_ptr="*fp8e4nv", lr_ptr="*bf16", lrs_ptr="*bf16")),
    ("codes_tiles", dict(HAS_LRS=False, BM=32, PBR=32, BR=32, RT=32, BK=256),  # wider codes steps
     dict(x_ptr="*bf16", q_ptr="*fp8e4nv", lr_ptr="*bf16")),
    ("prologue_exact", dict(LR, UNSIGNED=True), dict(x_ptr="*bf16", s_ptr="*bf16", l2_ptr="*bf16", c_ptr="*fp16")),
    ("prologue_nvfp4", LR, dict(x_ptr="*bf16", s_ptr="*bf16", l2_ptr="*bf16", c_ptr="*fp16")),
    ("gemm_t", GEMM_T, FP8),                                                    # fp8t
    ("gemm_t", dict(GEMM_T, F16=True), F16),                                    # f16t
    ("gemm_t", dict(GEMM_T, SCALED=True, F16=True), F16),                       # f16s, W4A16
    ("gemm_t", dict(GEMM_T, EXACT=True, HAS_A=False), F16),                     # exact
    ("gemm_t", dict(GEMM_T, NVFP4=True, F16=True), dict(F16, wst_ptr="*u8")),   # nvfp4
    ("gemm_t", dict(GEMM_T, SPLIT_K=4, BM=16, BN=64), dict(FP8, y_ptr="*fp32")),  # small-M split-K
    ("gemm_t", dict(GEMM_T, EXACT=True, HAS_A=False, SPLIT_K=4, BM=16, BN=64), dict(F16, y_ptr="*fp32")),
    ("splitk_reduce", dict(S=4, BLOCK=1024), dict(y_ptr="*bf16")),
    ("lowrank_tiles", dict(HAS_LRS=True, BM=32, PBR=64, BR=64, RT=64), dict(lr_ptr="*bf16", lrs_ptr="*bf16")),
    ("e4m3_weights", dict(BN=64, BK=256, GS=1), dict(codes_ptr="*u8", scales_ptr="*fp16", out_ptr="*u8")),  # first
    ("e4m3_weights", dict(BN=16, BK=1024, GS=16), dict(codes_ptr="*u8", scales_ptr="*fp16", out_ptr="*u8")),  # default
    ("e4m3_weights", dict(BN=64, BK=1024, GS=8), dict(codes_ptr="*u8", scales_ptr="*fp16", out_ptr="*u8")),
    ("gemv", dict(MB=1, BN=16, BK=512, BR=32, TILE_ACC=True, HAS_LR=True, HAS_LRS=True, HAS_BIAS=True),  # batch 1
     dict(q_ptr="*fp16", w_ptr="*u8", s_ptr="*bf16", up_ptr="*bf16", lrs_ptr="*bf16", b_ptr="*bf16", y_ptr="*bf16")),
    ("gemv", dict(MB=4, BN=16, BK=128, BR=16, TILE_ACC=False, HAS_LR=False, HAS_LRS=False, HAS_BIAS=False),
     dict(q_ptr="*fp16", w_ptr="*u8", s_ptr="*bf16", y_ptr="*bf16")),
]
shard, shards = (int(v) for v in sys.argv[1].split("/"))  # this child's share of the cases
mine = CASES[shard::shards]
failed = 0
for name, const, ptrs in mine:
    fn = kernels[name]
    fn = fn.fn if isinstance(fn, triton.runtime.Autotuner) else fn
    sig = {}
    for p in fn.params:
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        elif p.name.endswith("_ptr"):
            sig[p.name] = ptrs.get(p.name, "*fp32")
        else:
            sig[p.name] = "fp32" if p.name in ("shift", "one") else "i32"
    consts = {p.name: const[p.name] if p.name in const or not p.has_default else p.default
              for p in fn.params if p.is_constexpr}
    try:
        triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": 8 if name == "gemm_t" or const.get("BM") == 64 else 4,
                                "num_stages": 3})
    except Exception as exc:  # report every failing variant, not only the first
        failed += 1
        print(f"FAILED {name} {const}: {' '.join(str(exc).split())[:400]}")
print(f"compiled {len(mine) - failed} of {len(mine)} of {len(CASES)}")
sys.exit(1 if failed else 0)
'''


def test_every_kernel_variant_compiles_for_sm90(tmp_path: Path) -> None:
    """Two child processes (CI has two cores; compiling is single-threaded), half the cases each."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["TRITON_DEFAULT_FP_FUSION"] = env.get("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's current default, stated
    logs = [tmp_path / f"child-{i}.log" for i in range(2)]
    procs = []
    for i, log in enumerate(logs):
        with open(log, "w") as fh:
            procs.append(subprocess.Popen([sys.executable, "-c", _CHILD, f"{i}/2"], env=env, stdout=fh,
                                          stderr=subprocess.STDOUT, text=True))
    codes = [proc.wait(timeout=600) for proc in procs]
    outs = [log.read_text() for log in logs]
    assert codes == [0, 0], "\n".join(out[-3000:] for out in outs)
    compiled = [int(line.split()[1]) for out in outs for line in out.splitlines() if line.startswith("compiled ")]
    assert sum(compiled) == 28 and all(f"of {n} of 28" in out for out, n in zip(outs, (14, 14))), outs
