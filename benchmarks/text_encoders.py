"""Text encoders in the SVDQuant format: tiny T5 / CLIP plumbing fidelity, and T5-XXL memory.

**Fidelity (plumbing).** A tiny random T5 encoder (gated-GELU, 2 layers, d_model 64) and CLIP text
encoder (2 layers, width 64) are quantized W4A16 and W4A4 (rank 8) on built-in captions tokenized
with random-id calibration, written with ``save_pretrained``, loaded by transformers'
``from_pretrained``; the relative error of ``last_hidden_state`` against fp32 is measured on
held-out ids. (Real-weight fidelity: all-MiniLM-L6-v2 in ``svdq demo``.)

**Memory.**

FLUX.1's ``text_encoder_2`` is ``T5EncoderModel`` with google/t5-v1_1-xxl's config (d_model 4096,
d_ff 10240, 64 heads × 64, 24 layers, gated-GELU, vocabulary 32128). It is built on the meta
device (no memory), its linears are selected as ``svdq quantize --components text_encoder_2``
selects them, swapped for empty ``SVDQLinear`` layers of each mode, and the bytes are counted:

* **on disk**: every tensor the checkpoint stores (the tied ``encoder.embed_tokens`` copy of
  ``shared`` is not stored, as transformers does not) plus the safetensors header with its
  manifest, i.e. the size of ``model.safetensors``;
* **loaded**: every parameter and buffer of the model after ``from_pretrained`` (the tied
  embedding counted once).

    python benchmarks/text_encoders.py --threads 1 --out benchmarks/results/text_encoders_cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from converters.quantize.selection import select_layers  # noqa: E402
from svdq_format.linear import SVDQLinear  # noqa: E402
from svdq_format.model import model_metadata, replace_linears  # noqa: E402
from svdq_format.spec import LayerSpec  # noqa: E402

#: google/t5-v1_1-xxl, FLUX.1's text_encoder_2.
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
              dropout_rate=0.1, layer_norm_epsilon=1e-6, tie_word_embeddings=False)


def t5_xxl() -> nn.Module:
    from accelerate import init_empty_weights
    from transformers import T5Config, T5EncoderModel

    with init_empty_weights():
        model = T5EncoderModel(T5Config(**T5_XXL)).to(torch.bfloat16)
    model.encoder.embed_tokens = model.shared  # tied, as from_pretrained leaves them
    return model


def _unique(model: nn.Module) -> list[torch.Tensor]:
    seen: set[int] = set()
    out = []
    for t in list(model.parameters()) + [b for b in model.buffers() if b is not None]:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def sizes(model: nn.Module, *, quantized: bool) -> dict[str, int]:
    """``{"disk": bytes, "loaded": bytes, "params": count}`` of ``model`` (meta tensors)."""
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    state = {k: v for k, v in model.state_dict().items() if k not in tied}
    data = sum(t.numel() * t.element_size() for t in state.values())
    header: dict[str, Any] = {}
    offset = 0
    for k, t in state.items():
        n = t.numel() * t.element_size()
        header[k] = {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                     "data_offsets": [offset, offset + n]}
        offset += n
    if quantized:
        header["__metadata__"] = {"svdquant": json.dumps(model_metadata(model).to_json())}
    head = len(json.dumps(header, separators=(",", ":"))) + 8
    loaded = sum(t.numel() * t.element_size() for t in _unique(model))
    params = sum(t.numel() for t in model.parameters())  # (unique parameters)
    return {"disk": data + head, "loaded": loaded, "params": params}


def quantized(mode: str, rank: int) -> tuple[nn.Module, dict[str, int]]:
    model = t5_xxl()
    sel = select_layers(model, weight_only=mode == "w4a16", warn_unknown=False)
    specs = {}
    for name, kind in sel.kinds.items():
        lin = model.get_submodule(name)
        assert isinstance(lin, nn.Linear)
        specs[name] = LayerSpec(kind=kind, precision="int4", in_features=lin.in_features,
                                out_features=lin.out_features, rank=0 if kind == "w4a16" else rank,
                                dtype="bfloat16", has_bias=lin.bias is not None)
    replace_linears(model, specs, device="meta")
    counts = {"layers": len(specs), "quantized_params": sum(s.in_features * s.out_features for s in specs.values())}
    return model, counts


def tiny_fidelity(tmp: Path) -> list[dict[str, Any]]:
    import warnings

    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from converters.text_encoders import quantize_text_encoder, text_encoder_calibration
    from svdq_format.model import svdq_modules

    builds = {
        "tiny T5 (gated-GELU)": lambda: T5EncoderModel(T5Config(vocab_size=64, d_model=64, d_kv=16, d_ff=128,
                                                                  num_layers=2, num_heads=4,
                                                                  feed_forward_proj="gated-gelu")),
        "tiny CLIP text": lambda: CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=16, projection_dim=32)),
    }
    ids = {"input_ids": torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(5))}
    rows = []
    for label, make in builds.items():
        for mode in ("w4a16", "w4a4"):
            torch.manual_seed(0)
            model = make().eval()
            with torch.no_grad():
                ref = model(**ids)[0]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                calib = text_encoder_calibration(model, None, num_samples=8, max_length=12)
            from converters.quantize import QuantizeOptions

            quantize_text_encoder(model, calib, mode=mode, options=QuantizeOptions(rank=8))
            d = tmp / f"{label.split()[1]}-{mode}"
            model.save_pretrained(d)
            loaded = type(model).from_pretrained(d).eval()
            with torch.no_grad():
                y, y_mem = loaded(**ids)[0], model(**ids)[0]
            rows.append({"model": label, "mode": mode, "layers": len(svdq_modules(loaded)),
                         "rel_error": float((y - ref).norm() / ref.norm()),
                         "reload_identical": bool(torch.equal(y, y_mem))})
            print(f"{label:22s} {mode:6s} {rows[-1]['layers']:3d} layers  rel. error {rows[-1]['rel_error']:.4f}")
    return rows


def main() -> None:
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/text_encoders_cpu.json")
    ap.add_argument("--rank", type=int, default=32, help="rank of the W4A4 layers (T5-XXL)")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tiny = tiny_fidelity(Path(tmp))
    rows = [{"variant": "bf16 (dense)", **sizes(t5_xxl(), quantized=False)}]
    for mode in ("w4a16", "w4a4"):
        model, counts = quantized(mode, args.rank)
        assert all(isinstance(model.get_submodule(n), SVDQLinear) for n in model_metadata(model).layers)
        label = "W4A16 int4" if mode == "w4a16" else f"W4A4 int4, rank {args.rank}"
        rows.append({"variant": label, **counts, **sizes(model, quantized=True)})
    base = rows[0]
    print("| T5-XXL (FLUX text_encoder_2) | on disk | loaded | vs bf16 |\n| --- | --- | --- | --- |")
    for r in rows:
        r["ratio"] = base["loaded"] / r["loaded"]
        print(f"| {r['variant']} | {r['disk'] / 2**30:.2f} GiB | {r['loaded'] / 2**30:.2f} GiB | "
              f"{r['ratio']:.2f}x smaller |" if r is not base else
              f"| {r['variant']} | {r['disk'] / 2**30:.2f} GiB | {r['loaded'] / 2**30:.2f} GiB | 1x |")
    import transformers

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"),
                                          "versions": {"torch": torch.__version__,
                                                       "transformers": transformers.__version__},
                                          "tiny_fidelity": tiny, "t5_xxl": {"config": T5_XXL, "rows": rows}},
                                         indent=1) + "\n")


if __name__ == "__main__":
    main()
