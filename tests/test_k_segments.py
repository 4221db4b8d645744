"""Format 2: per-K-segment activation handling (``k_segments``), everything that touches a layer.

The spec and its version rules, the reference math (against an independent sum of plain layers
and against the plain layer on a shifted input), SVDQLinear, save/load/validate/inspect, sharded
``save_pretrained`` + stock ``from_pretrained``, q|k|v fusion, LoRA attach/unload, and the
kernel registry's refusal (so Hopper falls back to the reference).
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import svdq_format as sf
from svdq_format import ops, spec
from svdq_format.checkpoint import load_file, validate
from svdq_format.errors import ManifestError, UnsupportedError, VersionError
from svdq_format.fusion import fuse_layers, split_layer
from svdq_format.io import read_metadata, save_file
from svdq_format.spec import FormatMetadata, KSegment, LayerSpec
from svdq_format.summary import format_summary, summarize
from tests.quantize_fixtures import tiny_flux, tiny_flux_inputs

SHIFT = 0.171875
SEGS = (KSegment(128), KSegment(192, SHIFT, True))


def _layer(precision="int4", *, dtype=torch.float32, segments=SEGS, rank=8, bias=True, seed=0, n=96):
    """A random layer with ``segments`` (nvfp4: each segment its own tensor scale)."""
    torch.manual_seed(seed)
    k = sum(s.size for s in segments) if segments else 320
    if precision == "nvfp4":
        segments = tuple(dataclasses.replace(s, act_unsigned=False) for s in segments)
    layer = sf.SVDQLinear(k, n, rank=rank, precision=precision, dtype=dtype, bias=bias, k_segments=segments)
    with torch.no_grad():
        layer.smooth.copy_(torch.rand(k) + 0.5)
        if rank:
            layer.lora_down.normal_(0, 0.05)
            layer.lora_up.normal_(0, 0.05)
        if bias:
            layer.bias.normal_(0, 0.1)
        w = torch.randn(n, k)
        w[:, 128:] *= 4.0  # the halves differ in range: nvfp4 tensor scales differ
        layer.set_residual(w)
    return layer


def _input(m=7, k=320, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    x[:, 128:] = torch.nn.functional.gelu(2 * x[:, 128:], approximate="tanh")  # the MLP half: post-GELU
    return x


def _part(layer, lo, hi, index, segment):
    """The plain layer computing ``layer``'s 4-bit branch on input channels [lo, hi) (no low-rank
    branch, no bias)."""
    g = layer.group_size
    part = sf.SVDQLinear(hi - lo, layer.out_features, rank=0, precision=layer.precision, dtype=layer.dtype,
                         bias=False, act_shift=segment.act_shift, act_unsigned=segment.act_unsigned)
    with torch.no_grad():
        part.qweight.copy_(layer.qweight[:, lo // 2 : hi // 2])
        part.wscales.copy_(layer.wscales[:, lo // g : hi // g])
        part.smooth.copy_(layer.smooth[lo:hi])
        if layer.wtscale is not None:
            part.wtscale.copy_(layer.wtscale[index])
    return part


@pytest.mark.parametrize("precision", ["int4", "nvfp4"])
def test_exact_forward_is_the_sum_of_its_segments(precision):
    layer = _layer(precision)
    x = _input()
    lo, parts = 0, []
    for i, seg in enumerate(layer.k_segments):
        parts.append(_part(layer, lo, lo + seg.size, i, seg)(x[:, lo : lo + seg.size]))
        lo += seg.size
    branch = (x @ layer.lora_down.T) @ layer.lora_up.T + layer.bias
    want = parts[0] + parts[1] + branch
    layer.mode = "exact"
    got = layer(x)
    assert (got - want).abs().max() <= 2e-6 * want.abs().max()
    # the unsigned codes matter: the same layer read as plain signed differs
    plain = dataclasses.replace(layer.spec, k_segments=())
    other = sf.SVDQLinear.from_spec(plain)
    other.load_state_dict(layer.state_dict() if precision == "int4" else {
        **layer.state_dict(), "wtscale": layer.wtscale[0]})
    assert (other(x) - want).abs().max() > 1e-3 * want.abs().max()


@pytest.mark.parametrize("mode", ["fast", "fast8"])
def test_fp8_modes_quantize_the_whole_unshifted_row(mode):
    """FP8 modes: one per-token scale over the unshifted x̂ = x · (1/s), all segments together, and
    each segment's shift as a bias (``ops.fp8_bias``): the plain, unshifted layer with that bias
    computes the same bits (low-rank branch included: it sees the raw x either way)."""
    layer = _layer("int4")
    plain = sf.SVDQLinear.from_spec(dataclasses.replace(layer.spec, k_segments=()))
    plain.load_state_dict(layer.state_dict())
    layer.mode = plain.mode = mode
    act = "fp8w" if mode == "fast8" else "fp8"
    bias = ops.fp8_bias(layer.qweight, layer.wscales, None, layer.smooth, layer.bias, "int4", act,
                        k_segments=layer.k_segments, dtype=layer.dtype)
    assert bias is not None and not torch.equal(bias, layer.bias)
    with torch.no_grad():
        plain.bias.copy_(bias)
    x = _input()
    assert torch.equal(layer(x), plain(x))


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_nvfp4_segments_keep_their_own_tensor_scale(mode):
    """Each segment's 4-bit partial sum is scaled by its own tensor scale: the output is linear in
    ``wtscale[1]``, and with it at 0 only segment 0 (and the low-rank branch, bias) remain."""
    layer = _layer("nvfp4")
    assert layer.wtscale.shape == (2,) and layer.wtscale[0] != layer.wtscale[1]
    assert layer.spec.to_json()["k_segments"] == [{"size": 128}, {"size": 192, "act_shift": SHIFT}]
    layer.mode = mode
    x = _input()
    t = float(layer.wtscale[1])

    def out(t1):
        with torch.no_grad():
            layer.wtscale[1] = t1
        return layer(x)

    y0, y1, y2 = out(0.0), out(t), out(2 * t)
    assert (y1 - y0).abs().max() > 0.1 * y1.abs().max()
    assert ((y2 - y1) - (y1 - y0)).abs().max() <= 1e-5 * y1.abs().max()
    if mode == "exact":
        first = _part(layer, 0, 128, 0, layer.k_segments[0])(x[:, :128])
        branch = (x @ layer.lora_down.T) @ layer.lora_up.T + layer.bias
        assert (y0 - first - branch).abs().max() <= 1e-5 * y0.abs().max()


def test_spec_json_round_trip_and_checks():
    s = LayerSpec(kind="w4a4", precision="int4", in_features=320, out_features=96, rank=8, dtype="bfloat16",
                  has_bias=True, k_segments=SEGS)
    assert LayerSpec.from_json(s.to_json()) == s and s.features == {"k_segments"}
    assert spec.expected_tensors(dataclasses.replace(s, precision="nvfp4", k_segments=(
        KSegment(128), KSegment(192, SHIFT))))["wtscale"] == (("float32",), (2,))
    bad = {
        "sum": (dict(k_segments=(KSegment(128), KSegment(128))), "sum to 256, not in_features 320"),
        "group": (dict(k_segments=(KSegment(100), KSegment(220))), "multiple of the int4 group size 64"),
        "one": (dict(k_segments=(KSegment(320),)), "two or more"),
        "layer-shift": (dict(act_shift=SHIFT), "per segment, not for the whole layer"),
        "w4a16": (dict(kind="w4a16"), "only apply to w4a4"),
        "nvfp4-unsigned": (dict(precision="nvfp4"), "act_unsigned is only defined for int4"),
        "nan": (dict(k_segments=(KSegment(128), KSegment(192, float("nan")))), "finite number"),
    }
    for case, (change, needle) in bad.items():
        with pytest.raises(ManifestError, match=needle):
            dataclasses.replace(s, **change).check()
        assert case
    entry = s.to_json()
    entry["k_segments"][1]["size"] = "192"
    with pytest.raises(ManifestError, match="'size' must be int"):
        LayerSpec.from_json(entry)
    with pytest.raises(ManifestError, match="'k_segments' must be array"):
        LayerSpec.from_json({**s.to_json(), "k_segments": {"size": 320}})


def test_version_rules(tmp_path):
    plain = LayerSpec(kind="w4a4", precision="int4", in_features=320, out_features=96, rank=8)
    seg = dataclasses.replace(plain, k_segments=SEGS)
    v1 = FormatMetadata(layers={"a": plain}).to_json()
    assert v1["format_version"] == 1 and "features" not in v1  # what every reader reads
    v2 = FormatMetadata(layers={"a": plain, "b": seg}).to_json()
    assert v2["format_version"] == 2 and v2["features"] == ["k_segments"]
    assert FormatMetadata.from_json(v2).layers["b"] == seg
    # a writer must declare the feature (and the version): else the file is refused
    for broken in ({**v2, "features": []}, {**v2, "format_version": 1}):
        with pytest.raises(ManifestError, match="b: uses k_segments, which needs format_version >= 2"):
            FormatMetadata.from_json(broken)
    # a reader that predates a feature refuses the file with one line naming it
    with pytest.raises(VersionError, match="format feature 'k_tiles'") as info:
        FormatMetadata.from_json({**v2, "features": ["k_segments", "k_tiles"]})
    assert "\n" not in str(info.value)
    with pytest.raises(VersionError, match=r"format_version 3 \(features: k_tiles\)"):
        FormatMetadata.from_json({**v2, "format_version": 3, "features": ["k_tiles"]})


def test_a_version_1_reader_refuses_with_one_line_naming_the_feature(monkeypatch, tmp_path):
    """This code with format 2 taken out (what a reader of version 1 with feature names does)."""
    path = tmp_path / "seg.safetensors"
    save_file({"blk.proj_out": _layer(dtype=torch.bfloat16)}, path)
    monkeypatch.setattr(spec, "FORMAT_VERSION", 1)
    monkeypatch.setattr(spec, "FEATURES", {})
    with pytest.raises(VersionError) as info:
        validate(path)
    msg = str(info.value)
    assert "format_version 2 (features: k_segments)" in msg and "reads up to 1" in msg and "\n" not in msg


@pytest.mark.parametrize("precision", ["int4", "nvfp4"])
def test_save_load_validate_inspect(tmp_path, precision):
    layer = _layer(precision, dtype=torch.bfloat16)
    path = tmp_path / "seg.safetensors"
    save_file({"blk.proj_out": layer, "blk.plain": sf.SVDQLinear.from_linear(torch.nn.Linear(64, 32))}, path)
    meta = validate(path)
    assert meta.format_version == 2 and meta.features == ["k_segments"]
    back = load_file(path)["blk.proj_out"]
    assert back.k_segments == layer.k_segments and back.spec == layer.spec
    x = _input().to(torch.bfloat16)
    assert torch.equal(back(x), layer(x))
    s = summarize(path)
    assert s["features"] == ["k_segments"] and list(s["k_segmented"]) == ["blk.proj_out"]
    text = format_summary(s)
    assert "features k_segments" in text and "k-segmented     1 layer (per-segment activation handling)" in text
    raw = json.loads(read_metadata(path).dumps())
    assert raw["layers"]["blk.proj_out"]["k_segments"][0] == {"size": 128}


def test_a_bad_per_segment_tensor_scale_is_named(tmp_path):
    layer = _layer("nvfp4", dtype=torch.bfloat16)
    with torch.no_grad():
        layer.wtscale[1] = 0.0
    path = tmp_path / "bad.safetensors"
    save_file({"blk.proj_out": layer}, path)
    with pytest.raises(sf.errors.TensorError, match="blk.proj_out.wtscale: tensor scale must be finite and positive"):
        validate(path)




def _segmented_flux():
    """A tiny FLUX whose single blocks' proj_out are k-segmented (attention | shifted MLP)."""
    from svdq_format.model import replace_linears

    model = tiny_flux(num_layers=1, num_single_layers=2).to(torch.bfloat16).eval()
    specs = {}
    for i in range(2):
        name = f"single_transformer_blocks.{i}.proj_out"
        specs[name] = LayerSpec(kind="w4a4", precision="int4", in_features=320, out_features=64, rank=16,
                                dtype="bfloat16", has_bias=True, k_segments=(KSegment(64), KSegment(256, SHIFT, True)))
    linears = {n: model.get_submodule(n) for n in specs}
    replace_linears(model, specs, device="cpu")
    for name, lin in linears.items():
        q = sf.SVDQLinear.from_linear(lin, rank=16)
        layer = model.get_submodule(name)
        with torch.no_grad():
            for role in ("qweight", "wscales", "smooth", "lora_down", "lora_up", "bias"):
                getattr(layer, role).copy_(getattr(q, role))
    return model


def test_sharded_save_pretrained_and_stock_from_pretrained(tmp_path):
    from diffusers import FluxTransformer2DModel

    from svdq_format.model import save_pretrained

    model = _segmented_flux()
    with torch.no_grad():
        y = model(**tiny_flux_inputs(5)).sample
    save_pretrained(model, tmp_path / "m", max_shard_size="100KB")
    assert len(list((tmp_path / "m").glob("*.safetensors"))) > 1
    qc = json.loads((tmp_path / "m" / "config.json").read_text())["quantization_config"]
    assert qc["format_version"] == 2 and qc["features"] == ["k_segments"]
    validate(tmp_path / "m")
    loaded = FluxTransformer2DModel.from_pretrained(tmp_path / "m")
    assert loaded.single_transformer_blocks[1].proj_out.k_segments[1].act_unsigned
    with torch.no_grad():
        assert torch.equal(loaded(**tiny_flux_inputs(5)).sample, y)


def test_lora_attach_and_unload_on_a_segmented_layer():
    from svdq_format.lora import LoraAdapter, LoraDelta, attach_lora, plan_lora, unload_all

    model = _segmented_flux()
    layer = model.single_transformer_blocks[0].proj_out
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = _input(k=320).to(torch.bfloat16)
    x[:, 64:] = torch.nn.functional.gelu(x[:, 64:].float(), approximate="tanh").to(torch.bfloat16)
    y0 = layer(x)
    torch.manual_seed(3)
    delta = LoraDelta(down=torch.randn(4, 320) * 0.1, up=torch.randn(64, 4) * 0.1, scales=torch.ones(4))
    attach_lora(model, plan_lora(model, LoraAdapter("a", {"single_transformer_blocks.0.proj_out": delta})))
    assert layer.k_segments[1].act_shift == SHIFT  # the 4-bit branch's handling is untouched
    added = (x.float() @ delta.down.T) @ delta.up.T  # on the raw input, whatever the segments
    assert (layer(x).float() - y0.float() - added).abs().max() <= 0.03 * added.abs().max()
    unload_all(model)
    assert all(torch.equal(v, before[k]) for k, v in layer.state_dict().items())
    assert torch.equal(layer(x), y0)


def test_fusion_keeps_segments_and_refuses_mixed_ones():
    a, b = _layer(seed=0, n=32), _layer(seed=1, n=48)
    with torch.no_grad():
        b.smooth.copy_(a.smooth)
    fused = fuse_layers([a, b], ["to_q", "to_k"])
    assert fused.k_segments == SEGS and fused.spec.split_sizes == (32, 48)
    x = _input()
    y = fused(x)
    assert (y - torch.cat([a(x), b(x)], -1)).abs().max() <= 1e-5 * y.abs().max()
    back = split_layer(fused)
    assert all(m.k_segments == SEGS for m in back)
    assert torch.equal(back[0].qweight, a.qweight) and torch.equal(back[1].bias, b.bias)
    c = _layer(seed=2, n=32, segments=(KSegment(192, SHIFT, True), KSegment(128)))
    with torch.no_grad():
        c.smooth.copy_(a.smooth)
    with pytest.raises(UnsupportedError, match="k_segments differ"):
        fuse_layers([a, c], ["to_q", "to_k"])


def test_kernels_refuse_segmented_layers_and_run_them_per_segment(monkeypatch):
    """The sm90 registry has no per-segment kernel, so it refuses a k-segmented call; it accepts each
    segment as a plain call, so the selection runs it one call per segment and ``auto`` gives it the
    mode a plain layer of its shape gets (fast8 where it is built, else the exact int4 kernel). A
    call no segment can run (float32) still falls back to the reference, with one warning."""
    from svdq_kernels import registry

    monkeypatch.setattr(registry, "_capability", lambda index: (9, 0))
    monkeypatch.setattr(registry, "_module_present", lambda name: True)
    monkeypatch.delenv("SVDQ_BACKEND", raising=False)
    monkeypatch.delenv("SVDQ_DISABLE_KERNELS", raising=False)
    segs = (KSegment(3072), KSegment(12288, SHIFT, True))
    base = dict(device=torch.device("cuda", 0), dtype=torch.bfloat16, precision="int4", act="int4", rows=4608,
                in_features=15360, out_features=3072, rank=32, has_bias=True)
    assert registry.supports(ops.LinearCall(**base)) is None
    reason = registry.supports(ops.LinearCall(**base, k_segments=segs))
    assert "k_segments" in reason and "per segment" in reason
    assert ops.select_backend(ops.LinearCall(**base, k_segments=segs)).name == "cutlass-sm90 per segment"
    args = (torch.device("cuda", 0), torch.bfloat16, "int4", 15360, 3072, 32, True, 0.0, False, "auto")
    plain = ops.auto_act(*args)
    assert plain in ("fp8w", "fp8")  # a plain layer of this shape runs a fast kernel
    # fp8w per segment (pre-quantized rows); "fp8" has no per-segment path: then the exact int4 kernel
    assert ops.auto_act(*args, segs) == ("fp8w" if plain == "fp8w" else "int4")
    monkeypatch.setattr(ops, "_WARNED", set())
    f32 = {**base, "dtype": torch.float32}
    with pytest.warns(RuntimeWarning, match="no svdquant GPU kernel"):
        assert ops.select_backend(ops.LinearCall(**f32, k_segments=segs)).name == "reference"


def test_the_op_carries_the_segments_through_torch_library():
    layer = _layer()
    x = _input()
    layer.mode = "exact"
    want = layer(x)  # eager: the op's function directly
    args = (x, layer.qweight, layer.wscales, None, layer.smooth, layer.lora_down, layer.lora_up, layer.bias, None,
            "int4", "int4", 0.0, False, "reference", [128, 192], [0.0, SHIFT], [False, True])
    assert torch.equal(torch.ops.svdquant.linear(*args), want)
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    assert torch.equal(compiled(x), want)


def test_a_segmented_layer_in_auto_mode_compiles_whole():
    """``auto`` asks :func:`ops.auto_act` for the mode while dynamo traces; the segments reach it as
    plain tuples (a frozen dataclass argument made dynamo fail: "can't reconstruct arbitrary frozen
    dataclass instances", seen compiling a converted Nunchaku FLUX on an H100)."""
    layer = _layer()
    x = _input()
    layer.mode = "auto"
    want = layer(x)
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    assert torch.equal(compiled(x), want)
