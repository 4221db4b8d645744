"""``--offload disk``: the model is built on the meta device and each block is read from the
source safetensors shards when needed; the checkpoint is byte-identical to loading the model."""

from __future__ import annotations

import pytest
import torch

from converters.quantize import QuantizeOptions
from converters.quantize.directory import quantize_directory
from converters.quantize.streaming import load_lazy
from svdq_format.errors import QuantizationError
from svdq_format.linear import SVDQLinear
from tests.quantize_fixtures import tiny_flux

pytestmark = [pytest.mark.filterwarnings("ignore:calibrating on synthetic:UserWarning"),
              pytest.mark.usefixtures("one_torch_thread")]


def test_lazy_model_reads_only_what_lies_outside_the_blocks(tmp_path):
    ref = tiny_flux(2, 2)
    ref.save_pretrained(tmp_path / "src", max_shard_size="50KB")
    assert len(list((tmp_path / "src").glob("*.safetensors"))) > 3
    model, source = load_lazy(tmp_path / "src", dtype=torch.float32)
    loaded = {n for n, p in model.named_parameters() if not p.is_meta}
    assert loaded and all(not n.startswith(("transformer_blocks.", "single_transformer_blocks.")) for n in loaded)
    assert all(p.is_meta for p in model.transformer_blocks.parameters())
    assert torch.equal(model.x_embedder.weight, ref.x_embedder.weight)
    block = model.single_transformer_blocks[1]
    source.materialize(block, "single_transformer_blocks.1")
    assert torch.equal(block.proj_out.weight, ref.single_transformer_blocks[1].proj_out.weight)


def test_disk_streaming_writes_the_byte_identical_checkpoint(tmp_path):
    tiny_flux(2, 2).save_pretrained(tmp_path / "src", max_shard_size="50KB")
    opts = QuantizeOptions(rank=8, alphas=(0.5,))
    seen: list[int] = []

    import converters.quantize.directory as directory
    import converters.quantize.streaming as streaming

    real = streaming.ShardedSource.materialize

    def spy(self, module, prefix, device="cpu"):  # how many blocks hold real weights at once
        real(self, module, prefix, device)
        model = spy.model
        live = sum(any(not p.is_meta for p in b.parameters())
                   for lst in (model.transformer_blocks, model.single_transformer_blocks) for b in lst)
        seen.append(live)

    real_load = streaming.load_lazy

    def load(src, *, dtype):
        model, source = real_load(src, dtype=dtype)
        spy.model = model
        return model, source

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(streaming.ShardedSource, "materialize", spy)
        mp.setattr(directory, "load_lazy", load)  # (where quantize_directory looks it up)
        res = quantize_directory(tmp_path / "src", tmp_path / "disk", num_samples=2, options=opts, dtype="float32",
                                 device="cpu", offload="disk", progress=False)
    assert res.complete and isinstance(res.model.transformer_blocks[0].attn.to_q, SVDQLinear)
    assert max(seen[:8]) == 1  # calibration: one block materialised at a time
    quantize_directory(tmp_path / "src", tmp_path / "full", num_samples=2, options=opts, dtype="float32",
                       device="cpu", offload="none", progress=False)
    for name in ("diffusion_pytorch_model.safetensors", "config.json"):
        assert (tmp_path / "disk" / name).read_bytes() == (tmp_path / "full" / name).read_bytes()
    with pytest.raises(QuantizationError, match="--offload disk reads the transformer from SRC"):
        quantize_directory(tmp_path / "src", tmp_path / "x", prompts=["a cat"], offload="disk")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_block_read_onto_the_gpu_equals_the_cpu_read(tmp_path, dtype):
    """fp32 source shards: the cast runs on the GPU and rounds exactly like the CPU's."""
    from converters.quantize.streaming import ShardedSource

    tiny_flux(2, 2).save_pretrained(tmp_path / "src", max_shard_size="50KB")
    source = ShardedSource(tmp_path / "src", dtype)
    names = [n for n in source.files if n.startswith("transformer_blocks.1.")]
    cpu = source.tensors(names, "cpu")
    gpu = source.tensors(names, "cuda")
    assert set(gpu) == set(cpu)
    for n in names:
        assert gpu[n].is_cuda and gpu[n].dtype == cpu[n].dtype == dtype, n
        assert torch.equal(gpu[n].cpu(), cpu[n]), n
