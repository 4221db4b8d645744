"""Several processes (torch.distributed, gloo on CPU, 2 ranks) give the one-process checkpoint,
byte for byte; a failing rank ends the run on every rank with one clear line; runs resume."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

from converters.quantize import QuantizeOptions, collect_stats, run_quantization, save_calibration, select_layers
from converters.quantize.calibration import synthetic_calibration
from converters.quantize.distributed import DistContext, _first_failure, assign, init_distributed, launch, windows
from converters.quantize.stats import merge_stats
from svdq_format.cli import main as svdq_main
from svdq_format.errors import QuantizationError
from svdq_format.model import save_model_file
from tests.quantize_fixtures import tiny_flux

pytestmark = [pytest.mark.filterwarnings("ignore:calibrating on synthetic:UserWarning"),
              pytest.mark.usefixtures("one_torch_thread")]


OPTS = dict(rank=8, alphas=(0.5,), seed=3)


def test_assignment_is_deterministic_balanced_and_windows_cover_blocks():
    costs = [5.0, 1.0, 1.0, 3.0, 3.0, 2.0, 2.0, 2.0]
    owner = assign(costs, 2)
    assert owner == assign(list(costs), 2)
    loads = [sum(c for c, r in zip(costs, owner) if r == q) for q in range(2)]
    assert sorted(loads) == [9.0, 10.0]  # LPT on this set: within one task of the optimum
    assert assign([1.0, 1.0, 1.0], 4) == [0, 1, 2]  # ties: by position onto the lowest rank
    w = windows([10, 10, 3, 3, 3, 3], 2, groups_per_rank=4)
    assert w == [[0], [1], [2, 3, 4], [5]]
    assert [i for part in w for i in part] == list(range(6))


def test_sharded_calibration_merges_to_the_one_process_statistics():
    model = tiny_flux()
    sel = select_layers(model)
    linears = {n: model.get_submodule(n) for n in sel.kinds}
    calib = synthetic_calibration(model, 5, image_tokens=16, text_tokens=8).samples
    whole = collect_stats(model, linears, calib, max_rows=24, seed=7)
    parts = [collect_stats(model, linears, calib, max_rows=24, seed=7, shard=(r, 3)) for r in range(3)]
    assert [p.samples for p in parts] == [2, 2, 1]
    merged = merge_stats(parts, max_rows=24, layers=linears)
    assert merged.groups == whole.groups and merged.samples == 5
    assert merged.layers.keys() == whole.layers.keys()
    for name, st in whole.layers.items():
        got = merged.layers[name]
        assert torch.equal(got.rows, st.rows) and torch.equal(got.keys, st.keys), name
        assert torch.equal(got.absmax, st.absmax) and got.count == st.count and got.minval == st.minval
        assert bool((st.keys[1:] >= st.keys[:-1]).all())  # canonical order: ascending keys


def _cli(args: list[str]) -> int:
    return svdq_main(["quantize", *args, "--rank", "8", "--num-samples", "3", "--dtype", "float32",
                      "--alphas", "0.5", "--device", "cpu", "--dist-timeout", "60", "-q"])


def test_two_processes_resume_and_write_the_byte_identical_checkpoint(tmp_path):
    import shutil

    src = tmp_path / "flux"
    tiny_flux(num_layers=2, num_single_layers=2).save_pretrained(src)
    assert _cli([str(src), str(tmp_path / "one"), "--keep-state"]) == 0
    # a state dir with only block 0 done (and no statistics): the 2-rank run loads block 0 on
    # every rank, calibrates sharded and quantizes blocks 1.. split over the ranks
    state = tmp_path / "two" / ".svdq-state"
    shutil.copytree(tmp_path / "one" / ".svdq-state", state)
    for f in state.iterdir():
        if f.name.startswith("calibration") or (f.name.startswith("block-") and f.name != "block-0000.safetensors"):
            f.unlink()
    # (a one-process resume with the saved statistics records the same calibration source)
    keep = tmp_path / "three" / ".svdq-state"
    shutil.copytree(tmp_path / "one" / ".svdq-state", keep)
    for f in keep.glob("block-000[1-9].safetensors"):
        f.unlink()
    assert _cli([str(src), str(tmp_path / "three")]) == 0
    assert (tmp_path / "three" / "config.json").read_bytes() == (tmp_path / "one" / "config.json").read_bytes()
    assert (tmp_path / "three" / "diffusion_pytorch_model.safetensors").read_bytes() == \
        (tmp_path / "one" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert _cli([str(src), str(tmp_path / "two"), "--gpus", "2"]) == 0
    one = (tmp_path / "one" / "diffusion_pytorch_model.safetensors").read_bytes()
    two = (tmp_path / "two" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert one == two
    assert (tmp_path / "one" / "config.json").read_bytes() == (tmp_path / "two" / "config.json").read_bytes()
    report = json.loads((tmp_path / "two" / "fidelity.json").read_text())
    env = report["environment"]
    assert env["world_size"] == 2 and env["backend"] == "gloo"
    assert all(n > 0 for n in env["groups_per_rank"])  # both ranks did work
    mem = env["memory_per_rank"]  # each rank's own peaks (the CLI resets VmHWM after its imports)
    assert [m["rank"] for m in mem] == [0, 1]
    assert all(m["peak_host_rss_bytes"] > 10 * 2**20 and m["peak_gpu_bytes"] == 0 for m in mem)
    single = json.loads((tmp_path / "one" / "fidelity.json").read_text())
    assert [r["layer"] for r in report["layers"]] == [r["layer"] for r in single["layers"]]
    assert not state.exists()


class _Stop(Exception):
    pass


def _calibration(broken: bool = False) -> list[dict]:
    samples = synthetic_calibration(tiny_flux(), 2, image_tokens=16, text_tokens=8, warn=False).samples
    if broken:  # finite input, NaN activations: only sample 1, i.e. only rank 1's shard, fails
        samples[1]["hidden_states"] = samples[1]["hidden_states"].clone()
        samples[1]["hidden_states"][0, 3, :] = 3e38
    return samples


def _worker(tmp: str) -> None:
    """One rank of one process group: the tensor exchanges (:func:`_exchange_checks`), then four
    runs in a row: (1) a run where rank 1 fails, (2) a run every rank stops after block 0 (like
    Ctrl-C to the group), (3) its resume, (4) a run where rank 1 dies without a word (the process
    exits)."""
    torch.set_num_threads(1)
    ctx = init_distributed("cpu", timeout_s=60)
    assert ctx is not None
    out, opts = Path(tmp), QuantizeOptions(**OPTS)
    try:
        _exchange_checks(ctx, out)
        try:
            run_quantization(tiny_flux(), _calibration(broken=True), options=opts, dist=ctx)
        except QuantizationError as exc:
            (out / f"error-{ctx.rank}.txt").write_text(str(exc))

        def stop(index: int, _block: str) -> None:
            if index == 0:
                raise _Stop

        try:
            run_quantization(tiny_flux(), _calibration(), options=opts, state_dir=out / "state", on_block_done=stop,
                             dist=ctx)
        except _Stop:
            (out / f"stopped-{ctx.rank}.txt").write_text(
                " ".join(sorted(f.name for f in (out / "state").glob("block-*"))))
        res = run_quantization(tiny_flux(), _calibration(), options=opts, state_dir=out / "state", dist=ctx)
        if ctx.is_root:
            save_model_file(res.model, out / "dist.safetensors")
            (out / "groups.json").write_text(json.dumps(res.report.environment["groups_per_rank"]))

        def die(index: int, _block: str) -> None:
            if ctx.rank == 1:
                os._exit(9)

        try:
            run_quantization(tiny_flux(), _calibration(), options=opts, on_block_done=die, dist=ctx)
        except QuantizationError as exc:
            (out / f"lost-{ctx.rank}.txt").write_text(str(exc))
    finally:
        ctx.close()


@pytest.fixture(scope="module")
def two_rank_group(tmp_path_factory):
    """One launch of :func:`_worker` over two processes, shared by the tests that read what its
    ranks wrote (each launch costs two fresh interpreters' imports: seconds). Returns the
    directory, what ``launch`` raised (None if nothing) and how long it took."""
    tmp = tmp_path_factory.mktemp("two-ranks")
    start, raised = time.time(), None
    try:
        launch(_worker, 2, (str(tmp),), join_timeout_s=120)
    except QuantizationError as exc:
        raised = exc
    return tmp, raised, time.time() - start


def test_failing_rank_interrupt_and_resume_over_two_processes(tmp_path, two_rank_group):
    ref = run_quantization(tiny_flux(), _calibration(), options=QuantizeOptions(**OPTS)).model
    save_model_file(ref, tmp_path / "ref.safetensors")
    group, raised, seconds = two_rank_group
    assert raised is not None and "rank 1 exited with code 9" in str(raised), raised
    assert seconds < 120
    # (1) the failure of rank 1 ended the run on both ranks with the same one-line reason
    errors = [(group / f"error-{r}.txt").read_text() for r in range(2)]
    assert errors[0] == errors[1] and "\n" not in errors[0]
    assert errors[0].startswith("rank 1 failed during calibration: layer ")
    assert "NaN or inf activations in calibration sample 1" in errors[0]
    # (2) both ranks stopped after block 0, whose file rank 0 (the writer) had written
    assert (group / "stopped-1.txt").is_file()
    assert (group / "stopped-0.txt").read_text() == "block-0000.safetensors"
    # (3) the resumed run quantized the rest over both ranks: the one-process model, byte for byte
    assert all(n > 0 for n in json.loads((group / "groups.json").read_text()))
    assert (group / "dist.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    # (4) rank 1 vanished: rank 0 failed at its next exchange with a clear line (no hang)
    lost = (group / "lost-0.txt").read_text()
    assert lost.startswith("rank 0: ") and "failed: another rank died or did not answer" in lost


def test_cli_failure_of_a_rank_is_one_line_per_rank(tmp_path, capfd):
    src = tmp_path / "flux"
    tiny_flux().save_pretrained(src)
    calib = save_calibration(_calibration(broken=True), tmp_path / "calib.safetensors")
    capfd.readouterr()
    code = _cli([str(src), str(tmp_path / "out"), "--calibration", str(calib), "--gpus", "2"])
    assert code == 1
    lines = [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("error: ")]
    reason = [ln for ln in lines if "rank 1 failed during calibration" in ln]
    assert len(reason) == 2 and "NaN or inf activations in calibration sample 1" in reason[0]
    assert any("exited with code 1" in ln for ln in lines)
    assert not (tmp_path / "out" / "diffusion_pytorch_model.safetensors").exists()


def _exchange_checks(ctx: DistContext, out: Path) -> None:
    """Each rank sends tensors of several dtypes and shapes (one rank sends none, one sends an
    empty and a 0-d tensor) and writes what it received from every rank (run by :func:`_worker`)."""
    mine = _exchange_payload(ctx.rank)
    got = ctx.exchange_tensors({"rank": ctx.rank}, mine, None, what="test exchange")
    ok = all(payload == {"rank": r} and _same(got_t, _exchange_payload(r))
             for r, (payload, got_t) in enumerate(got))
    # to rank 0 only: rank 0 gets both ranks' tensors, rank 1 every payload but its own tensors only
    send = _exchange_payload(2 * ctx.rank)
    got = ctx.exchange_tensors({"rank": ctx.rank}, send, None, what="test gather", to_root=True)
    ok = ok and [p for p, _ in got] == [{"rank": 0}, {"rank": 1}]
    for r, (_, got_t) in enumerate(got):
        ok = ok and (_same(got_t, _exchange_payload(2 * r)) if ctx.rank in (0, r) else got_t == {})
    (out / f"exchange-{ctx.rank}.txt").write_text(str(ok))
    try:
        ctx.exchange_tensors(None, mine, ValueError("boom") if ctx.rank == 1 else None, what="failing exchange")
    except QuantizationError as exc:
        (out / f"exchange-error-{ctx.rank}.txt").write_text(str(exc))


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Same names, dtypes, shapes and bytes."""
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        and torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8)) for k in a)


def _exchange_payload(rank: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(rank)
    if rank == 1:
        return {}
    return {"codes": torch.randint(0, 256, (7, 3), generator=g, dtype=torch.uint8),
            "w": torch.randn(5, 6, generator=g).bfloat16(), "f8": torch.randn(4, generator=g).to(torch.float8_e4m3fn),
            "empty": torch.zeros(0, 4), "scalar": torch.tensor(2.5), "mask": torch.tensor([True, False, True])}


def test_tensor_exchange_over_two_processes(two_rank_group):
    """The flat-buffer broadcast gives every rank every rank's tensors bit for bit (odd sizes,
    mixed dtypes, empty and 0-d tensors, a rank with nothing to send); an error on one rank
    is raised on both with its one line; ``to_root`` sends the tensors to rank 0 only."""
    group = two_rank_group[0]  # (the same launch as the test above: its ranks exchange first)
    assert [(group / f"exchange-{r}.txt").read_text() for r in range(2)] == ["True", "True"]
    errors = [(group / f"exchange-error-{r}.txt").read_text() for r in range(2)]
    assert errors[0] == errors[1] == "rank 1 failed during failing exchange: ValueError: boom"


def test_launch_reports_the_rank_that_failed_not_the_one_that_aborted_after_it():
    """Ranks found dead in the same poll: an error exit code beats a signal death (a peer's death
    makes the process group abort the others), then the lowest rank."""
    from types import SimpleNamespace

    procs = lambda *codes: [SimpleNamespace(exitcode=c) for c in codes]  # noqa: E731
    assert _first_failure(procs(None, 0)) is None
    assert _first_failure(procs(-6, 9)) == (1, 9)
    assert _first_failure(procs(None, -11)) == (1, -11)
    assert _first_failure(procs(3, 9, -6)) == (0, 3)
