"""Plot ``benchmarks/fast8_linear.py`` results: TFLOPS per FLUX.1 shape for every peer.

    python benchmarks/plot_fast8_linear.py docs/img/fast8_linear_h100.png \\
        benchmarks/results/fast8_linear_h100_run2.json
"""

from __future__ import annotations

import json
import sys

SERIES = [  # (key in "tflops", label, colour)
    ("bf16", "cuBLAS bf16", "#888"),
    ("fp8_row_gemm", "torch FP8 rowwise (GEMM only)", "#bbb"),
    ("fast8_gemm[g64s4fp8_128x256x128_c1x1_cooperative]", "fast8 GEMM 128x256 (ours)", "#2a6"),
    ("fast8_gemm[g64s4fp8_128x128x128_c1x1_cooperative_p1]", "fast8 GEMM 128x128 promoted", "#8c8"),
    ("fast8", "fast8 layer, eager", "#36c"),
    ("fast", "Triton fast layer, eager", "#c63"),
]


def main(argv: list[str]) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dst, src = argv
    data = json.load(open(src))
    rows = [r for r in data["rows"] if r["M"] >= 4096]
    fig, ax = plt.subplots(figsize=(11, 4.2))
    width = 0.8 / len(SERIES)
    for j, (key, label, colour) in enumerate(SERIES):
        xs = [i + (j - len(SERIES) / 2 + 0.5) * width for i in range(len(rows))]
        ax.bar(xs, [r["tflops"].get(key, 0.0) for r in rows], width, label=label, color=colour)
    ax.set_xticks(range(len(rows)), [f"{r['M']}×{r['K']}→{r['N']}" for r in rows], fontsize=8)
    ax.set_ylabel("TFLOPS (2·M·N·K / time)")
    ax.set_ylim(0, 1.3 * max(max(r["tflops"].get(k, 0.0) for k, _, _ in SERIES) for r in rows))
    ax.legend(fontsize=7, ncol=3)
    meta = data["meta"]
    ax.set_title(f"SVDQuant fast8 at FLUX.1 shapes — {meta['device']}, torch {meta['torch']} ({meta['date'][:10]})",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(dst, dpi=120)
    print(f"wrote {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
