"""Shared fixtures: deterministic seeds, GPU skip marker, tiny layers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # test helpers (fuzzing.py, fakehub.py, ...)


def pytest_addoption(parser):
    parser.addoption("--soak", action="store_true",
                     help="run the long reliability runs (fuzz, kill-during-write, Hub fault rounds)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


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
