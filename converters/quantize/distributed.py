"""Several processes (GPUs) with ``torch.distributed``: one process per device.

Launch with ``svdq quantize ... --gpus N`` (this module spawns the processes) or with
``torchrun --nproc_per_node N`` (``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` from the environment).
NCCL on CUDA, gloo on the CPU.

What is shared and how (see docs/quantization.md, "Several GPUs"):

* Calibration: the samples are split over the ranks (sample ``i`` on rank ``i % N``); each
  rank gathers bounded statistics of its samples, the parts are all-gathered and merged
  (:func:`converters.quantize.stats.merge_stats`), so every rank holds the statistics one
  process would have computed.
* Quantization: the remaining blocks are cut into *windows* of consecutive blocks with at least
  a few input groups per rank; the groups of a window are assigned to ranks greedily by cost
  (largest first, ties by position: :func:`assign`), quantized, and the results all-gathered,
  so every rank holds every finished layer. Rank 0 writes the per-block resume files.
* Determinism: each group's randomness depends only on the seed and the layer name
  (:func:`converters.quantize.layer.layer_seed`), so the checkpoint is byte-identical to the
  one-process run with the same seed, for any number of ranks.
* Failures: every rank reports success or its one-line error at each exchange; any error ends
  the run on every rank with ``rank R failed: ...``. A rank that dies without reporting makes
  the others' collective time out (``timeout_s``) with a clear error instead of hanging.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import multiprocessing.connection as mp_connection
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from svdq_format.errors import QuantizationError, SVDQError

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "DistContext",
    "assign",
    "env_world_size",
    "gather_stats",
    "init_distributed",
    "launch",
    "rank_device",
    "windows",
]

#: Seconds a rank waits for the others at one exchange before the run fails.
DEFAULT_TIMEOUT_S = 1800.0

#: Calibration rows exchanged per all-gather (bounds the host memory of the exchange).
_ROWS_BATCH_BYTES = 256 * 2**20


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when unset: not under torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise QuantizationError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if isinstance(exc, SVDQError) else f"{type(exc).__name__}: {text}"[:400]


@dataclasses.dataclass
class DistContext:
    """This process's place in the process group.

    Attributes:
        rank: Global rank (0 writes files).
        world_size: Number of processes.
        local_rank: Rank on this host (picks the GPU).
        backend: ``"nccl"`` or ``"gloo"``.
        timeout_s: Collective timeout.
        owns_group: True when :func:`init_distributed` created the process group (then
            :meth:`close` destroys it).
    """

    rank: int
    world_size: int
    local_rank: int
    backend: str
    timeout_s: float = DEFAULT_TIMEOUT_S
    owns_group: bool = False

    @property
    def is_root(self) -> bool:
        """True on rank 0."""
        return self.rank == 0

    def _collective(self, what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as exc:
            raise QuantizationError(
                f"rank {self.rank}: {what} failed: another rank died or did not answer "
                f"(timeout {self.timeout_s:g}s; {_one_line(exc)[:200]})"
            ) from None

    def all_gather(self, obj: Any, *, what: str = "exchange") -> list[Any]:
        """Every rank's ``obj`` (picklable; CPU tensors allowed), in rank order."""
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        self._collective(what, lambda: dist.all_gather_object(out, obj))
        return out

    def exchange(self, payload: Any, error: BaseException | None, *, what: str) -> list[Any]:
        """All-gather ``payload``, or raise on every rank when any rank reports an error.

        Raises:
            QuantizationError: ``rank R failed: <its one-line error>`` (the lowest failing
                rank), identical on every rank.
        """
        mine = ("error", _one_line(error)) if error is not None else ("ok", payload)
        got = self.all_gather(mine, what=what)
        for r, (status, value) in enumerate(got):
            if status == "error":
                raise QuantizationError(f"rank {r} failed during {what}: {value}")
        return [value for _, value in got]

    def exchange_tensors(
        self, payload: Any, tensors: Mapping[str, torch.Tensor], error: BaseException | None, *, what: str,
        to_root: bool = False,
    ) -> list[tuple[Any, dict[str, torch.Tensor]]]:
        """All-gather ``(payload, tensors)``: the tensors' bytes travel as tensors, not pickles.

        Each rank packs its tensors into one flat byte buffer (on its GPU for NCCL, in host
        memory for gloo); only the payload and the buffer layout are pickled. Then every rank's
        buffer is broadcast from that rank (``to_root``: sent to rank 0 only). Pickling tensors
        (``all_gather_object``) copies them through ``torch.save`` several times on every
        receiving rank and costs seconds per GB; this moves them at interconnect speed.

        Returns:
            Per rank, ``(payload, name → tensor)``; received tensors are views of that rank's
            buffer on the communication device (copy what you keep). With ``to_root``, a rank
            other than 0 gets every payload but only its own tensors.

        Raises:
            QuantizationError: as :meth:`exchange` (a rank's error, or a silent rank).
        """
        import torch.distributed as dist

        comm = torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")
        layout: list[tuple[str, str, tuple[int, ...], int, int]] = []
        total = 0
        if error is None:
            for key, t in tensors.items():
                nbytes = t.numel() * t.element_size()
                layout.append((key, str(t.dtype).removeprefix("torch."), tuple(t.shape), total, nbytes))
                total = -(-(total + nbytes) // 64) * 64
        infos = self.exchange((payload, layout, total), error, what=what)
        mine = torch.empty(total, dtype=torch.uint8, device=comm)
        for (_, _, _, off, nbytes), t in zip(layout, tensors.values()):
            if nbytes:
                mine[off : off + nbytes].copy_(t.detach().contiguous().reshape(-1).view(torch.uint8))
        out: list[tuple[Any, dict[str, torch.Tensor]]] = []
        for r, (theirs, lay, size) in enumerate(infos):
            if to_root and r != self.rank and not self.is_root:
                out.append((theirs, {}))
                continue
            buf = mine if r == self.rank else torch.empty(size, dtype=torch.uint8, device=comm)
            if size and not to_root:
                self._collective(what, functools.partial(dist.broadcast, buf, src=r))
            elif size and r != 0:  # to_root: rank r sends, rank 0 receives (in rank order)
                fn = dist.recv if self.is_root else dist.send
                self._collective(what, functools.partial(fn, buf, r if self.is_root else 0))
            out.append((theirs, {key: buf[off : off + n].view(getattr(torch, dt)).view(shape)
                                 for key, dt, shape, off, n in lay}))
        return out

    def on_root(self, fn: Callable[[], Any], *, what: str) -> Any:
        """Run ``fn`` on rank 0 only and give its result (or its error) to every rank."""
        result, error = None, None
        if self.is_root:
            try:
                result = fn()
            except Exception as exc:  # reported on every rank
                error = exc
        got = self.exchange(result, error, what=what)
        return got[0]

    def barrier(self, *, what: str) -> None:
        """Wait for every rank (a failed rank ends it with :class:`QuantizationError`)."""
        import torch.distributed as dist

        self._collective(what, dist.barrier)

    def agree(self, flag: bool, *, what: str = "agreement") -> bool:
        """True when ``flag`` is true on any rank (deadline, stop requests)."""
        return any(self.all_gather(bool(flag), what=what))

    def close(self, *, synchronize: bool = False) -> None:
        """Destroy the process group if this context created it; with ``synchronize`` (the run
        succeeded on this rank) after a barrier, so no rank tears down while a peer still works."""
        import torch.distributed as dist

        if self.owns_group and dist.is_initialized():
            if synchronize:
                try:
                    self.barrier(what="shutdown")
                except QuantizationError:
                    pass  # a peer failed: its own error is the one reported
            dist.destroy_process_group()


def rank_device(device: str | None, ctx: DistContext | None) -> str:
    """The device of this rank: ``cuda`` → ``cuda:LOCAL_RANK`` (made current); else unchanged."""
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if ctx is None or not dev.startswith("cuda"):
        return dev
    if dev != "cuda":
        raise QuantizationError(
            f"--device {dev}: with several processes give plain 'cuda' (rank r uses cuda:LOCAL_RANK)"
        )
    if not torch.cuda.is_available():
        raise QuantizationError("device cuda requested but CUDA is not available")
    if ctx.local_rank >= torch.cuda.device_count():
        raise QuantizationError(
            f"rank {ctx.rank}: LOCAL_RANK {ctx.local_rank} but only {torch.cuda.device_count()} GPUs"
        )
    torch.cuda.set_device(ctx.local_rank)
    return f"cuda:{ctx.local_rank}"


def init_distributed(device: str | None = None, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> DistContext | None:
    """Join the process group described by the environment (torchrun or :func:`launch`).

    Returns None when ``WORLD_SIZE`` is unset or 1 (one process: the plain path). Uses NCCL for
    CUDA devices and gloo otherwise; an existing process group is reused.

    Raises:
        QuantizationError: bad environment or a rendezvous that does not complete in time.
    """
    import torch.distributed as dist

    world = env_world_size()
    if world <= 1:
        return None
    try:
        rank = int(os.environ["RANK"])
        local = int(os.environ.get("LOCAL_RANK", rank))
    except (KeyError, ValueError):
        raise QuantizationError("WORLD_SIZE is set but RANK is missing or not an integer") from None
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    backend = "nccl" if dev.startswith("cuda") else "gloo"
    if dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), local, dist.get_backend(), timeout_s, False)
    ctx = DistContext(rank, world, local, backend, timeout_s, True)
    if backend == "nccl":
        rank_device(dev, ctx)
    try:
        dist.init_process_group(backend=backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
    except Exception as exc:
        raise QuantizationError(f"rank {rank}: cannot join the process group ({_one_line(exc)[:200]})") from None
    return ctx


def _spawned(local_rank: int, fn: Callable[..., Any], nprocs: int, port: int, args: tuple) -> None:
    os.environ.update({"WORLD_SIZE": str(nprocs), "RANK": str(local_rank), "LOCAL_RANK": str(local_rank),
                       "LOCAL_WORLD_SIZE": str(nprocs), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       # the launcher hosts the rendezvous store (as torchrun's agent does): rank 0
                       # finishing first cannot pull it away from a rank still shutting down
                       "TORCHELASTIC_USE_AGENT_STORE": "True"})
    if "OMP_NUM_THREADS" not in os.environ:  # share the host's cores instead of N × all of them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // nprocs))
    fn(*args)


def _first_failure(procs: Sequence[Any]) -> tuple[int, int] | None:
    """``(rank, exit code)`` of a failed process, else None. When several are found dead at once,
    one that exited with an error code beats one killed by a signal (a peer's death makes the
    others abort: SIGABRT from the process group), then the lowest rank."""
    dead = [(r, int(p.exitcode)) for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
    if not dead:
        return None
    return min(dead, key=lambda rc: (rc[1] < 0, rc[0]))


def launch(
    fn: Callable[..., Any],
    nprocs: int,
    args: Sequence[Any] = (),
    *,
    join_timeout_s: float | None = None,
    grace_s: float = 15.0,
) -> None:
    """Run ``fn(*args)`` in ``nprocs`` fresh processes forming one process group on this host.

    ``fn`` must be importable (module level). Each process gets ``WORLD_SIZE``, ``RANK``,
    ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT`` (a free port), so ``fn`` calls
    :func:`init_distributed` exactly as under torchrun. When a process fails, the others get
    ``grace_s`` seconds to notice and report (they fail at their next exchange) before they are
    terminated.

    Raises:
        QuantizationError: ``rank R exited with code C`` (the first to fail), or the processes
            did not finish within ``join_timeout_s``.
    """
    import multiprocessing

    from torch.distributed import TCPStore

    mp = multiprocessing.get_context("spawn")
    # the rendezvous store lives here until every rank has exited (port 0: the OS picks a free one)
    store = TCPStore("127.0.0.1", 0, nprocs, is_master=True, wait_for_workers=False,
                     timeout=datetime.timedelta(seconds=DEFAULT_TIMEOUT_S))
    port = store.port
    procs = [mp.Process(target=_spawned, args=(r, fn, nprocs, port, tuple(args)), daemon=False)
             for r in range(nprocs)]
    for proc in procs:
        proc.start()
    start = time.time()
    failed: tuple[int, int] | None = None
    failed_at = 0.0
    try:
        while any(proc.is_alive() for proc in procs):
            if failed is None:
                failed = _first_failure(procs)
                failed_at = time.time()
            if failed is not None and time.time() - failed_at > grace_s:
                break
            if join_timeout_s is not None and time.time() - start > join_timeout_s:
                raise QuantizationError(f"{nprocs} processes did not finish within {join_timeout_s:g}s")
            # wake as soon as a process ends, so the first failure is seen before its consequences
            mp_connection.wait([p.sentinel for p in procs if p.is_alive()], timeout=0.1)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
        for proc in procs:
            proc.join(timeout=10)
        del store  # after the ranks
    if failed is None:
        failed = _first_failure(procs)
    if failed is not None:
        raise QuantizationError(f"rank {failed[0]} exited with code {failed[1]} (its error is above)")


# --------------------------------------------------------------------------- work split


def assign(costs: Sequence[float], world: int) -> list[int]:
    """Rank of each task: longest-processing-time-first onto the least loaded rank.

    Deterministic: tasks by decreasing cost (ties by position), ranks by load (ties by rank).
    """
    load = [0.0] * world
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        r = min(range(world), key=lambda q: (load[q], q))
        owner[i] = r
        load[r] += costs[i]
    return owner


def windows(groups_per_block: Sequence[int], world: int, *, groups_per_rank: int = 4) -> list[list[int]]:
    """Cut consecutive blocks (positions into ``groups_per_block``) into windows holding at
    least ``groups_per_rank × world`` input groups (the last window may hold fewer)."""
    out: list[list[int]] = []
    cur: list[int] = []
    count = 0
    for i, n in enumerate(groups_per_block):
        cur.append(i)
        count += n
        if count >= groups_per_rank * world:
            out.append(cur)
            cur, count = [], 0
    if cur:
        out.append(cur)
    return out


def group_cost(shapes: Sequence[tuple[int, int]], candidates: int) -> float:
    """Relative cost of one input group: SVD + search ~ candidates × Σ N·K·min(N, K)^0.5."""
    return float(sum(n * k * min(n, k) ** 0.5 for n, k in shapes)) * (1 + candidates)


def pack_layer(layer: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """An ``SVDQLinear`` as (spec JSON, role → tensor, where it is) for an exchange."""
    from svdq_format.spec import expected_tensors

    spec = layer.spec
    return spec.to_json(), {role: getattr(layer, role).detach() for role in expected_tensors(spec)}


def unpack_layer(spec_json: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], *, device: Any) -> Any:
    """Inverse of :func:`pack_layer`; the layer gets its own copies on ``device``."""
    from svdq_format.linear import SVDQLinear
    from svdq_format.spec import LayerSpec

    layer = SVDQLinear.from_spec(LayerSpec.from_json(spec_json), device="meta")
    for role, t in tensors.items():
        setattr(layer, role, t.to(device, copy=True))
    return layer


def gather_stats(
    ctx: DistContext, part: Any, error: BaseException | None, *, max_rows: int, layers: Sequence[str] = ()
) -> Any:
    """Merge the calibration statistics of every rank's shard, on every rank.

    Two exchanges keep the traffic at one copy of the result: first the small parts (absmax,
    min, counts, reservoir keys), from which every rank computes the same global reservoir; then
    only the rows that survive in it, as tensors (:meth:`DistContext.exchange_tensors`: GPU to
    GPU with NCCL) in batches of about 256 MiB, so the exchange holds one batch at a time; rows
    kept on the GPU by a block-by-block calibration stay there. Equal to
    :func:`converters.quantize.stats.merge_stats`.

    Raises:
        QuantizationError: a rank failed during calibration (its one-line error, on every rank).
    """
    from .stats import CalibrationStats, LayerStats

    light = None
    if part is not None:
        light = CalibrationStats({n: LayerStats(st.absmax, st.rows[:0].cpu(), st.keys, st.count, st.minval)
                                  for n, st in part.layers.items()}, part.groups, part.samples, part.seconds)
    lights = ctx.exchange(light, error, what="calibration")
    names: list[str] = []
    for p in lights:
        names.extend(n for n in p.layers if n not in names)
    plan: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    for name in names:
        keys = [p.layers[name].keys if name in p.layers else torch.empty(0, dtype=torch.float64) for p in lights]
        owner = torch.cat([torch.full((len(k),), r, dtype=torch.long) for r, k in enumerate(keys)])
        local = torch.cat([torch.arange(len(k)) for k in keys])
        cat = torch.cat(keys)
        order = torch.sort(cat, stable=True).indices[:max_rows]
        plan[name] = (cat[order], owner[order], local[order])
    merged: dict[str, LayerStats] = {}
    # the rows cross the wire in batches of about ``_ROWS_BATCH_BYTES`` (the same cut on every
    # rank: it depends on the shared plan only), so the host holds one batch, not all the rows
    batch: list[str] = []
    size = 0
    for i, name in enumerate(names):
        row = next(p.layers[name].rows for p in lights if name in p.layers)
        batch.append(name)
        size += len(plan[name][0]) * row.shape[1] * row.element_size()
        if size < _ROWS_BATCH_BYTES and i + 1 < len(names):
            continue
        send: dict[str, torch.Tensor] = {}
        for n in batch:
            _, owner, local = plan[n]
            mine = local[owner == ctx.rank]
            if len(mine):
                rows_here = part.layers[n].rows
                send[n] = rows_here[mine.to(rows_here.device)]
        rows_by_rank = [got for _, got in ctx.exchange_tensors(None, send, None, what="calibration rows")]
        del send
        for n in batch:
            kept, owner, _ = plan[n]
            have = [p.layers[n] for p in lights if n in p.layers]
            sample = next(rows[n] for rows in rows_by_rank if n in rows)
            rows = sample.new_empty((len(kept), sample.shape[1]))
            for r, got in enumerate(rows_by_rank):
                if n in got:
                    rows[owner.to(rows.device) == r] = got[n]
            absmax = have[0].absmax.clone()
            for st in have[1:]:
                absmax = torch.maximum(absmax, st.absmax)
            # where one process keeps them (host, or the GPU after a block-by-block calibration)
            rows = rows.to(part.layers[n].rows.device if part is not None and n in part.layers else have[0].rows.device)
            merged[n] = LayerStats(absmax, rows, kept, sum(st.count for st in have), min(st.minval for st in have))
        del rows_by_rank
        batch, size = [], 0
    missing = [n for n in layers if n not in merged]
    if missing:
        import warnings

        warnings.warn(f"{len(missing)} selected layers never ran during calibration (e.g. {missing[0]})",
                      UserWarning, stacklevel=2)
    groups: list[Any] = next((p.groups for p in lights if p.groups), [])
    if part is not None:
        _sum_hessians(ctx, part, merged)
    return CalibrationStats(merged, [list(g) for g in groups], samples=sum(p.samples for p in lights),
                            seconds=max((p.seconds for p in lights), default=0.0))


# ---- issue 25: GPTQ's Hessians over every row, summed over the ranks ---------------------------
def _sum_hessians(ctx: DistContext, part: Any, merged: Mapping[str, Any]) -> None:
    """Sum the ranks' Hessians (every rank accumulated the same layers' in float64: exact sums,
    so the result is the one process's) into ``merged``, sharing them as ``part`` does; batches
    of about ``_ROWS_BATCH_BYTES`` per rank cross the wire at a time."""
    owners: dict[int, str] = {}
    shared: dict[str, str] = {}
    for name, st in part.layers.items():
        if st.hessian is not None:
            shared[name] = owners.setdefault(id(st.hessian), name)
    own = [n for n in shared if shared[n] == n]
    sums: dict[str, torch.Tensor] = {}
    batch: list[str] = []
    size = 0
    for i, name in enumerate(own):
        h = part.layers[name].hessian
        batch.append(name)
        size += h.numel() * h.element_size()
        if size < _ROWS_BATCH_BYTES and i + 1 < len(own):
            continue
        got = ctx.exchange_tensors(None, {n: part.layers[n].hessian for n in batch}, None, what="Hessians")
        for n in batch:
            total = part.layers[n].hessian.clone()
            total.zero_()
            for _, theirs in got:  # rank order
                total += theirs[n].to(total.device)
            sums[n] = total
        del got
        batch, size = [], 0
    for name, owner in shared.items():
        if name in merged:
            merged[name].hessian = sums[owner]

