"""A model directory changes as one unit (docs/reliability.md, promise 4; docs/format.md §8.1).

Writing a model directory file by file in place let a crash, a second writer or a reader see a
mix of two models. :class:`DirectoryWrite` makes the change one unit:

1. **one writer at a time** — the directory itself is locked (``flock`` on its file descriptor,
   released by the kernel when the process dies, also on ``kill -9``); a second writer fails at
   once with one :class:`~svdq_format.errors.WriteError` line and changes nothing;
2. **stale leftovers cleaned** — under the lock, staging directories (``.svdq-staging-*``) and
   hidden temporary files (``.<name>.<random>.tmp``) of writers that died are removed;
3. **everything staged** — the new files are written and fsync'ed in a hidden staging
   directory inside the target (same filesystem): while they are written the directory still
   holds the old model, whole;
4. **commit** — the weight files are renamed into place, then ``config.json`` **last**: it
   records every weight file's data hash (``quantization_config["files"]``, each shard carries
   its own in its header, :data:`~svdq_format.io.DATA_HASH_KEY`), so the config commits the set.
   Weight files of the old model that the new one does not have are removed after.

Readers need no lock: :func:`svdq_format.checkpoint.open_checkpoint` refuses a directory whose
files disagree with the config's record (a reader that raced a commit, or a writer killed during
the renames), and a file replaced after its header was read is noticed when it is opened
(:class:`~svdq_format.io.TensorReader`); the loaders then open the directory again
(:func:`retry_mixed`), so a reader gets the old model or the new one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

from .errors import MixedDirectoryError, WriteError
from .io import atomic_write, fsync_dir

__all__ = ["STAGING_PREFIX", "COMMIT_LOCK", "DirectoryWrite", "retry_mixed", "clean_stale", "recover",
           "SharedCommitLock"]

#: Name prefix of a write's staging directory inside the target directory.
STAGING_PREFIX = ".svdq-staging-"
#: Lock file taken exclusively for the renames of a commit, shared by diffusers' loader while it
#: reads (it opens the files by name itself, so it cannot use the descriptors our loaders hold).
COMMIT_LOCK = ".svdq-commit.lock"
#: A staging directory's commit plan: written before the first rename, so the commit of a writer
#: killed during its renames is finished by the next writer or reader (:func:`recover`).
_PLAN = ".commit.json"
_TMP = re.compile(r"\..+\.[A-Za-z0-9_]{8}\.tmp")  # atomic_write's temporary files (tempfile names)

T = TypeVar("T")


def clean_stale(d: Path) -> list[str]:
    """Remove what writers that died left in ``d``: staging directories and hidden ``.tmp`` files.

    Call only while holding the directory's write lock (no live writer owns them then).

    Returns:
        The names removed.
    """
    removed = []
    for entry in d.iterdir():
        if entry.name.startswith(STAGING_PREFIX) and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry.name)
        elif _TMP.fullmatch(entry.name) and entry.is_file():
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
            removed.append(entry.name)
    return removed


def _lock_within(fd: int, d: Path, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise WriteError(d, f"readers kept the directory busy for {seconds:g} s; nothing was changed") from None
            time.sleep(0.01)


def _finish(d: Path, staging: Path) -> None:
    """Carry out a staging directory's commit plan (again, after a crash: renames done are skipped)."""
    plan = json.loads((staging / _PLAN).read_text())
    for name in plan["files"]:
        if (staging / name).exists():
            os.replace(staging / name, d / name)
    fsync_dir(d)
    if (staging / plan["config"]).exists():
        os.replace(staging / plan["config"], d / plan["config"])
    fsync_dir(d)
    for name in plan["remove"]:
        with contextlib.suppress(FileNotFoundError):
            (d / name).unlink()
    (staging / _PLAN).unlink()


def recover(d: Path, *, locked: bool = False) -> bool:
    """Finish the commit of a writer killed during its renames (its staging directory holds a plan).

    Args:
        d: The model directory.
        locked: The caller holds the directory's write lock; else it is taken without waiting
            (a live writer owns the directory: nothing is done).

    Returns:
        Whether a commit was finished.
    """
    plans = [p.parent for p in d.glob(f"{STAGING_PREFIX}*/{_PLAN}")]
    if not plans:
        return False
    fd = None
    if not locked:
        try:
            fd = os.open(d, os.O_RDONLY)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            if fd is not None:
                os.close(fd)
            return False
    try:
        done = False
        for staging in plans:
            if (staging / _PLAN).exists():
                _finish(d, staging)
                shutil.rmtree(staging, ignore_errors=True)
                done = True
        return done
    except OSError:
        return False
    finally:
        if fd is not None:
            os.close(fd)


class SharedCommitLock:
    """Hold off commits into ``directory`` while diffusers' loader reads it (no-op where the
    directory has no commit lock file or it cannot be opened, e.g. a read-only Hub snapshot)."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self._fd: int | None = None
        try:
            self._fd = os.open(Path(directory) / COMMIT_LOCK, os.O_RDONLY)
            fcntl.flock(self._fd, fcntl.LOCK_SH)
        except OSError:
            self.release()

    def release(self) -> None:
        """Let commits go on."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        self.release()


class DirectoryWrite:
    """Write a model directory as one unit (see the module docstring).

    Use as a context manager; write every new file to :meth:`path`, then call :meth:`commit`.
    Leaving the block without a commit (an error) removes the staging directory and leaves the
    directory as it was.

    Args:
        directory: The target (created if needed).
        commit_wait: Seconds the commit waits for diffusers loads of the directory in progress.

    Raises:
        WriteError: the directory cannot be created, or another process is writing it.
    """

    def __init__(self, directory: str | os.PathLike[str], *, commit_wait: float = 300.0) -> None:
        self.directory = Path(directory)
        self.commit_wait = commit_wait
        self._fd: int | None = None
        self.staging: Path | None = None

    def __enter__(self) -> DirectoryWrite:
        d = self.directory
        try:
            d.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(d, os.O_RDONLY)
        except OSError as exc:
            raise WriteError(d, exc.strerror or str(exc)) from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self._fd)
            self._fd = None
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise WriteError(d, "another process is writing this model directory; nothing was changed") from None
            raise WriteError(d, exc.strerror or str(exc)) from None
        try:
            recover(d, locked=True)  # a commit interrupted by a crash is finished first
            clean_stale(d)
            self.staging = d / f"{STAGING_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
            self.staging.mkdir()
        except OSError as exc:
            self._release()
            raise WriteError(d, exc.strerror or str(exc)) from None
        return self

    def path(self, name: str) -> Path:
        """Where to write the new file ``name`` (inside the staging directory)."""
        assert self.staging is not None, "DirectoryWrite used outside its with-block"
        return self.staging / name

    def commit(self, files: Iterable[str], *, config: str, stale: Callable[[str], bool]) -> None:
        """Move the staged files into the directory: ``files`` first, ``config`` last, then
        remove the old model's files that ``stale`` selects and the new set does not name.

        Raises:
            WriteError: a rename failed (the directory may then hold a mix, which readers refuse).
        """
        assert self.staging is not None
        d = self.directory
        names = list(files)
        keep = set(names) | {config}
        remove = sorted(e.name for e in d.iterdir() if e.name not in keep and stale(e.name) and e.is_file())
        plan = json.dumps({"files": names, "config": config, "remove": remove})
        try:
            lock = os.open(d / COMMIT_LOCK, os.O_CREAT | os.O_RDWR, 0o644)
        except OSError as exc:
            raise WriteError(d, f"commit failed: {exc.strerror or exc}") from None
        try:
            _lock_within(lock, d, self.commit_wait)  # diffusers readers in progress (our loaders need no lock)
            atomic_write(self.staging / _PLAN, lambda tmp: Path(tmp).write_text(plan))
            _finish(d, self.staging)
            with contextlib.suppress(FileNotFoundError):  # no lasting file: readers open it only if it exists
                (d / COMMIT_LOCK).unlink()
        except OSError as exc:
            raise WriteError(d, f"commit failed: {exc.strerror or exc}") from None
        finally:
            os.close(lock)

    def _release(self) -> None:
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging = None
        if self._fd is not None:
            os.close(self._fd)  # (releases the lock)
            self._fd = None

    def __exit__(self, *exc: object) -> None:
        self._release()


def retry_mixed(fn: Callable[[], T], *, directory: str | os.PathLike[str] | None = None, attempts: int = 8,
                wait: float = 0.02) -> T:
    """Run a directory read, again when it met a directory that changed under it.

    A reader that raced a commit sees :class:`~svdq_format.errors.MixedDirectoryError`; the
    commit takes milliseconds, so reading again gets the whole new model. A directory left mixed
    by a writer killed during its renames has its commit finished (:func:`recover`, when we may
    write there and no writer is alive); one that stays mixed is refused after ``attempts``.
    """
    for i in range(attempts):
        try:
            return fn()
        except MixedDirectoryError:
            if i == attempts - 1:
                raise
            if directory is not None and Path(directory).is_dir() and recover(Path(directory)):
                continue
            time.sleep(wait * 2**i)
    raise AssertionError("unreachable")
