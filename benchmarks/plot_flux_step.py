"""Plot ``benchmarks/flux_step.py`` results: ms per FLUX.1-dev step and transformer weights on the GPU.

    python benchmarks/plot_flux_step.py docs/img/flux_step_h100.png \\
        benchmarks/results/flux_step_h100_fast.json benchmarks/results/flux_step_h100_exact.json
"""

from __future__ import annotations

import json
import sys


def bars(results: list[dict]) -> list[tuple[str, float, float]]:
    """(label, ms per step, weights GiB) for every measured variant, bf16 first."""
    out: list[tuple[str, float, float]] = []
    seen: set[str] = set()
    for r in results:
        # the SVDQuant variants of one run (flux_step.py --weights/--prologue/... both) after "svdq"
        variants = sorted(k for k in r if k.startswith("svdq_") and isinstance(r[k], dict) and "weights_bytes" in r[k])
        for model in ("bf16", "fp8", "svdq", *variants):
            for kind in ("eager", "compiled"):
                m = r.get(model, {}).get(kind)
                if not m:
                    continue
                name = {"bf16": "bf16", "fp8": "FP8 W8A8"}.get(model) or f"SVDQuant {r.get('mode', 'fast')}"
                if model.startswith("svdq") and "weights" in r[model]:  # which GEMM weights the variant read
                    name += f" ({r[model]['weights']})"
                label = f"{name}\n{kind}" + (f"\n({m['mode']})" if kind == "compiled" else "")
                if label not in seen:
                    seen.add(label)
                    out.append((label, m["median_s"] * 1e3, r[model]["weights_bytes"] / 2**30))
    return out


def main(argv: list[str]) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dst, *srcs = argv
    results = [json.load(open(p)) for p in srcs]
    data = bars(results)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [3, 1.4]})
    labels = [d[0] for d in data]

    def color(label: str) -> str:
        return "#888" if "bf16" in label else "#57a" if "FP8" in label else "#3a7"

    a1.bar(range(len(data)), [d[1] for d in data], color=[color(lab) for lab in labels])
    fp8 = next((d[1] for d in data if d[0].startswith("FP8")), None)
    if fp8 is not None:  # issue 23: the FP8 W8A8 peer
        a1.axhline(0.95 * fp8, ls="--", c="r", lw=1, label=f"target 0.95 × FP8 W8A8 = {0.95 * fp8:.0f} ms")
    else:  # issue 10
        bf16 = next(d[1] for d in data if d[0].startswith("bf16\neager"))
        a1.axhline(0.67 * bf16, ls="--", c="r", lw=1, label=f"target 0.67 × bf16 eager = {0.67 * bf16:.0f} ms")
    for i, d in enumerate(data):
        a1.text(i, d[1], f"{d[1]:.0f}", ha="center", va="bottom", fontsize=8)
    a1.set_xticks(range(len(data)), labels, fontsize=7)
    a1.set_ylabel("ms per step (median)")
    a1.legend(fontsize=8)
    weights: dict[str, float] = {}
    for name in ("bf16", "FP8", "SVDQuant"):
        found = next((d[2] for d in data if name in d[0]), None)
        if found is not None:
            weights[name] = found
    a2.bar(list(weights), list(weights.values()), color=[color(k) for k in weights])
    a2.axhline(7.0, ls="--", c="r", lw=1, label="target 7 GiB")
    for i, v in enumerate(weights.values()):
        a2.text(i, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    a2.set_ylabel("transformer weights on the GPU (GiB)")
    a2.legend(fontsize=8)
    r0 = results[0]
    fig.suptitle(f"FLUX.1-dev-shaped transformer, 1024×1024, batch 1 — {r0['device']}, torch {r0['torch']} "
                 f"({r0['date'][:10]})", fontsize=10)
    fig.tight_layout()
    fig.savefig(dst, dpi=110)
    print(f"wrote {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
