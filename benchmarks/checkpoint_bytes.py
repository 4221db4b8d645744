"""Every kind of file svdquant writes, from one fixed recipe, as sha256 hashes: run it on two
checkouts and compare, to show that a change (a refactor) leaves the written bytes alone.

The recipe runs on the CPU in a minute: a tiny random FLUX transformer saved by diffusers, then
``svdq quantize`` (one file; disk offload with shards; GPTQ on 2 processes; nvfp4, weight-only),
``load_pretrained`` → ``save_pretrained`` (sharded) / ``save_single_file``, diffusers'
``from_pretrained`` → ``save_pretrained``, the layer file API (``save_file``), ``svdq lora``
(a PEFT LoRA → delta file), ``svdq extract-lora``, the ``nunchaku_lite`` export (a random
tiny model quantized by default settings is no Nunchaku checkpoint; tests/test_nunchaku.py
checks those converters' bytes against an independent packer), and a tiny SD3 pipeline
(tests/quantize_fixtures.py) through ``svdq quantize --components`` (transformer and two text
encoders: transformers' ``model.safetensors``) and ``DiffusionPipeline.from_pretrained`` →
``save_pretrained``. Only public entry points (the
``svdq`` CLI, the packages' top-level API, ``quantize_directory``) are used, so the same script
runs on an older checkout::

    python benchmarks/checkpoint_bytes.py --out after.json
    PYTHONPATH=/path/to/other/checkout python benchmarks/checkpoint_bytes.py --out before.json
    diff before.json after.json

``fidelity.json`` is hashed without its timings and memory figures (they change run to run); a
safetensors file's ``__metadata__`` keys are hashed sorted (safetensors' writer orders them
differently in every process: ``svdq extract-lora``'s file); the files are
written under one fixed ``--workdir`` (the quantizer records its source path).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

VOLATILE = ("timings", "total_seconds", "environment", "peak_memory_bytes")


def _digest(path: Path) -> str:
    if path.name == "fidelity.json":
        obj = json.loads(path.read_text())
        for key in VOLATILE:
            obj.pop(key, None)
        return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()
    data = path.read_bytes()
    if path.suffix == ".safetensors":
        # safetensors' own writer orders ``__metadata__`` as a Rust HashMap iterates, which changes
        # from process to process: those keys are hashed sorted (the tensors' order, offsets,
        # dtypes, shapes and every data byte as written)
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + n])
        header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
        data = json.dumps(header).encode() + data[8 + n:]
    return hashlib.sha256(data).hexdigest()


def _hashes(root: Path, where: Path) -> dict[str, str]:
    files = [where] if where.is_file() else sorted(p for p in where.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): _digest(p) for p in files}


def _svdq(*args: str) -> None:
    code = "import sys; from svdq_format.cli import main; sys.exit(main(sys.argv[1:]))"
    done = subprocess.run([sys.executable, "-c", code, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
    if done.returncode:
        raise RuntimeError(f"svdq {args[0]}: " + (done.stderr.strip().splitlines() or ["?"])[-1])


def _tiny_flux(seed: int):
    import torch
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                  attention_head_dim=32, num_attention_heads=4, joint_attention_dim=128,
                                  pooled_projection_dim=64, axes_dims_rope=[8, 8, 16])


def run(root: Path) -> dict[str, str]:
    """Write everything under ``root``; ``{relative path: sha256}`` (a failed step: its error)."""
    import torch
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file as st_save

    import svdq_format as sf

    errors: dict[str, str] = {}

    def step(name: str, fn, *args, **kwargs) -> None:
        try:
            fn(*args, **kwargs)
        except Exception as exc:  # recorded: the same failure on both checkouts compares equal
            errors[f"{name} (failed)"] = f"{type(exc).__name__}: {exc}".replace(str(root), "ROOT")

    src, tuned, q = root / "dense", root / "tuned", root / "q"
    _tiny_flux(0).save_pretrained(src)
    _tiny_flux(1).save_pretrained(tuned)
    cpu = ("--device", "cpu", "--num-samples", "2", "-q")
    step("q", _svdq, "quantize", str(src), str(q), "--dtype", "bfloat16", "--rank", "16", *cpu)
    step("q_disk", _svdq, "quantize", str(src), str(root / "q_disk"), "--dtype", "bfloat16", "--rank", "8",
         "--offload", "disk", "--max-shard-size", "200KB", *cpu)
    # --gptq needs 16 rows per layer (the AdaLN linears see one per sample): 16 samples
    step("q_gptq2", _svdq, "quantize", str(src), str(root / "q_gptq2"), "--dtype", "float32", "--rank", "8",
         "--gptq", "--gpus", "2", "--device", "cpu", "--num-samples", "16", "-q")
    step("q_nvfp4", _svdq, "quantize", str(src), str(root / "q_nvfp4"), "--dtype", "bfloat16", "--rank", "16",
         "--precision", "nvfp4", "--no-smoothing", *cpu)
    step("q_w4a16", _svdq, "quantize", str(src), str(root / "q_w4a16"), "--dtype", "float16", "--weight-only", *cpu)

    def python_api() -> None:
        model = sf.load_pretrained(q)
        sf.save_pretrained(model, root / "resaved_sharded", max_shard_size="150KB")
        sf.save_single_file(model, root / "single.safetensors")
        sf.save_pretrained(sf.load_pretrained(root / "single.safetensors", dtype=torch.float16), root / "resaved_f16")
        FluxTransformer2DModel.from_pretrained(root / "q_disk").save_pretrained(root / "diffusers_resaved",
                                                                                max_shard_size="150KB")
        layers = {n: m for n, m in model.named_modules() if isinstance(m, sf.SVDQLinear)}
        sf.save_file(dict(list(layers.items())[:3]), root / "layers.safetensors", metadata={"note": "three layers"})
        gen = torch.Generator().manual_seed(5)
        lora = {}
        for name in ("transformer_blocks.0.attn.to_q", "single_transformer_blocks.1.proj_mlp", "proj_out"):
            lin = dict(model.named_modules())[name]
            lora[f"transformer.{name}.lora_A.weight"] = torch.randn(4, lin.in_features, generator=gen) * 0.05
            lora[f"transformer.{name}.lora_B.weight"] = torch.randn(lin.out_features, 4, generator=gen) * 0.05
        st_save(lora, str(root / "lora.safetensors"))

    step("python API", python_api)
    step("lora", _svdq, "lora", str(q), f"{root / 'lora.safetensors'}:0.7", "--out", str(root / "delta.safetensors"))
    step("extract-lora", _svdq, "extract-lora", str(src), str(tuned), "--rank", "4", "--exact",
         "--out", str(root / "extracted.safetensors"))
    def q_lite() -> None:  # what nunchaku_lite can express: no shifted activations, plain AWQ modulation layers
        from converters.quantize import QuantizeOptions
        from converters.quantize.directory import quantize_directory

        opts = QuantizeOptions(rank=16, unsigned_acts=False, smoothing=False, w4a16_rank=0,
                               exclude=["norm_out.linear"])
        quantize_directory(src, root / "q_lite", options=opts, num_samples=2, dtype="bfloat16", device="cpu",
                           progress=False)

    step("q_lite", q_lite)
    step("to nunchaku-lite", _svdq, "convert", "--to", "nunchaku-lite", str(root / "q_lite"), str(root / "lite"))

    def pipeline() -> None:  # svdq quantize --components: transformers' model.safetensors, and its loader
        from diffusers import DiffusionPipeline

        _fixtures().tiny_sd3_pipeline(wide_text_encoders=True).save_pretrained(root / "pipe_dense")
        (root / "prompts.txt").write_text("a red cat\nblue sky over the sea\n")
        _svdq("quantize", str(root / "pipe_dense"), str(root / "pipe_q"), "--components",
              "transformer,text_encoder,text_encoder_3", "--prompts", str(root / "prompts.txt"), "--steps", "2",
              "--num-samples", "2", "--rank", "8", "--alphas", "0.5", "--dtype", "float32", "-q")
        DiffusionPipeline.from_pretrained(root / "pipe_q").save_pretrained(root / "pipe_resaved")

    step("pipeline", pipeline)

    out: dict[str, str] = dict(errors)
    for name in ("q", "q_disk", "q_gptq2", "q_nvfp4", "q_w4a16", "q_lite", "resaved_sharded", "single.safetensors",
                 "resaved_f16", "diffusers_resaved", "layers.safetensors", "delta.safetensors",
                 "extracted.safetensors", "lite", *(f"{d}/{c}" for d in ("pipe_q", "pipe_resaved")
                                                     for c in ("transformer", "text_encoder", "text_encoder_3"))):
        if (root / name).exists():
            out.update(_hashes(root, root / name))
    return out


def _fixtures():
    """tests/quantize_fixtures.py of the checkout whose ``svdq_format`` is imported (the tiny pipeline)."""
    import importlib.util

    import svdq_format

    path = Path(svdq_format.__file__).resolve().parents[1] / "tests" / "quantize_fixtures.py"
    spec = importlib.util.spec_from_file_location("svdq_checkpoint_bytes_fixtures", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="checkpoint_bytes.json")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "svdq-checkpoint-bytes"),
                    help="where the files are written (emptied first, removed after): the same path on both "
                         "checkouts, since the quantizer records its source path in the metadata")
    args = ap.parse_args(argv)
    root = Path(args.workdir)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    os.environ["SVDQ_CACHE"] = str(root / "cache")
    try:
        hashes = run(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    Path(args.out).write_text(json.dumps(hashes, indent=1, sort_keys=True) + "\n")
    for name, digest in sorted(hashes.items()):
        print(f"{digest[:16]}  {name}")
    print(f"{len(hashes)} files; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
