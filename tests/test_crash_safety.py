"""Kill a writer process at random points: the previous file survives, no partial file is read."""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch

from svdq_format import load_file, validate


def write_versions(path: str, mode: str, conn) -> None:
    """The writer, a child process: version after version of one ~24 MB checkpoint (a file or a
    model directory), each announced on ``conn`` once written; killed by the test."""
    from svdq_format import SVDQLinear, save_file
    from svdq_format.model import save_model_dir

    version = 0
    lin = torch.nn.Linear(256, 256)
    while True:
        version += 1
        torch.manual_seed(version)
        layer = SVDQLinear.from_linear(lin, rank=8)
        layer.bias.fill_(version)  # the version is readable from the file
        extra = {"filler": torch.full((6_000_000,), float(version))}  # ~24 MB: writes take time
        if mode == "file":
            save_file({"layer": layer}, path, extra_tensors=extra)
        else:
            model = torch.nn.Sequential(layer)
            model.register_buffer("filler", extra["filler"])
            save_model_dir(model, path, config={"_class_name": "Sequential", "version": version})
        conn.send(version)


def run_trials(tmp_path: Path, mode: str, trials: int, seed: int) -> dict:
    rng = random.Random(seed)
    target = tmp_path / ("ckpt.safetensors" if mode == "file" else "model")
    stats = {"trials": 0, "kills_mid_write": 0, "files_lost": 0, "partial_picked_up": 0}
    # Writers are forked from a server that imported torch and svdq_format once: a fresh
    # process per trial without paying the imports every time.
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "svdq_format", "svdq_format.model"])
    for _ in range(trials):
        receive, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=write_versions, args=(str(target), mode, send), daemon=True)
        proc.start()
        send.close()
        # wait until at least one version is complete, then kill at a random moment
        assert receive.poll(300) and receive.recv() >= 1, "writer died"
        time.sleep(rng.uniform(0.0, 0.4))
        temps_before = list(tmp_path.rglob("*.tmp"))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        receive.close()
        temps = list(tmp_path.rglob("*.tmp"))
        stats["kills_mid_write"] += bool(temps) and len(temps) >= len(temps_before)
        stats["trials"] += 1
        try:
            validate(target)
            weights = target if mode == "file" else target / "diffusion_pytorch_model.safetensors"
            (layer,) = load_file(weights).values()
            version = layer.bias[0].item()
            assert version >= 1 and torch.all(layer.bias == version)
        except Exception:  # noqa: BLE001 - counted, asserted by the caller
            stats["files_lost"] += 1
        # a leftover temp file is never a checkpoint: it is hidden and ends in .tmp
        stats["partial_picked_up"] += sum(1 for t in temps if t.name.endswith(".safetensors"))
        for t in temps:
            t.unlink()
    return stats


@pytest.mark.parametrize("mode", ["file", "dir"])
def test_kill_during_write(tmp_path, request, capsys, mode):
    trials = 200 if request.config.getoption("--soak") else 6
    stats = run_trials(tmp_path, mode, trials, seed=7)
    with capsys.disabled():
        print(f"\n  kill-during-write ({mode}): {stats}")
    assert stats["files_lost"] == 0
    assert stats["partial_picked_up"] == 0
