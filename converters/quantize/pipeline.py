"""``quantize_model``: any ``nn.Module`` made of linears → SVDQuant layers in place.

Flow: select layers → calibrate (hooks; stats saved to the state dir) → for each block
(streamed onto the device when ``offload``): smoothing search per input group, low-rank
branch, 4-bit residual, swap in the ``SVDQLinear`` modules, write the block's layers to the
state dir (atomic). A run that is interrupted (Ctrl-C, a deadline, a crash) resumes from the
state dir with bit-identical results: every block depends only on the original weights, the
saved statistics and a per-layer seed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from svdq_format.errors import QuantizationError
from svdq_format.io import atomic_write, load_file, read_metadata, save_file
from svdq_format.linear import SVDQLinear
from svdq_format.spec import QUANTIZER_KEY, QuantizerInfo

from .calibration import CalibrationSet, load_calibration, synthetic_calibration
from .layer import quantize_group
from .options import QuantizeOptions
from .report import FidelityReport, environment_info
from .selection import Selection, select_layers
from .stats import CalibrationStats, collect_stats
from .timing import PhaseTimer

if TYPE_CHECKING:
    from .distributed import DistContext
    from .streaming import ShardedSource

__all__ = ["QuantizeResult", "run_quantization", "quantize_model", "resolve_calibration"]

_STATS_FILE = "calibration-stats.safetensors"
_PLAN_FILE = "plan.json"


@dataclasses.dataclass
class QuantizeResult:
    """Outcome of :func:`run_quantization`.

    Attributes:
        model: The model, with ``SVDQLinear`` layers for every finished block.
        report: The fidelity report (layers done so far).
        complete: False when the run stopped early (deadline); rerun with the same state dir.
        selection: Which layers were chosen and which were kept 16-bit.
    """

    model: nn.Module
    report: FidelityReport
    complete: bool
    selection: Selection


def resolve_calibration(
    model: nn.Module, calibration: Any, *, num_samples: int = 8, seed: int = 0
) -> CalibrationSet | CalibrationStats:
    """Turn the ``calibration`` argument into samples or statistics.

    Accepts a :class:`CalibrationSet`, :class:`CalibrationStats`, a list of forward keyword
    dicts, a path to a calibration safetensors file, or ``"synthetic"``.
    """
    if isinstance(calibration, (CalibrationSet, CalibrationStats)):
        return calibration
    if isinstance(calibration, str) and calibration == "synthetic":
        return synthetic_calibration(model, num_samples, seed=seed)
    if isinstance(calibration, (str, os.PathLike)):
        return load_calibration(calibration)
    if isinstance(calibration, Iterable):
        samples = [dict(s) for s in calibration]
        return CalibrationSet(samples, source="samples")
    raise QuantizationError(f"unsupported calibration input of type {type(calibration).__name__}")


def _linear(model: nn.Module, name: str) -> nn.Linear:
    mod = model.get_submodule(name)
    if not isinstance(mod, nn.Linear):
        raise QuantizationError(f"layer {name}: expected an nn.Linear, found {type(mod).__name__}")
    return mod


@contextlib.contextmanager
def _placed_linears(model: nn.Module, names: Iterable[str], device: torch.device | str, *, stream: bool,
                    source: Any = None) -> Iterator[dict[str, nn.Linear]]:
    """The linears ``names`` on ``device`` while they are quantized: read there from ``source``
    (``--offload disk``) and/or moved there when blocks stream; afterwards dropped back to meta
    (disk: read again if ever needed) or to the CPU. (After an error they stay where they are.)"""
    names = list(names)
    if source is not None:
        for n in names:
            source.materialize(model.get_submodule(n), n, device)
    mods = {n: _linear(model, n) for n in names}
    if stream:
        for m in mods.values():
            m.to(device)
    yield mods
    if stream:
        for m in mods.values():
            m.to("meta" if source is not None else "cpu")


def load_block_result(model: nn.Module, block_file: Path, *, home: Any, timer: PhaseTimer,
                      release: bool = False) -> list[dict[str, Any]]:
    """Put a finished block's layers (a resume file) into ``model``; return its report rows.

    With ``release`` the layers are put in on the meta device (their tensors stay in the file).
    """
    with timer.phase("io"):
        meta = read_metadata(block_file)
        layers = release_layers(meta.layers) if release else load_file(block_file, device=home)
    for name, layer in layers.items():
        _set_submodule(model, name, layer)
    timer.add(meta.extra.get("svdq_block", {}).get("timings", {}))
    return list(meta.extra.get("svdq_block", {}).get("layers", []))


def release_layers(specs: Mapping[str, Any]) -> dict[str, SVDQLinear]:
    """Empty (meta device) ``SVDQLinear`` modules standing for layers whose tensors are in a block file."""
    return {name: SVDQLinear.from_spec(getattr(spec, "spec", spec), device="meta") for name, spec in specs.items()}


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def block_file_reader(state_dir: str | os.PathLike[str]) -> Callable[[str], torch.Tensor]:
    """``read(key)``: a tensor of the per-block state files (for ``save_pretrained(read_tensor=)``).

    Headers are parsed once; each call opens the file, reads the one tensor (a fresh aligned
    allocation) and closes it.
    """
    from svdq_format.io import TensorReader, read_header

    headers = {}
    for f in sorted(Path(state_dir).glob("block-*.safetensors")):
        h = read_header(f)
        for key in h.tensors:
            headers[key] = h

    def read(key: str) -> torch.Tensor:
        h = headers.get(key)
        if h is None:
            raise QuantizationError(f"{state_dir}: tensor {key} is in no block file (state dir changed?)")
        with TensorReader(h) as r:
            return r.get_tensor(key)

    return read


def _fingerprint(model: nn.Module, opts: QuantizeOptions, selection: Selection,
                 source: ShardedSource | None = None, device: torch.device | str = "cpu") -> str:
    h = hashlib.sha256()
    h.update(type(model).__name__.encode())
    raw: Any = getattr(model, "config", None)
    cfg = raw.to_dict() if hasattr(raw, "to_dict") else dict(raw or {})
    # diffusers bookkeeping (e.g. _use_default_values, listed in set order, which changes from
    # process to process) is no part of the model: keep it out, so a new process can resume
    cfg = {k: v for k, v in cfg.items() if not (k.startswith("_") and k != "_class_name")}
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    h.update(json.dumps(opts.to_json(), sort_keys=True).encode())
    h.update(json.dumps(selection.kinds, sort_keys=True).encode())
    for name in list(selection.kinds)[:4]:  # a few weights: catches "same config, other weights"
        w = _linear(model, name).weight.detach()
        if w.is_meta and source is not None:  # summed where a resident model's weights would be
            w = source.tensors([f"{name}.weight"], device)[f"{name}.weight"]
        h.update(f"{float(w.float().sum()):.6e}".encode())
    return h.hexdigest()[:16]


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def _model_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _input_groups(names: list[str], kinds: Mapping[str, str], stats: CalibrationStats) -> list[list[str]]:
    groups: list[list[str]] = []
    seen: set[str] = set()
    for n in names:
        if n in seen:
            continue
        g = [m for m in stats.group_of(n) if m in names and m not in seen and kinds[m] == kinds[n]] or [n]
        if n not in g:
            g = [n]
        seen.update(g)
        groups.append(g)
    return groups


def _calibrate(model: nn.Module, linears: Mapping[str, nn.Linear], samples: list[Any], opts: QuantizeOptions, *,
               device: torch.device, stream: bool, source: ShardedSource | None, progress: bool,
               shard: tuple[int, int]) -> CalibrationStats:
    """Statistics of this process's samples: block by block when the weights are streamed and the
    model's wiring is known (:mod:`converters.quantize.blockwise`: each block placed once), else
    whole-model forwards. Both give the same statistics."""
    from .blockwise import blockwise_supported, collect_stats_blockwise

    if (stream or source is not None) and blockwise_supported(model, samples):
        if source is not None:
            def load(block: nn.Module, name: str) -> None:
                source.materialize(block, name, device)

            def drop(block: nn.Module) -> None:
                block.to("meta")
        else:
            def load(block: nn.Module, name: str) -> None:
                block.to(device)

            def drop(block: nn.Module) -> None:
                block.to("cpu")
        return collect_stats_blockwise(model, linears, samples, max_rows=opts.calib_rows, seed=opts.seed,
                                       device=device, load_block=load, drop_block=drop, shard=shard,
                                       progress=progress)
    placement = None
    if source is not None:
        from .streaming import stream_from_source

        placement = stream_from_source(model, source, device)
    return collect_stats(model, linears, samples, max_rows=opts.calib_rows, seed=opts.seed, device=device,
                         offload=stream, progress=progress, shard=shard, placement=placement)


def run_quantization(
    model: nn.Module,
    calibration: Any,
    *,
    options: QuantizeOptions | None = None,
    device: torch.device | str | None = None,
    offload: str | bool = "auto",
    state_dir: str | os.PathLike[str] | None = None,
    num_samples: int = 8,
    progress: bool = False,
    deadline: float | None = None,
    on_block_done: Callable[[int, str], None] | None = None,
    dist: DistContext | None = None,
    source: ShardedSource | None = None,
    release: bool = False,
) -> QuantizeResult:
    """Quantize a model in place, block by block, resumably.

    Args:
        model: Any ``nn.Module`` (diffusers transformers get architecture defaults).
        calibration: See :func:`resolve_calibration`.
        options: Quantizer options (default :class:`QuantizeOptions`).
        device: Where calibration and quantization run (default: the model's device).
        offload: ``True``/``"blocks"``: keep the model on the CPU and stream one block at a
            time onto ``device``; ``False``/``"none"``: move the whole model; ``"auto"``:
            stream only when the model would take more than 70 % of free CUDA memory.
        state_dir: Directory for resumable state (statistics + one file per finished block).
        num_samples: Synthetic sample count when ``calibration == "synthetic"``.
        progress: tqdm bars.
        deadline: ``time.time()`` after which no new block starts (``complete=False``).
        on_block_done: Called with ``(index, block name)`` after each block is written.
        dist: This process's place in a process group (:mod:`converters.quantize.distributed`):
            calibration samples and input groups are split over the ranks, results are
            exchanged, rank 0 writes the state dir; the result is byte-identical to one process.
        source: The model's blocks are on the meta device and read from these safetensors
            files when needed (:func:`converters.quantize.streaming.load_lazy`; implies block
            streaming).
        release: With a ``state_dir``: once a block's layers are written to its state file they
            are replaced in ``model`` by empty meta-device ``SVDQLinear`` modules (their
            tensors are read back from the file when the checkpoint is written: see
            :func:`block_file_reader`), so quantized layers never accumulate in memory.

    Raises:
        QuantizationError: nothing quantizable, bad calibration, NaN, out of memory, or a
            state dir written with other options / another model.
    """
    opts = options or QuantizeOptions()
    timer = PhaseTimer()
    selection = select_layers(model, include=opts.include, exclude=opts.exclude, weight_only=opts.weight_only)
    if not selection.kinds:
        why = (
            f" ({len(selection.skipped)} candidates kept 16-bit, e.g. {next(iter(selection.skipped.items()))})"
            if selection.skipped
            else ""
        )
        raise QuantizationError(f"{type(model).__name__}: no linear layer can be quantized{why}")
    first_param = next(model.parameters())
    dev = torch.device(device) if device is not None else first_param.device
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise QuantizationError("device cuda requested but CUDA is not available")
    if offload == "auto":
        stream = dev.type == "cuda" and _model_bytes(model) > 0.7 * torch.cuda.mem_get_info(dev)[0]
    else:
        stream = offload in (True, "blocks") or source is not None
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    home = torch.device("cpu") if stream else dev
    release = release and state_dir is not None
    if source is None:
        model.to(home)

    for name in selection.kinds:  # before calibration: a NaN weight would surface downstream
        w = _linear(model, name).weight
        if not w.is_meta and not bool(torch.isfinite(w).all()):  # (meta: checked when read)
            raise QuantizationError(f"layer {name}: weight contains NaN or inf")
    state = Path(state_dir) if state_dir is not None else None
    fp = _fingerprint(model, opts, selection, source, dev)
    stats_path = None if state is None else state / _STATS_FILE

    def check_state() -> tuple[bool, list[int]]:
        if state is None:
            return False, []
        state.mkdir(parents=True, exist_ok=True)
        plan = state / _PLAN_FILE
        if plan.is_file():
            old = json.loads(plan.read_text()).get("fingerprint")
            if old != fp:
                raise QuantizationError(
                    f"{state}: resume state was written for another model or other options; "
                    "delete it or rerun with the same settings"
                )
        else:
            text = json.dumps(
                {"fingerprint": fp, "options": opts.to_json(), "blocks": list(selection.blocks)}, indent=1
            )
            atomic_write(plan, lambda tmp: Path(tmp).write_text(text))
        done = [i for i in range(len(selection.blocks)) if (state / f"block-{i:04d}.safetensors").is_file()]
        return stats_path is not None and stats_path.is_file(), done

    # one process decides what is already done (rank 0 of a group: the ranks then agree)
    have_stats, _done_blocks = check_state() if dist is None else dist.on_root(check_state, what="resume check")

    # ---- calibration (or its saved statistics)
    calib_info: dict[str, Any] = {}
    if stats_path is not None and have_stats:
        stats = CalibrationStats.load(stats_path)
        timer.add({"calibration": stats.seconds})
        calib_info = {"source": stats.source or "resumed", "samples": stats.samples}
    else:
        calib = resolve_calibration(model, calibration, num_samples=num_samples, seed=opts.seed)
        if isinstance(calib, CalibrationStats):
            stats = calib
            calib_info = {"source": "statistics", "samples": stats.samples}
        else:
            linears = {n: _linear(model, n) for n in selection.kinds}
            shard = (0, 1) if dist is None else (dist.rank, dist.world_size)
            part, error = None, None
            try:
                with timer.phase("calibration"):
                    part = _calibrate(model, linears, calib.samples, opts, device=dev, stream=stream, source=source,
                                      progress=progress, shard=shard)
            except Exception as exc:
                if _is_oom(exc):
                    exc = QuantizationError(
                        f"out of memory during calibration on {dev}: use --offload blocks, fewer "
                        "image tokens per sample, or --device cpu"
                    )
                if dist is None:
                    raise exc from None
                error = exc
            if dist is None:
                assert part is not None  # (one process: a calibration error was raised above)
                stats = part
            else:
                from .distributed import gather_stats

                with timer.phase("wait"):
                    dist.barrier(what="calibration end")
                with timer.phase("exchange"):
                    stats = gather_stats(dist, part, error, max_rows=opts.calib_rows, layers=list(linears))
            stats.seconds = timer.seconds["calibration"]
            stats.source = calib.source
            calib_info = {"source": calib.source, "samples": len(calib)}
        if stats_path is not None and (dist is None or dist.is_root):
            with timer.phase("io"):
                stats.save(stats_path)

    # ---- blocks
    infos: list[dict[str, Any]] = []
    complete = True
    from tqdm.auto import tqdm

    blocks = list(selection.blocks.items())
    if dist is not None:
        from .distributed_blocks import quantize_blocks_distributed

        infos, complete, per_rank = quantize_blocks_distributed(
            dist, model, selection, stats, opts, device=dev, stream=stream, home=home, state=state,
            done=_done_blocks, timer=timer, deadline=deadline, progress=progress, on_block_done=on_block_done,
            source=source, release=release)
        blocks = []
    bar = tqdm(blocks, desc="quantize", unit="block", disable=not progress)
    for index, (block, names) in enumerate(bar):
        bar.set_postfix_str(block or "(outside blocks)", refresh=False)
        block_file = None if state is None else state / f"block-{index:04d}.safetensors"
        if block_file is not None and block_file.is_file():
            infos.extend(load_block_result(model, block_file, home=home, timer=timer, release=release))
            continue
        if deadline is not None and time.time() > deadline:
            complete = False
            break
        block_timer = PhaseTimer()
        try:
            done: dict[str, SVDQLinear] = {}
            block_infos: list[dict[str, Any]] = []
            with _placed_linears(model, names, dev, stream=stream, source=source) as mods:
                for group in _input_groups(names, selection.kinds, stats):
                    res = quantize_group(group, mods, selection.kinds, stats, opts, timer=block_timer)
                    for name, (layer, info) in res.items():
                        done[name] = layer if release else layer.to(home)  # (release: written from the device)
                        block_infos.append(info)
        except Exception as exc:
            if _is_oom(exc):
                raise QuantizationError(
                    f"out of memory while quantizing block {block or '(outside blocks)'} on {dev}: "
                    "use --offload blocks, a smaller --calib-rows, or --device cpu"
                ) from None
            raise
        if block_file is not None:
            with block_timer.phase("io"):
                save_file(done, block_file, metadata={"svdq_block": {
                    "block": block, "layers": block_infos, "timings": block_timer.seconds}}, streaming=release)
        if release:
            done = release_layers(done)
        for name, layer in done.items():
            _set_submodule(model, name, layer)
        del mods  # the replaced linears can go now
        timer.add(block_timer.seconds)
        infos.extend(block_infos)
        if on_block_done is not None:
            on_block_done(index, block)
    bar.close()

    if source is not None and complete:
        source.materialize(model, "", home)  # what the blocks hold besides their linears (norms)
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else 0
    report = FidelityReport(
        layers=infos,
        skipped=dict(selection.skipped),
        options=opts.to_json(),
        timings={k: round(v, 4) for k, v in timer.seconds.items()},
        calibration=calib_info,
        environment=environment_info(dev),
        peak_memory_bytes=int(peak),
    )
    if dist is not None:
        report.environment.update({"world_size": dist.world_size, "rank": dist.rank, "backend": dist.backend,
                                   "groups_per_rank": per_rank})
    return QuantizeResult(model, report, complete, selection)


def quantize_model(
    model: nn.Module,
    calibration: Any,
    *,
    rank: int = 32,
    precision: str = "int4",
    device: torch.device | str | None = None,
    offload: str | bool = "auto",
    state_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
    **options: Any,
) -> nn.Module:
    """Quantize ``model`` in place with SVDQuant and return it.

    Args:
        model: A diffusers transformer (or any module built from ``nn.Linear``).
        calibration: Samples, a calibration file, ``"synthetic"`` or statistics (see
            :func:`resolve_calibration`).
        rank: Low-rank branch rank of W4A4 layers.
        precision: ``"int4"`` or ``"nvfp4"``.
        device: Compute device (default: the model's).
        offload: Block streaming (see :func:`run_quantization`).
        state_dir: Resumable state directory.
        progress: Show progress bars.
        **options: Further :class:`QuantizeOptions` fields (``smoothing``, ``alphas``,
            ``clip_search``, ``gptq``, ``refine_iters``, ``include``, ``exclude``, ``seed`` ...).

    Returns:
        The same model with ``SVDQLinear`` layers. A diffusers model is marked as svdquant
        quantized, so ``model.save_pretrained(dir)`` / ``push_to_hub`` write the format
        (sharded, with the manifest); any model also works with
        :func:`svdq_format.model.save_pretrained` and the layer-level
        :func:`svdq_format.save_file`.
    """
    opts = QuantizeOptions.from_kwargs(rank=rank, precision=precision, **options)
    result = run_quantization(model, calibration, options=opts, device=device, offload=offload,
                              state_dir=state_dir, progress=progress)
    if result.complete:
        info = QuantizerInfo(method="calibrated", options=opts.to_json())
        mark_quantized(result.model, extra={QUANTIZER_KEY: info.to_json()})
    return result.model


def mark_quantized(model: nn.Module, *, extra: dict[str, Any] | None = None) -> None:
    """Attach the svdquant quantizer to a diffusers or transformers model (no-op for other modules)."""
    from svdq_format.model import _attach_quantizer, model_metadata

    _attach_quantizer(model, model_metadata(model, extra=extra))
