"""Several components of a diffusers pipeline in one run: ``svdq quantize PIPELINE OUT --components ...``.

``OUT`` becomes a whole pipeline directory that ``DiffusionPipeline.from_pretrained(OUT)`` loads:
the listed components quantized (the denoiser as ``svdq quantize`` does it, text encoders with
:mod:`converters.text_encoders`: W4A16, W4A4 where measured as faithful), every other component (tokenizers, scheduler,
VAE, unlisted encoders) copied as it is, ``model_index.json`` written last.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from svdq_format import jsonsafe
from svdq_format.errors import QuantizationError

from .options import QuantizeOptions
from .pipeline import QuantizeResult

__all__ = ["pipeline_components", "quantize_pipeline", "DENOISER_PREFIXES"]

#: Component names of denoisers in diffusers pipelines (``transformer``, Wan 2.2's
#: ``transformer_2``, ``unet``, Kandinsky's ``prior``).
DENOISER_PREFIXES = ("transformer", "unet", "prior")


def pipeline_components(src: str | os.PathLike[str]) -> dict[str, tuple[str, str]]:
    """``model_index.json`` of a pipeline directory: component name → (library, class name).

    Raises:
        QuantizationError: not a pipeline directory.
    """
    index = Path(src) / "model_index.json"
    if not index.is_file():
        raise QuantizationError(f"{src}: --components needs a pipeline directory (with model_index.json)")
    try:
        data = jsonsafe.loads(index.read_text())
    except ValueError as exc:
        raise QuantizationError(f"{index}: not valid JSON ({exc})") from None
    return {k: (str(v[0]), str(v[1])) for k, v in data.items()
            if not k.startswith("_") and isinstance(v, list) and len(v) == 2 and v[0] is not None}


def _kind(name: str, library: str, cls_name: str) -> str | None:
    """``"denoiser"``, ``"text_encoder"`` or None (nothing the quantizer handles)."""
    if library == "diffusers" and name.startswith(DENOISER_PREFIXES):
        return "denoiser"
    if library == "transformers":
        import transformers

        cls = getattr(transformers, cls_name, None)
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return "text_encoder"
    return None


def resolve_components(src: str | os.PathLike[str], requested: Sequence[str]) -> dict[str, str]:
    """The components to quantize (``"all"``: every denoiser and text encoder) → their kind.

    Raises:
        QuantizationError: a name not in the pipeline, or a component that is neither a denoiser
            nor a transformers text encoder (one line naming it).
    """
    index = pipeline_components(src)
    kinds = {n: _kind(n, lib, cls) for n, (lib, cls) in index.items()}
    names = [n for n in index if kinds[n]] if list(requested) == ["all"] else list(dict.fromkeys(requested))
    out: dict[str, str] = {}
    for n in names:
        if n not in index:
            raise QuantizationError(f"{src}: the pipeline has no component {n!r} (it has {', '.join(index)})")
        kind = kinds[n]
        if kind is None:
            lib, cls = index[n]
            raise QuantizationError(f"{src}: component {n!r} ({lib} {cls}) is neither a denoiser nor a "
                                    "transformers text encoder: nothing to quantize")
        if not (Path(src) / n).is_dir():
            raise QuantizationError(f"{src}: component folder {n}/ is missing")
        out[n] = kind
    if not out:
        raise QuantizationError(f"{src}: no component to quantize")
    return out


def _tokenizer_for(src: Path, name: str, index: Mapping[str, tuple[str, str]]) -> Any:
    """The tokenizer paired with text encoder ``name`` (``text_encoder_2`` ↔ ``tokenizer_2``)."""
    tok_name = "tokenizer" + name[len("text_encoder"):] if name.startswith("text_encoder") else None
    if tok_name is None or tok_name not in index or not (src / tok_name).is_dir():
        return None
    import transformers

    cls = getattr(transformers, index[tok_name][1], None) or transformers.AutoTokenizer
    return cls.from_pretrained(src / tok_name)


def quantize_pipeline(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    components: Sequence[str],
    *,
    prompts: Sequence[str] | None = None,
    num_samples: int = 8,
    pipeline_kwargs: Mapping[str, Any] | None = None,
    options: QuantizeOptions | None = None,
    text_encoder_mode: str = "auto",
    dtype: str = "bfloat16",
    device: str | None = None,
    offload: str | bool = "auto",
    progress: bool = True,
    keep_state: bool = False,
    max_shard_size: int | str = "10GB",
) -> dict[str, QuantizeResult]:
    """Quantize the listed components of the pipeline in ``src``; write the whole pipeline to ``out``.

    Args:
        src: Local diffusers pipeline directory (``model_index.json``).
        out: Output pipeline directory.
        components: Component names (``["transformer", "text_encoder_2"]``) or ``["all"]``.
        prompts: Calibrate the denoiser by running the pipeline on these prompts, and the text
            encoders on them; without, the denoiser gets synthetic inputs and the encoders
            built-in captions.
        num_samples: Calibration samples per component.
        pipeline_kwargs: With ``prompts``: keyword arguments of the pipeline calls.
        options: Quantizer options (the denoiser's; text encoders get them made weight-only in
            ``w4a16`` mode).
        text_encoder_mode: ``"auto"`` (default: W4A16, W4A4 where measured as faithful), ``"w4a16"`` or
            ``"w4a4"`` (:func:`converters.text_encoders.quantize_text_encoder`).
        dtype: Load/compute dtype.
        device: Compute device.
        offload: The denoiser's block streaming (see :func:`run_quantization`).
        progress: tqdm bars.
        keep_state: Keep each component's resume state.
        max_shard_size: Largest weight file.

    Returns:
        Component name → its :class:`QuantizeResult` (with the fidelity report; each component
        also gets ``OUT/<name>/fidelity.json``).

    Raises:
        QuantizationError: one line (bad directory, unknown component, calibration or load error).
    """
    import torch

    from ..text_encoders import quantize_text_encoder, text_encoder_calibration
    from .directory import FIDELITY_NAME, STATE_DIR, quantize_directory
    from .source import DTYPES, loading_bars

    src_dir, out_dir = Path(src), Path(out)
    kinds = resolve_components(src_dir, components)
    index = pipeline_components(src_dir)
    if dtype not in DTYPES:
        raise QuantizationError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    if out_dir.resolve() == src_dir.resolve():
        raise QuantizationError(f"{out_dir}: the output must be another directory than the pipeline")
    opts = options or QuantizeOptions()
    out_dir.mkdir(parents=True, exist_ok=True)
    for entry in sorted(src_dir.iterdir()):  # everything not quantized, as it is
        if entry.name in kinds or entry.name == "model_index.json":
            continue
        if entry.is_dir():
            shutil.copytree(entry, out_dir / entry.name, dirs_exist_ok=True)
        else:
            shutil.copy2(entry, out_dir / entry.name)
    results: dict[str, QuantizeResult] = {}
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    for name, kind in kinds.items():
        start = time.time()
        if kind == "denoiser":
            results[name] = quantize_directory(
                src_dir if prompts else src_dir / name, out_dir / name, prompts=prompts, num_samples=num_samples,
                pipeline_kwargs=pipeline_kwargs, options=opts, dtype=dtype, device=dev, offload=offload,
                progress=progress, keep_state=keep_state, max_shard_size=max_shard_size)
            continue
        import transformers

        cls = getattr(transformers, index[name][1])
        try:
            with loading_bars(progress):
                encoder = cls.from_pretrained(src_dir / name, dtype=DTYPES[dtype]).eval()
                tokenizer = _tokenizer_for(src_dir, name, index)
        except Exception as exc:
            raise QuantizationError(f"{src_dir / name}: cannot load {cls.__name__} "
                                    f"({' '.join(str(exc).split())[:200]})") from None
        calib = text_encoder_calibration(encoder, tokenizer, prompts=prompts, num_samples=num_samples,
                                         seed=opts.seed)
        state = out_dir / name / STATE_DIR
        result = quantize_text_encoder(encoder.to(dev), calib, mode=text_encoder_mode, options=opts, device=dev,
                                       state_dir=state, progress=progress)
        results[name] = result
        if not result.complete:
            continue
        save: Any = getattr(result.model.to("cpu"), "save_pretrained")  # the svdquant writer (instance attribute)
        save(out_dir / name, max_shard_size=max_shard_size)
        result.report.timings["wall"] = round(time.time() - start, 3)
        result.report.save(out_dir / name / FIDELITY_NAME)
        if not keep_state:
            shutil.rmtree(state, ignore_errors=True)
    if all(r.complete for r in results.values()):
        shutil.copy2(src_dir / "model_index.json", out_dir / "model_index.json")  # last: OUT is a pipeline now
    return results
