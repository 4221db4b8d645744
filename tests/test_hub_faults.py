"""Hub faults at scale: many push/pull rounds against the fake Hub with random injected faults.

Every request the client sends may get, with a seeded probability (12 %; 50 % in every tenth,
"storm" round, so that retries run out and clean failures happen too), an HTTP 500, a hang-up, a
TCP reset, a slow answer, a dropped or truncated download body, a wrong ETag or a damaged LFS
upload. Each round pushes a new version of a tiny sharded model and pulls ``main`` back into a
cache shared by all rounds. A round's push and pull each either succeed or fail cleanly (our
one-line ``HubError``); any other exception is a crash. After every round we count corrupt
artefacts — must be 0:

* remote: a file of ``main`` that differs from what the last successful push sent (or, after a
  failed push, from the previous ``main``), or an LFS object that does not hash to its oid;
* cache: a blob whose bytes do not hash to its name (the server's ETag), a snapshot link to
  a partial (``.incomplete``) or missing blob;
* pulled snapshot: a file that differs from the remote commit it names, or that does not
  validate as an SVDQuant model.

``python -m pytest -m slow`` runs 50 rounds (< 1 min; not in the default run), ``--soak`` 500. The
figures are printed (``-s``).
"""

from __future__ import annotations

import collections
import os
import time
from pathlib import Path

import huggingface_hub.hf_api  # noqa: F401  (the hub fixture patches its module-level HfApi)
import pytest
import torch

os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from svdq_format import hub as svdq_hub  # noqa: E402
from svdq_format.checkpoint import validate  # noqa: E402
from svdq_format.errors import HubError  # noqa: E402
from svdq_format.model import svdq_modules  # noqa: E402
from tests.fakehub import FakeHub, git_sha1, sha256  # noqa: E402
from tests.hub_helpers import tiny_flux  # noqa: E402
from tests.test_hub import hub_fixture  # noqa: E402,F401  (the ``hub`` fixture: fake Hub + private cache)

REPO = "tester/soak"
RATE = 0.12  # probability that a request gets a fault
STORM_RATE = 0.5  # every 10th round: most requests fail, so clean failures happen too
RETRIES = 2  # our retries per push/pull (huggingface_hub retries inside each attempt too)
SEED = 8
#: huggingface_hub's own backoff (1 s, doubling) is scaled by this in the test: the retry logic
#: runs unchanged, only the waiting is shorter. Our own retry_wait is set per call.
HF_SLEEP_SCALE = 0.01


@pytest.fixture
def fast_backoff(monkeypatch):
    """Scale the sleeps of huggingface_hub's HTTP retry loops (only those modules' ``time``)."""
    import types

    import huggingface_hub.file_download as fd
    import huggingface_hub.utils._http as http

    for mod in (http, fd):
        shim = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("_")})
        shim.sleep = lambda s: time.sleep(s * HF_SLEEP_SCALE)
        monkeypatch.setattr(mod, "time", shim)
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()  # (HF_HUB_DISABLE_PROGRESS_BARS=1: enabling would warn)
    disable_progress_bars()
    yield
    if not was_disabled:
        enable_progress_bars()


def local_files(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def corrupt_in_cache(cache: Path) -> list[str]:
    """Blobs whose bytes do not hash to their name; snapshot links to partial or missing blobs."""
    bad = []
    for blob in cache.glob("models--*/blobs/*"):
        if blob.name.endswith(".incomplete"):
            continue  # a partial download kept for resuming; checked below that nothing links to it
        data = blob.read_bytes()
        if blob.name not in (sha256(data), git_sha1(data)):
            bad.append(f"blob {blob.name}")
    for link in cache.glob("models--*/snapshots/*/**/*"):
        if link.is_symlink():
            target = Path(os.path.realpath(link))
            if not target.is_file() or target.name.endswith(".incomplete"):
                bad.append(f"link {link.name} -> {target.name}")
    return bad


def one_line_hub_error(exc: BaseException) -> bool:
    return isinstance(exc, HubError) and "\n" not in str(exc) and len(str(exc)) <= 600


def run_rounds(hub: FakeHub, tmp: Path, rounds: int, *, rate: float, seed: int) -> dict:
    import huggingface_hub.constants as C

    cache = Path(C.HF_HUB_CACHE)
    hub.slow_seconds = (0.05, 0.25)
    model = tiny_flux()
    layers = list(svdq_modules(model).values())
    counts: collections.Counter = collections.Counter()
    corrupt: list[str] = []
    crashes: list[str] = []
    expected_main: dict[str, bytes] | None = None
    t0 = time.perf_counter()
    for i in range(rounds):
        # a new version: every shard changes (biases of the quantized layers, every dense tensor)
        with torch.no_grad():
            for layer in layers:
                layer.bias.add_(1e-3)
            for p in model.parameters():
                p.add_(1e-3)
        d = model.save_pretrained(tmp / f"round{i}", max_shard_size="120KB") or tmp / f"round{i}"
        pushed = local_files(Path(d))
        round_rate = STORM_RATE if i % 10 == 9 else rate
        hub.random_faults(rate=round_rate, seed=seed * 100_003 + i)
        try:
            svdq_hub.push_to_hub(d, REPO, token="t", endpoint=hub.url, retries=RETRIES, retry_wait=0.01)
            counts["push ok"] += 1
            expected_main = pushed
        except Exception as exc:  # noqa: BLE001 - classified
            if one_line_hub_error(exc):
                counts["push clean failure"] += 1
            else:
                crashes.append(f"round {i} push: {type(exc).__name__}: {exc}")
        hub.random_faults(rate=0, seed=0)
        # remote state: main holds exactly the last successful push; LFS store only good objects
        if expected_main is not None:
            remote = hub.files(REPO)
            corrupt += [f"round {i} remote {k}" for k, v in expected_main.items() if remote.get(k) != v]
        corrupt += [f"round {i} lfs {k}" for k, v in hub.lfs_objects.items() if sha256(v) != k]
        if expected_main is None:
            continue  # nothing published yet
        hub.random_faults(rate=round_rate, seed=seed * 100_003 + i + 50_000)
        try:
            path = svdq_hub.pull(REPO, endpoint=hub.url, retries=RETRIES, retry_wait=0.01)
            counts["pull ok"] += 1
        except Exception as exc:  # noqa: BLE001 - classified
            path = None
            if one_line_hub_error(exc):
                counts["pull clean failure"] += 1
            else:
                crashes.append(f"round {i} pull: {type(exc).__name__}: {exc}")
        hub.random_faults(rate=0, seed=0)
        if path is not None:
            got = local_files(path)
            want = hub.files(REPO, path.name)  # the snapshot folder is named by its commit
            corrupt += [f"round {i} pulled {k}" for k in set(got) | set(want) if got.get(k) != want.get(k)]
            try:
                validate(path)
            except Exception as exc:  # noqa: BLE001
                corrupt.append(f"round {i} pulled snapshot does not validate: {exc}")
        corrupt += [f"round {i} cache {c}" for c in corrupt_in_cache(cache)]
    kinds = collections.Counter(k for k, _, _ in hub.fault_log)
    return {
        "rounds": rounds, "rate": rate, "storm_rate (every 10th round)": STORM_RATE, "seed": seed,
        "seconds": round(time.perf_counter() - t0, 1),
        "requests": len(hub.requests), "faults": len(hub.fault_log), "fault_kinds": dict(sorted(kinds.items())),
        **dict(sorted(counts.items())), "crashes": crashes, "corrupt": corrupt,
        "partial downloads left for resume": len(list(cache.glob("models--*/blobs/*.incomplete"))),
    }


@pytest.mark.slow  # soak-style rounds: `python -m pytest -m slow` (50), `--soak` (500)
def test_push_pull_rounds_with_random_faults(hub, fast_backoff, tmp_path, request):
    rounds = 500 if request.config.getoption("--soak") else 50
    r = run_rounds(hub, tmp_path, rounds, rate=RATE, seed=SEED)
    print("\nHub fault rounds:", {k: v for k, v in r.items() if k not in ("crashes", "corrupt")},
          f"crashes={len(r['crashes'])} corrupt={len(r['corrupt'])}")
    assert not r["crashes"], r["crashes"][:5]
    assert not r["corrupt"], r["corrupt"][:5]
    # the run means something: faults fired of every kind, both outcomes happened
    assert {"500", "wrong_etag", "hangup", "corrupt", "reset", "slow"} <= set(r["fault_kinds"])
    assert r["fault_kinds"].get("drop", 0) + r["fault_kinds"].get("truncate", 0) > 0
    assert r["push ok"] + r.get("push clean failure", 0) == rounds
    assert r["pull ok"] >= rounds // 2 and r["push ok"] >= rounds // 2
    assert r.get("push clean failure", 0) + r.get("pull clean failure", 0) > 0


def test_random_faults_are_reproducible_per_request():
    """The same seed gives the same fault for the same request, whatever the arrival order."""
    a, b = FakeHub(), FakeHub()
    a.random_faults(rate=0.5, seed=3)
    b.random_faults(rate=0.5, seed=3)
    reqs = [("GET", f"/x/y/resolve/main/f{i}") for i in range(40)] + [("PUT", f"/_lfs/{'0' * 64}")] * 5
    plan_a = [a._plan(m, p)[0] for m, p in reqs]
    plan_b = [b._plan(m, p)[0] for m, p in reversed(reqs[:40])][::-1] + [b._plan(m, p)[0] for m, p in reqs[40:]]
    assert plan_a == plan_b
    assert 10 < sum(k is not None for k in plan_a) < 35
    assert {k for k in plan_a[40:] if k} <= {"500", "hangup", "reset", "slow", "corrupt"}


def test_failed_attempt_leaves_no_mismatched_blob(hub, fast_backoff, tmp_path):
    """Regression (found by the rounds above): attempt 1 stores a shard under a wrong ETag and then
    fails on another file; attempt 2 succeeds. The wrong-named blob must not stay in the cache."""
    import huggingface_hub.constants as C

    model = tiny_flux()
    model.save_pretrained(tmp_path / "m", max_shard_size="120KB")
    svdq_hub.push_to_hub(tmp_path / "m", REPO, token="t", endpoint=hub.url, retry_wait=0.01)
    hub.inject("wrong_etag", method="HEAD", path_contains="00001-of-")
    hub.inject("500", method="GET", path_contains="config.json")
    path = svdq_hub.pull(REPO, endpoint=hub.url, retries=2, retry_wait=0.01)
    assert [k for k, _, _ in hub.fault_log] and hub.pending_faults() == 0  # both fired
    assert corrupt_in_cache(Path(C.HF_HUB_CACHE)) == []
    assert local_files(path) == hub.files(REPO)
