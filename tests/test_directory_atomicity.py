"""A model directory changes as one unit (issue 19 §1): kill -9, concurrent writers, readers.

A writer process rewrites one sharded model directory over and over (version v: every SVDQ
layer's bias is v, the layers spread over ~6 shards), so a mix of two saves is visible as layers
with different versions. Counted per run (printed; docs/reliability.md has the figures):

* kill -9 at random moments: whole old or new model read back, a mix *detected* (one
  ``MixedDirectoryError`` line) or a mix *read* — which must never happen;
* two writers at once: both succeed one after the other, or the loser fails with one line;
  the directory then holds one whole model;
* a reader (``load_pretrained``, diffusers' ``from_pretrained``, ``validate``) during rewrites.

The default run does a few of each; ``--soak`` (``@pytest.mark.slow``) the large counts.
"""

from __future__ import annotations

import inspect
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from svdq_format.checkpoint import validate
from svdq_format.commit import COMMIT_LOCK, STAGING_PREFIX
from svdq_format.errors import MixedDirectoryError, WriteError
from svdq_format.linear import SVDQLinear
from svdq_format.model import save_pretrained
from svdq_format.pretrained import load_pretrained
from tests.lora_fixtures import quantize, tiny_flux

ROOT = Path(__file__).resolve().parents[1]
SHARD = "120KB"

WRITER = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, sys.argv[4])
    from svdq_format.errors import WriteError
    from svdq_format.linear import SVDQLinear
    from svdq_format.model import save_pretrained
    from tests.lora_fixtures import quantize, tiny_flux
    target, first, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    model = quantize(tiny_flux())
    layers = [m for m in model.modules() if isinstance(m, SVDQLinear)]
    print("ready", flush=True)
    sys.stdin.readline()  # the caller's "go" (it starts several writers ahead of time)
    v = first
    for _ in range(rounds):
        for m in layers:
            m.bias.fill_(v)
        try:
            save_pretrained(model, target, max_shard_size="%s")
            print(v, flush=True)
        except WriteError as exc:
            print("refused", exc, flush=True)
        v += 1
    """ % SHARD
)


def _versions(model) -> set[float]:
    return {float(m.bias[0]) for m in model.modules() if isinstance(m, SVDQLinear)}


def _start(tmp_path: Path, target: Path, first: int, rounds: int) -> subprocess.Popen:
    script = tmp_path / "writer.py"
    if not script.exists():  # (never rewritten under a writer that is starting)
        script.write_text(WRITER)
    return subprocess.Popen([sys.executable, str(script), str(target), str(first), str(rounds), str(ROOT)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _go(*procs: subprocess.Popen) -> None:
    """Wait until the writers are ready (imports done, model built), then let them write."""
    for proc in procs:
        assert proc.stdout.readline().strip() == "ready", "writer died"
    for proc in procs:
        proc.stdin.write("go\n")
        proc.stdin.flush()


def _read(target: Path) -> str:
    """``whole`` / ``detected`` / ``mixed`` for one load_pretrained of ``target``."""
    try:
        versions = _versions(load_pretrained(target))
    except MixedDirectoryError:
        return "detected"
    return "whole" if len(versions) == 1 else "mixed"


@pytest.fixture(scope="module")
def base_model():
    model = quantize(tiny_flux())
    for m in model.modules():
        if isinstance(m, SVDQLinear):
            m.bias.fill_(0.5)  # one version
    return model


def kill_trials(tmp_path: Path, trials: int, seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    stats = {"trials": 0, "killed_mid_write": 0, "whole": 0, "detected": 0, "mixed": 0, "validate_mixed": 0,
             "stale_left_after_next_save": 0}
    target = tmp_path / "model"
    # the next trial's writer starts while this one runs (its imports and model overlap the
    # trial); it writes only once told to, after this trial's writer was killed and checked
    procs: list[subprocess.Popen] = []
    try:
        for t in range(trials):
            while len(procs) < min(trials, t + 2):
                procs.append(_start(tmp_path, target, first=1000 * (len(procs) + 1), rounds=10_000))
            _kill_trial(procs[t], target, rng, stats)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
    return stats


def _kill_trial(proc: subprocess.Popen, target: Path, rng: random.Random, stats: dict[str, int]) -> None:
    _go(proc)
    assert proc.stdout.readline().strip(), "writer died"  # one whole save done
    time.sleep(rng.uniform(0.0, 0.3))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stats["trials"] += 1
    stats["killed_mid_write"] += any(p.name.startswith(STAGING_PREFIX) for p in target.iterdir())
    outcome = _read(target)
    stats[outcome] += 1
    try:
        meta = validate(target)
        assert meta.layers
    except MixedDirectoryError:
        pass
    else:
        stats["validate_mixed"] += outcome == "mixed"


def _run_kill(tmp_path, capsys, trials, base_model):
    stats = kill_trials(tmp_path, trials, seed=11)
    # the next save cleans what the killed writers left, and the directory is whole again
    save_pretrained(base_model, tmp_path / "model", max_shard_size=SHARD)
    left = [p.name for p in (tmp_path / "model").iterdir() if p.name.startswith(".") and p.name != COMMIT_LOCK]
    stats["stale_left_after_next_save"] = len(left)
    assert _read(tmp_path / "model") == "whole"
    with capsys.disabled():
        print(f"\n  kill -9 during save_pretrained: {stats}")
    assert stats["mixed"] == 0 and stats["validate_mixed"] == 0 and stats["stale_left_after_next_save"] == 0


def test_kill_during_save_pretrained(tmp_path, capsys, base_model):
    _run_kill(tmp_path, capsys, 3, base_model)


@pytest.mark.slow
def test_kill_during_save_pretrained_soak(tmp_path, capsys, base_model):
    _run_kill(tmp_path, capsys, 30, base_model)


def concurrent_rounds(tmp_path: Path, rounds: int) -> dict[str, int]:
    stats = {"rounds": 0, "both_ok": 0, "one_refused": 0, "whole_after": 0, "mixed_after": 0, "errors": 0}
    target = tmp_path / "model"
    for r in range(rounds):
        procs = [_start(tmp_path, target, first=10 * r + k, rounds=1) for k in (1, 2)]
        _go(*procs)  # both ready first: their saves overlap
        outs = [p.communicate(timeout=300) for p in procs]
        lines = [o[0].split("\n")[0] for o in outs]
        if any(p.returncode != 0 for p in procs):
            stats["errors"] += 1
            continue
        stats["rounds"] += 1
        refused = [ln for ln in lines if ln.startswith("refused")]
        stats["one_refused" if refused else "both_ok"] += 1
        assert all("another process is writing this model directory" in ln for ln in refused)
        stats["whole_after" if _read(target) == "whole" else "mixed_after"] += 1
    return stats


def _run_concurrent(tmp_path, capsys, rounds):
    stats = concurrent_rounds(tmp_path, rounds)
    with capsys.disabled():
        print(f"\n  two save_pretrained at once: {stats}")
    assert stats["errors"] == 0 and stats["mixed_after"] == 0 and stats["whole_after"] == rounds


def test_concurrent_writers(tmp_path, capsys):
    _run_concurrent(tmp_path, capsys, 1)


@pytest.mark.slow
def test_concurrent_writers_soak(tmp_path, capsys):
    _run_concurrent(tmp_path, capsys, 10)


def reader_during_writes(tmp_path: Path, seconds: float, base_model) -> dict[str, int]:
    from diffusers import FluxTransformer2DModel

    target = tmp_path / "model"
    save_pretrained(base_model, target, max_shard_size=SHARD)
    proc = _start(tmp_path, target, first=1, rounds=100_000)
    _go(proc)
    stats = {"load_pretrained": 0, "load_pretrained_mixed": 0, "load_pretrained_refused": 0,
             "from_pretrained": 0, "from_pretrained_mixed": 0, "from_pretrained_refused": 0,
             "validate": 0, "validate_refused": 0, "saves_seen": 0}
    end = time.monotonic() + seconds
    i = 0
    try:
        while time.monotonic() < end:
            i += 1
            if i % 3 == 0:
                try:
                    validate(target)
                    stats["validate"] += 1
                except MixedDirectoryError:
                    stats["validate_refused"] += 1
                continue
            name = "from_pretrained" if i % 3 == 2 else "load_pretrained"
            load = FluxTransformer2DModel.from_pretrained if name == "from_pretrained" else load_pretrained
            try:
                versions = _versions(load(target))
            except MixedDirectoryError:
                stats[f"{name}_refused"] += 1
                continue
            stats[name] += 1
            stats[f"{name}_mixed"] += len(versions) != 1
    finally:
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate()
    stats["saves_seen"] = len([ln for ln in out.split("\n") if ln.strip().isdigit()])
    return stats


def _run_reader(tmp_path, capsys, seconds, base_model):
    stats = reader_during_writes(tmp_path, seconds, base_model)
    with capsys.disabled():
        print(f"\n  reader during rewrites: {stats}")
    assert stats["load_pretrained_mixed"] == 0 and stats["from_pretrained_mixed"] == 0
    assert stats["load_pretrained"] > 0


def test_reader_during_writes(tmp_path, capsys, base_model):
    _run_reader(tmp_path, capsys, 4, base_model)


@pytest.mark.slow
def test_reader_during_writes_soak(tmp_path, capsys, base_model):
    _run_reader(tmp_path, capsys, 90, base_model)


class _RecordedSleeps:
    """``svdq_format.commit``'s ``time`` with ``sleep`` recorded, not slept: a reader's retries of a
    directory that stays mixed back off for seconds, to no end without a writer to wait for."""

    def __init__(self) -> None:
        self.slept: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)

    def __getattr__(self, name: str):
        return getattr(time, name)


def test_mixed_and_incomplete_directories_are_one_line(tmp_path, base_model, monkeypatch):
    from svdq_format import commit

    waits = _RecordedSleeps()
    monkeypatch.setattr(commit, "time", waits)
    a, b = tmp_path / "a", tmp_path / "b"
    for d, v in ((a, 1.0), (b, 2.0)):
        for m in base_model.modules():
            if isinstance(m, SVDQLinear):
                m.bias.fill_(v)
        save_pretrained(base_model, d, max_shard_size=SHARD)
    shards = sorted(p.name for p in a.glob("*-of-*.safetensors"))
    assert len(shards) >= 3
    (a / shards[1]).write_bytes((b / shards[1]).read_bytes())  # one shard of B in A
    for fn in (validate, load_pretrained):
        with pytest.raises(MixedDirectoryError, match=f"config.json: {shards[1]}: mixed model directory") as info:
            fn(a)
        assert "\n" not in str(info.value)
    from diffusers import FluxTransformer2DModel
    with pytest.raises(MixedDirectoryError, match="mixed model directory"):
        FluxTransformer2DModel.from_pretrained(a)
    (b / "config.json").unlink()  # sealed shards that no config.json commits: a save killed before its commit
    with pytest.raises(MixedDirectoryError, match="incomplete model directory: .* never committed"):
        validate(b)
    # each of the three refused reads (validate, load_pretrained, validate) backed off and read again
    # until retry_mixed's last attempt, then refused
    params = inspect.signature(commit.retry_mixed).parameters
    attempts, wait = params["attempts"].default, params["wait"].default
    assert waits.slept == [wait * 2**i for i in range(attempts - 1)] * 3
    monkeypatch.undo()
    # a write in progress is another process's lock: the second writer changes nothing
    from svdq_format.commit import DirectoryWrite
    with DirectoryWrite(tmp_path / "c"):
        with pytest.raises(WriteError, match="another process is writing this model directory"):
            save_pretrained(base_model, tmp_path / "c")
    assert not any(p.suffix == ".safetensors" for p in (tmp_path / "c").iterdir())


def test_directory_written_before_the_record_still_loads(tmp_path, base_model):
    """Old directories (no ``files`` record, unsealed shards) load as before."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    d = tmp_path / "old"
    save_pretrained(base_model, d, max_shard_size=SHARD)
    for p in d.glob("*.safetensors"):
        with safe_open(str(p), "pt") as f:
            sd = {k: f.get_tensor(k) for k in f.keys()}
            meta = {k: v for k, v in f.metadata().items() if k != "svdquant_data_sha256"}
        save_file(sd, str(p), metadata=meta)
    cfg = json.loads((d / "config.json").read_text())
    del cfg["quantization_config"]["files"]
    (d / "config.json").write_text(json.dumps(cfg))
    model = load_pretrained(d)
    assert _versions(model) == _versions(base_model)
    assert torch.equal(model.proj_out.weight, base_model.proj_out.weight)
    os.sync()
