"""Plot a ``benchmarks/gemm_datapaths.py`` result: TFLOPS per FLUX.1 shape and M, peers beside ours.

    python benchmarks/plot_gemm.py benchmarks/results/gemm_datapaths_h100.json docs/img/gemm_h100.png
"""

from __future__ import annotations

import json
import sys


def main(argv: list[str]) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    src, dst = argv
    data = json.load(open(src))
    rows = data["rows"]
    ms = sorted({r["M"] for r in rows})
    series = [("bf16", "cuBLAS bf16"), ("fp8_row_gemm", "torch FP8 rowwise (GEMM only)"),
              ("f16", "svdq f16"), ("f16t", "svdq f16t"), ("fp8t", "svdq fp8t"), ("f16s", "svdq f16s"),
              ("fp8s", "fp8s (benchmark only)")]
    series = [(k, n) for k, n in series if any(k in r["tflops"] for r in rows)]
    fig, axes = plt.subplots(1, len(ms), figsize=(5 * len(ms), 4.2), squeeze=False)
    for ax, m in zip(axes[0], ms):
        sub = [r for r in rows if r["M"] == m]
        labels = [f"{r['K']}→{r['N']}" for r in sub]
        width = 0.8 / len(series)
        for i, (key, name) in enumerate(series):
            xs = [j + (i - len(series) / 2 + 0.5) * width for j in range(len(sub))]
            ax.bar(xs, [r["tflops"].get(key, 0.0) for r in sub], width, label=name)
        ax.set_xticks(range(len(sub)), labels, rotation=30, fontsize=8)
        ax.set_title(f"M = {m} tokens")
        ax.set_ylabel("TFLOPS (2MNK / time)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"SVDQuant fast-mode GEMM vs peers, {data['meta']['device']} ({data['meta']['date'][:10]})")
    fig.tight_layout()
    fig.savefig(dst, dpi=110)
    print(f"wrote {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
