"""Calibration inputs of a text encoder: tokenized captions (or random token ids without a tokenizer)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from svdq_format.errors import QuantizationError

from ..quantize.calibration import CalibrationSet

__all__ = ["CAPTIONS", "text_encoder_calibration"]

#: Built-in image captions (varied subjects, styles and lengths) used when no prompts are given.
CAPTIONS: tuple[str, ...] = (
    "a photograph of an astronaut riding a horse on the moon, highly detailed",
    "a cozy wooden cabin in a snowy pine forest at dusk, warm light in the windows",
    "portrait of an elderly fisherman with a weathered face, black and white, 85mm",
    "a bowl of ramen with a soft-boiled egg, steam rising, top-down food photography",
    "an isometric illustration of a futuristic city with flying cars and neon signs",
    "watercolor painting of a fox sleeping under a cherry blossom tree",
    "a red vintage sports car parked on a cobblestone street in Paris, golden hour",
    "macro shot of a dew drop on a spider web, bokeh background",
    "a minimalist logo of a mountain and a river, flat vector, two colors",
    "oil painting of a stormy sea with a lighthouse, dramatic clouds, in the style of Turner",
    "a cute robot watering plants in a greenhouse, 3d render, soft lighting",
    "aerial view of terraced rice fields in the morning mist",
    "a medieval knight in shining armor holding a banner that says 'HELLO WORLD'",
    "children playing football on a dusty street, documentary photo",
    "a glass of orange juice on a marble table next to a croissant",
    "a cyberpunk girl with glowing headphones in the rain, anime style",
)


def text_encoder_calibration(
    encoder: nn.Module,
    tokenizer: Any = None,
    *,
    prompts: Sequence[str] | None = None,
    num_samples: int = 8,
    max_length: int | None = None,
    seed: int = 0,
) -> CalibrationSet:
    """Forward inputs of ``encoder``: each sample is one prompt, tokenized as pipelines do
    (padded to the encoder's length, ``input_ids`` only).

    Args:
        encoder: The transformers text encoder.
        tokenizer: Its tokenizer; without one, random token ids in the vocabulary (a warning says so).
        prompts: Texts to encode (default :data:`CAPTIONS`).
        num_samples: Samples (prompts are cycled through).
        max_length: Tokens per sample (default: the tokenizer's ``model_max_length``, at most 256).
        seed: Seed of the random ids (no tokenizer).

    Raises:
        QuantizationError: empty prompt list; no tokenizer and no ``vocab_size`` in the config.
    """
    texts = list(prompts) if prompts is not None else list(CAPTIONS)
    if not texts:
        raise QuantizationError("no prompts given for text-encoder calibration")
    texts = [texts[i % len(texts)] for i in range(num_samples)]
    if tokenizer is not None:
        limit = int(getattr(tokenizer, "model_max_length", 77) or 77)
        n = max_length or min(limit, 256)
        samples = [{"input_ids": tokenizer(t, padding="max_length", max_length=n, truncation=True,
                                           return_tensors="pt").input_ids} for t in texts]
        return CalibrationSet(samples, source="captions" if prompts is None else "prompts")
    import warnings

    cfg = getattr(encoder, "config", None)
    vocab = getattr(cfg, "vocab_size", None) or getattr(getattr(cfg, "text_config", None), "vocab_size", None)
    if not vocab:
        raise QuantizationError(f"{type(encoder).__name__}: no tokenizer and no vocab_size: cannot make "
                                "calibration ids")
    warnings.warn(f"{type(encoder).__name__}: no tokenizer: calibrating on random token ids (lower quality)",
                  UserWarning, stacklevel=2)
    gen = torch.Generator().manual_seed(seed)
    n = max_length or 64
    return CalibrationSet([{"input_ids": torch.randint(0, int(vocab), (1, n), generator=gen)}
                           for _ in range(num_samples)], source="random ids")
