"""Compile group-64 kernels for sm_90a without a GPU and read their SASS (docs/kernels.md).

For each configuration name (``svdq_kernels.configs.config_by_name``): render the ``.cu``, compile
it to an object with ``nvcc -c`` and ``ptxas -v``, disassemble it with ``cuobjdump -sass``, and
report the mainloop's stages (from the kernel's mangled name), registers and spills, every wgmma
form in the kernel (``QGMMA``/``HGMMA``, A from registers or from a shared-memory descriptor), and
the consumer mainloop's instruction census: the instructions between the consumers'
``USETMAXREG.TRY_ALLOC`` and their ``WARPGROUP.DEPBAR.LE gsb0, 0x0`` (the mainloop's last wait).
With the producer conversion that region must hold no conversion instruction (``F2FP``,
``HMUL2``, ``HFMA2``, ``I2F``) and no shared-memory load but the low-rank sentinel's ``LDS.U16``.

A CPU-only torch wheel lacks one generated header that torch's CUDA headers include
(``c10/cuda/impl/cuda_cmake_macros.h``); it is supplied when missing. ``cuobjdump`` comes from
PATH, nvcc's directory or Triton's bundled copy.

    python benchmarks/kernel_sass.py g64s4fp8_128x256x128_c1x1_cooperative_lut_lr_pc2 \
        g64s4fp8_128x256x128_c1x1_cooperative_lut_lr --out /tmp/sass
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CONVERSION_OPS = ("F2FP", "HMUL2", "HFMA2", "I2F", "F2F")


def _cuobjdump(nvcc: str) -> str:
    found = shutil.which("cuobjdump") or str(Path(nvcc).resolve().parent / "cuobjdump")
    if Path(found).exists():
        return found
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if bundled.exists():
        return str(bundled)
    raise SystemExit("error: no cuobjdump (PATH, nvcc's directory, triton's bundled copy)")


def _stub_includes(work: Path) -> list[str]:
    from torch.utils import cpp_extension

    header = Path("c10/cuda/impl/cuda_cmake_macros.h")
    if any((Path(p) / header).exists() for p in cpp_extension.include_paths()):
        return []
    stub = work / "stub" / header
    stub.parent.mkdir(parents=True, exist_ok=True)
    stub.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    return [f"-I{work / 'stub'}"]


def census(sass: str) -> dict:
    """What :mod:`kernel_sass` reports about one kernel's SASS text."""
    lines = [re.sub(r"\s*/\* 0x[0-9a-f]+ \*/", "", ln).strip() for ln in sass.splitlines()]
    ins = [re.sub(r"^/\*[0-9a-f]+\*/\s*", "", ln) for ln in lines if re.match(r"^/\*[0-9a-f]{4,}\*/", ln)]
    forms = collections.Counter(re.sub(r"\bU?R\d+\b", "R", ln.rstrip(" ;")) for ln in ins if "GMMA." in ln)
    out: dict = {"instructions": len(ins), "wgmma_forms": dict(forms)}
    start = next((i for i, ln in enumerate(ins) if "USETMAXREG.TRY_ALLOC" in ln), None)
    end = next((i for i, ln in enumerate(ins) if start is not None and i > start and "DEPBAR.LE gsb0, 0x0" in ln), None)
    if start is not None and end is not None:
        region = ins[start:end + 1]
        ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", ln).split()[0].split(".")[0] for ln in region)
        out["consumer_mainloop"] = {
            "instructions": len(region), "opcodes": dict(ops.most_common()),
            "conversion_ops": sum(n for op, n in ops.items() if op in CONVERSION_OPS),
            "smem_loads": [ln for ln in region if ln.startswith("LDS") or " LDS" in ln or "LDSM" in ln],
            "rs_wgmmas": sum(1 for ln in region if re.search(r"GMMA\.\S+ R\d+, R\d+, gdesc", ln)),
        }
    return out


def inspect(name: str, work: Path) -> dict:
    from svdq_kernels import build, codegen
    from svdq_kernels.configs import config_by_name

    config = config_by_name(name)
    tc = build.detect_toolchain()
    src = work / f"{name}.cu"
    obj = work / f"{name}.o"
    src.write_text(codegen.render_source(config))
    cmd = [c for c in build.nvcc_command(src, obj, tc) if c != "-shared" and not c.startswith(("-l", "-L"))]
    cmd[1:1] = ["-c", "-Xptxas=-v", "-diag-suppress=3306", *_stub_includes(work)]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode:
        return {"name": name, "error": (run.stderr or run.stdout)[-4000:]}
    ptxas = run.stdout + run.stderr
    regs = re.findall(r"Used (\d+) registers", ptxas)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas)
    sass = subprocess.run([_cuobjdump(tc.nvcc), "-sass", str(obj)], capture_output=True, text=True, check=True).stdout
    (work / f"{name}.sass").write_text(sass)
    stages = re.search(r"(?:ProducerConvert|MixedInput|TmaGmmaWarpSpecialized)ILi(\d+)E", sass)
    return {"name": name, "config": config.as_dict(), "stages": int(stages.group(1)) if stages else None,
            "registers": [int(r) for r in regs], "spill_bytes": [[int(a), int(b)] for a, b in spills],
            **census(sass)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="+", help="kernel configuration names")
    ap.add_argument("--out", default="", help="directory for the .cu, .o, .sass and sass.json (default: temporary)")
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args(argv)
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="svdq-sass-"))
    work.mkdir(parents=True, exist_ok=True)
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda n: inspect(n, work), args.names))
    (work / "sass.json").write_text(json.dumps(results, indent=1) + "\n")
    for r in results:
        if "error" in r:
            print(f"{r['name']}: compile error\n{r['error']}")
            continue
        cm = r.get("consumer_mainloop", {})
        print(f"{r['name']}: {r['stages']} stages, registers {r['registers']}, spills {r['spill_bytes']}")
        for form, n in sorted(r["wgmma_forms"].items()):
            print(f"  {n:3d} x {form}")
        if cm:
            print(f"  consumer mainloop: {cm['instructions']} instructions, {cm['conversion_ops']} conversion ops, "
                  f"{len(cm['smem_loads'])} smem loads {cm['smem_loads']}")
    print(f"wrote {work / 'sass.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
