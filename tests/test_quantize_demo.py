"""``svdq demo`` (README's first command): real MiniLM quantized, reloaded, compared, validated."""

from __future__ import annotations

import re

import pytest
import torch

from svdq_format.cli import main as svdq_main
from svdq_format.io import validate


@pytest.mark.slow
def test_svdq_demo_end_to_end(tmp_path, capsys):
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = svdq_main(["demo", "--out", str(tmp_path / "demo")])
    finally:
        torch.set_num_threads(old)
    out = capsys.readouterr().out
    assert code == 0, out
    rows = {}
    for line in out.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        for label in ("SVDQ int4", "SVDQ nvfp4", "naive W4A4", "W4A16 int4", "text encoder W4A16",
                      "text encoder W4A4"):
            if cells[0].startswith(label) and len(cells) >= 3:
                rows[label] = float(cells[1])  # mean cosine similarity to fp32
    assert set(rows) == {"SVDQ int4", "SVDQ nvfp4", "naive W4A4", "W4A16 int4", "text encoder W4A16",
                         "text encoder W4A4"}, out
    # the text-encoder path (save_pretrained, transformers' from_pretrained): both close to fp32, above
    # the plain weight-only baseline (the text-encoder W4A16 searches its clipping)
    assert min(rows["text encoder W4A4"], rows["text encoder W4A16"]) > max(rows["W4A16 int4"], 0.97)
    # SVDQ beats both baselines on real sentence embeddings; everything stays close to fp32
    assert rows["SVDQ int4"] > rows["W4A16 int4"] > rows["naive W4A4"] > 0.8
    assert rows["SVDQ nvfp4"] > rows["naive W4A4"]
    assert "svdq inspect" in out and "format_version  1" in out and "ok: " in out
    assert "bit-identical to the in-memory model" in out
    for name in ("minilm-svdq-int4.safetensors", "minilm-svdq-nvfp4.safetensors", "tiny-flux-svdq"):
        validate(tmp_path / "demo" / name)
