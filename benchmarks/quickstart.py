"""The README's Quick start (Python), timed on CPU: what a new user waits for.

Two measurements:

* ``readme``: the README's ``## Quick start (Python)`` block, taken from README.md verbatim
  and run in a fresh interpreter (``python -c``) in a temporary directory, wall clock including
  the imports — exactly what a user pasting it waits for — and, for comparison, a fresh
  interpreter that only imports torch and svdq_format;
* per step, in this process (median of ``--repeat``): ``SVDQLinear.from_linear`` on the
  3072 × 3072 bf16 layer with ``lowrank="auto"`` (the default: randomised SVD at this size) and
  ``lowrank="svd"`` (the exact SVD that was the default before issue 26), the forward on 16
  tokens, save, lazy load, validate, dequantize; and the relative residual error ``‖W − Ŵ‖/‖W‖``
  of both low-rank methods (the quality the faster default gives up).

Wall and CPU seconds are both recorded: on a busy shared machine the wall clock stretches with
the load (and with threads spinning for a core), while the CPU seconds of a one-thread run are
about what the wall clock of an idle machine would be.

Usage: ``python benchmarks/quickstart.py [--threads 2] [--repeat 3] [--out results/quickstart_cpu.json]``.
Prints a table and writes JSON (CPU count, threads, load average before and after).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import svdq_format as sf  # noqa: E402


def readme_quickstart() -> str:
    """The Python block under README.md's ``## Quick start (Python)``."""
    text = (ROOT / "README.md").read_text()
    return re.search(r"## Quick start \(Python\).*?```python\n(.*?)```", text, re.S).group(1)


def time_readme(code: str, threads: int) -> tuple[float, float]:
    """Wall and CPU (user + system) seconds of ``python -c code`` in a fresh temporary directory,
    imports included."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory(prefix="svdq-quickstart-") as tmp:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], cwd=tmp, env=env, check=True)
        wall = time.perf_counter() - t
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def timed_runs(fn, repeat: int) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds (this process: user + system, all threads) of ``repeat`` calls."""
    walls, cpus = [], []
    for _ in range(repeat):
        c, t = time.process_time(), time.perf_counter()
        fn()
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    return walls, cpus


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "quickstart_cpu.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()

    code = readme_quickstart()
    readme = [time_readme(code, args.threads) for _ in range(args.repeat)]
    readme_wall, readme_cpu = [w for w, _ in readme], [c for _, c in readme]
    imports = [time_readme("import torch\nimport svdq_format\n", args.threads) for _ in range(args.repeat)]

    torch.manual_seed(0)
    linear = torch.nn.Linear(3072, 3072, dtype=torch.bfloat16)
    x = torch.randn(16, 3072, dtype=torch.bfloat16)
    w = linear.weight.detach().float()
    rows = []

    def step(name: str, fn, repeat: int = args.repeat) -> None:
        walls, cpus = timed_runs(fn, repeat)
        rows.append({"step": name, "wall_median_s": statistics.median(walls), "wall_min_s": min(walls),
                     "cpu_median_s": statistics.median(cpus), "wall_runs": walls, "cpu_runs": cpus})

    layers = {}
    for method in ("auto", "svd"):
        def build(method: str = method) -> None:
            layers[method] = sf.SVDQLinear.from_linear(linear, rank=32, precision="int4", lowrank=method)
        step(f"from_linear lowrank={method!r}", build, args.repeat if method == "auto" else 1)  # svd: slow
    layer = layers["auto"]
    step("forward (16 tokens)", lambda: layer(x))
    with tempfile.TemporaryDirectory(prefix="svdq-quickstart-") as tmp:
        path = Path(tmp) / "layer.safetensors"
        step("save_file", lambda: sf.save_file({"blocks.0.attn.to_q": layer}, path))
        step("load_file", lambda: sf.load_file(path))
        step("validate", lambda: sf.validate(path))
    step("dequantize", lambda: layer.dequantize())
    errors = {m: float((layers[m].dequantize().float() - w).norm() / w.norm()) for m in layers}

    result = {
        "benchmark": "quickstart",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "cpu": platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "readme_block": {"wall_median_s": statistics.median(readme_wall), "wall_min_s": min(readme_wall),
                         "cpu_median_s": statistics.median(readme_cpu), "wall_runs": readme_wall,
                         "cpu_runs": readme_cpu},
        "imports_only": {"wall_median_s": statistics.median(w for w, _ in imports),
                         "cpu_median_s": statistics.median(c for _, c in imports)},
        "steps": rows,
        "relative_weight_error": errors,
    }
    print("README Quick start (fresh interpreter, imports included): "
          f"wall median {statistics.median(readme_wall):.2f} s "
          f"(min {min(readme_wall):.2f} s), CPU median {statistics.median(readme_cpu):.2f} s; {args.repeat} runs, "
          f"{args.threads} threads; load average {load_before[0]:.2f} before, {result['loadavg_after'][0]:.2f} after, "
          f"{os.cpu_count()} CPUs")
    print(f"  of which `import torch, svdq_format` (fresh interpreter): wall median "
          f"{result['imports_only']['wall_median_s']:.2f} s, CPU median {result['imports_only']['cpu_median_s']:.2f} s")
    print(f"  {'step':<28} {'wall median s':>13} {'wall min s':>10} {'CPU median s':>12}")
    for r in rows:
        print(f"  {r['step']:<28} {r['wall_median_s']:>13.3f} {r['wall_min_s']:>10.3f} {r['cpu_median_s']:>12.3f}")
    print("  ‖W − Ŵ‖/‖W‖: " + ", ".join(f"lowrank={m!r} {e:.5f}" for m, e in errors.items()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
