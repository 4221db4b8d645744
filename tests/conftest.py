"""Shared fixtures: deterministic seeds, GPU skip marker, tiny layers."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # test helpers (fuzzing.py, fakehub.py, ...)
os.environ.setdefault("OMP_NUM_THREADS", "1")  # child processes too (see _one_torch_thread_everywhere)


def pytest_addoption(parser):
    parser.addoption("--soak", action="store_true",
                     help="run the long reliability runs (fuzz, kill-during-write, Hub fault rounds); "
                     "includes the slow tests")


def pytest_collection_finish(session):
    # mypy (tests/test_typing.py) runs in the background from here on, niced, on the core the
    # single-threaded tests leave idle; its test waits for the report (tests/mypy_background.py)
    from tests import mypy_background

    if not session.config.option.collectonly and any(
            item.nodeid == mypy_background.TEST_ID for item in session.items):
        mypy_background.start()


def pytest_sessionfinish(session):
    from tests import mypy_background

    mypy_background.stop()  # a run ended before the test (-x, Ctrl-C): no mypy left behind


def pytest_collection_modifyitems(config, items):
    # `slow` tests (multi-process memory bounds, fault rounds, the whole demo) are left out of the
    # default run, which CI runs; `-m slow` runs them (the README's command), `--soak` too.
    if not config.getoption("--soak") and "slow" not in (config.getoption("markexpr") or ""):
        slow = [item for item in items if "slow" in item.keywords]
        if slow:
            config.hook.pytest_deselected(items=slow)
            items[:] = [item for item in items if "slow" not in item.keywords]
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread_everywhere():
    """One torch thread for the whole suite: its matrices are tiny, and on a shared or busy
    2-core machine a second thread only spin-waits (tests ran several times slower)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's tests (tiny matrices: more threads only spin on a shared CPU)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def kernels_run(monkeypatch):
    """The kernel configurations ``svdq_kernels.cutlass_fast8`` loads, in order (the real kernels run;
    GPU tests)."""
    from svdq_kernels import cutlass_fast8

    seen: list = []
    real = cutlass_fast8.load_kernel

    def spy(config, *, also_build=()):
        seen.append(config)
        return real(config, also_build=also_build)

    monkeypatch.setattr(cutlass_fast8, "load_kernel", spy)
    return seen
