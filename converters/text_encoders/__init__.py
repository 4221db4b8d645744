"""A pipeline's text encoders (transformers models: T5, CLIP, Qwen2.5-VL, Gemma ...) in the SVDQuant format.

Same quantizer, same checkpoint format as the denoiser; the defaults differ: **W4A16** (4-bit
weights, 16-bit activations) for every linear of the encoder's repeated blocks, because a text
encoder runs once per prompt (its activations cost nothing) while its weights are a large share
of the pipeline (FLUX's T5-XXL is 9.5 GB in bf16); **W4A4** (``mode="w4a4"``: smoothing + low-rank
branch) where its fidelity holds (docs/quantization.md measures it). Calibration runs the encoder
on tokenized captions (the prompts given, or :data:`CAPTIONS`). The quantized encoder loads with
transformers' own ``from_pretrained`` (:mod:`svdq_format.transformers`).
"""

from .calibration import CAPTIONS, text_encoder_calibration
from .quantize import MODES, quantize_text_encoder, text_encoder_options

__all__ = ["CAPTIONS", "MODES", "quantize_text_encoder", "text_encoder_calibration", "text_encoder_options"]
