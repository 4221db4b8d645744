"""``svdq demo`` (README's first command): real MiniLM quantized, reloaded, compared, validated."""

from __future__ import annotations

import collections
import re
import warnings

import pytest
import torch

from svdq_format.checkpoint import validate
from svdq_format.cli import main as svdq_main


def _demo(tmp_path, capsys, *args: str) -> tuple[str, dict[str, float]]:
    from transformers.utils import logging as hf_logging

    old, bars = torch.get_num_threads(), hf_logging.is_progress_bar_enabled()
    torch.set_num_threads(1)
    with warnings.catch_warnings():  # (under HF_HUB_DISABLE_PROGRESS_BARS=1 huggingface_hub says it keeps its own off)
        warnings.filterwarnings("ignore", "Cannot enable progress bars", UserWarning)
        hf_logging.enable_progress_bar()  # as in a fresh `svdq demo` process
    try:
        code = svdq_main(["demo", "--out", str(tmp_path / "demo"), *args])
    finally:
        torch.set_num_threads(old)
        if not bars:
            hf_logging.disable_progress_bar()
    captured = capsys.readouterr()
    out = captured.out
    assert code == 0, out
    assert "Loading weights" not in captured.err  # transformers' bar used to print between our lines
    rows = {}
    for line in out.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        for label in ("SVDQ int4", "SVDQ nvfp4", "naive W4A4", "W4A16 int4", "text encoder W4A16",
                      "text encoder W4A4", "text encoder auto"):
            if cells[0].startswith(label) and len(cells) >= 3:
                rows[label] = float(cells[1])  # mean cosine similarity to fp32
    return out, rows


@pytest.mark.slow
def test_svdq_demo_end_to_end(tmp_path, capsys):
    out, rows = _demo(tmp_path, capsys)
    # the default demo (README's first command) leaves the slower text-encoder rows to --text-encoders
    assert set(rows) == {"SVDQ int4", "SVDQ nvfp4", "naive W4A4", "W4A16 int4"}, out
    assert re.search(r"layers quantized \(W4A4 rank 32 x\d+; W4A16 x\d+\)", out), out  # the --rank default
    # SVDQ beats both baselines on real sentence embeddings; everything stays close to fp32
    assert rows["SVDQ int4"] > rows["W4A16 int4"] > rows["naive W4A4"] > 0.8
    assert rows["SVDQ nvfp4"] > rows["naive W4A4"]
    assert "svdq inspect" in out and "format_version  1" in out and "ok: " in out
    assert "bit-identical to the in-memory model" in out
    for name in ("minilm-svdq-int4.safetensors", "minilm-svdq-nvfp4.safetensors", "tiny-flux-svdq"):
        validate(tmp_path / "demo" / name)
    assert not (tmp_path / "demo" / "minilm-text-encoder-w4a16").exists()


@pytest.mark.slow
def test_svdq_demo_text_encoder_rows(tmp_path, capsys):
    out, rows = _demo(tmp_path, capsys, "--text-encoders", "--no-flux")
    assert {"text encoder W4A16", "text encoder W4A4", "text encoder auto"} <= set(rows), out
    # the text-encoder path (save_pretrained, transformers' from_pretrained): all close to fp32, above
    # the plain weight-only baseline (the text-encoder W4A16 searches its clipping)
    te = [rows[f"text encoder {m}"] for m in ("W4A16", "W4A4", "auto")]
    assert min(te) > max(rows["W4A16 int4"], 0.97)
    for mode in ("w4a16", "w4a4", "auto"):
        validate(tmp_path / "demo" / f"minilm-text-encoder-{mode}")


def test_demo_loads_minilm_without_transformers_progress_bar(capfd):
    """transformers' "Loading weights" bar printed between the demo's own lines (issue 26)."""
    from transformers.utils import logging as hf_logging

    from converters.demo import load_minilm

    was = hf_logging.is_progress_bar_enabled()
    with warnings.catch_warnings():  # (under HF_HUB_DISABLE_PROGRESS_BARS=1 huggingface_hub says it keeps its own off)
        warnings.filterwarnings("ignore", "Cannot enable progress bars", UserWarning)
        hf_logging.enable_progress_bar()  # transformers' default (another test may have turned it off)
    try:
        capfd.readouterr()
        tok, model = load_minilm()
        assert capfd.readouterr().err == ""
        assert hf_logging.is_progress_bar_enabled()  # restored
    finally:
        if not was:
            hf_logging.disable_progress_bar()
    assert model.config.hidden_size == 384 and tok("a b")["input_ids"]


@pytest.mark.usefixtures("one_torch_thread")
def test_demo_tiny_flux_is_quantized_at_the_requested_rank(tmp_path):
    """`svdq demo --rank 32` used to end with the tiny FLUX at rank 16 (a hard-coded min(rank, 16)); now
    the rank-32 budget is what is spent."""
    from converters.demo import _tiny_flux

    f = _tiny_flux(tmp_path, rank=32, log=print)
    meta = validate(f["dir"])
    w4a4 = [spec for spec in meta.layers.values() if spec.kind == "w4a4"]
    # the default recipe spends the rank-32 budget across the layers (multiples of 16, up to 4 x 32)
    assert w4a4 and all(spec.rank % 16 == 0 and spec.rank <= 128 for spec in w4a4)
    assert f["w4a4_ranks"] == dict(sorted(collections.Counter(spec.rank for spec in w4a4).items()))
    width = sum(spec.in_features + spec.out_features for spec in w4a4)
    assert 24 < f["w4a4_mean_rank"] == sum(spec.rank * (spec.in_features + spec.out_features) for spec in w4a4) / width
    assert f["w4a4_mean_rank"] <= 32 < max(spec.rank for spec in w4a4)
    assert min(min(spec.in_features, spec.out_features) for spec in w4a4) >= 128  # rank 32 is low rank here
    assert f["identical"] and f["rel_error"] < 0.05
