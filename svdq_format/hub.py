"""The Hugging Face Hub: pull and push SVDQuant models with huggingface_hub's own machinery.

* :func:`pull` — ``snapshot_download`` (revision, token, cache_dir, local_files_only/offline,
  allow_patterns) with retries, then every newly downloaded file is checked against the
  server's hash (sha256 for LFS files, the git blob id otherwise) and safetensors headers are
  parsed; a corrupt file is removed from the cache before the retry, so the cache never keeps
  one.
* :func:`from_pretrained` — :func:`pull` + :func:`svdq_format.pretrained.load_pretrained`.
* :func:`push_to_hub`, :func:`make_model_card` — publishing, from :mod:`svdq_format.hub_push`
  (re-exported here: one module for the user; the diffusers integration imports the lower one).

Transient failures (HTTP 5xx/429, dropped connections, checksum mismatches) are retried
``retries`` times; what still fails raises :class:`~svdq_format.errors.HubError` naming the
repo, the revision and the reason. Nothing here speaks HTTP itself.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import FormatError, HubError
from .hub_push import FIDELITY_NAME, LIBRARY_NAME, make_model_card, push_to_hub
from .hub_retry import retrying
from .io import read_header
from .pretrained import load_pretrained

__all__ = [
    "LIBRARY_NAME",
    "FIDELITY_NAME",
    "pull",
    "from_pretrained",
    "push_to_hub",
    "make_model_card",
]

class _Corrupt(Exception):
    """A downloaded file does not match the server's hash or is not a valid safetensors file."""


# --------------------------------------------------------------------------- pull


def _repo_cache(repo_id: str, cache_dir: str | os.PathLike[str] | None) -> Path:
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    root = Path(cache_dir) if cache_dir is not None else Path(constants.HF_HUB_CACHE)
    return root / repo_folder_name(repo_id=repo_id, repo_type="model")


def _blobs(folder: Path) -> set[str]:
    blobs = folder / "blobs"
    return {p.name for p in blobs.iterdir() if p.is_file()} if blobs.is_dir() else set()


def _file_hash(path: Path, algo: str) -> str:
    h = hashlib.sha256() if algo == "sha256" else hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _evict(folder: Path, blob: str) -> None:
    """Remove a blob and every snapshot link to it (so the cache holds no corrupt file)."""
    target = folder / "blobs" / blob
    snapshots = folder / "snapshots"
    if snapshots.is_dir():
        for link in snapshots.rglob("*"):
            if link.is_symlink() and Path(os.path.realpath(link)).name == blob:
                link.unlink()
    target.unlink(missing_ok=True)


def _evict_mismatched(folder: Path, blobs: set[str]) -> list[str]:
    """Hash each blob against its name (the server's ETag); evict those that differ; return them."""
    bad = []
    for blob in sorted(blobs):
        path = folder / "blobs" / blob
        algo = "sha256" if len(blob) == 64 else "sha1" if len(blob) == 40 else None
        if algo is not None and path.is_file() and _file_hash(path, algo) != blob:
            _evict(folder, blob)
            bad.append(f"{blob}: content does not match the server's {algo} (ETag); removed from the cache")
    return bad


def _verify_snapshot(folder: Path, snapshot: Path, new_blobs: set[str]) -> None:
    """Hash every new blob against its name (the server's ETag); parse safetensors headers."""
    bad = _evict_mismatched(folder, new_blobs)
    if bad:
        raise _Corrupt(bad[0])
    for f in sorted(snapshot.rglob("*.safetensors")):
        try:
            read_header(f)
        except FormatError as exc:
            blob = Path(os.path.realpath(f)).name
            _evict(folder, blob)
            raise _Corrupt(f"{f.relative_to(snapshot)}: {exc.reason}; removed from the cache") from None


def _unwritable_cache(folder: Path) -> str | None:
    """Why the repo's cache folder cannot be written to, or None if it can."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        return str(exc.strerror or exc)
    return None


def pull(
    repo_id: str,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool = False,
    allow_patterns: str | Sequence[str] | None = None,
    endpoint: str | None = None,
    retries: int = 3,
    retry_wait: float = 1.0,
    verify: bool = True,
) -> Path:
    """Download (or find in the cache) a model repo snapshot; return its local directory.

    Args:
        repo_id: ``"owner/name"``.
        revision: Branch, tag or commit (default ``"main"``).
        token: Hub token (default: the logged-in one / ``HF_TOKEN``).
        cache_dir: huggingface_hub cache directory (default ``HF_HUB_CACHE``).
        local_files_only: Use the cache only (also implied by ``HF_HUB_OFFLINE=1``).
        allow_patterns: Only files matching these glob patterns (e.g. ``"transformer/*"``).
        endpoint: Hub URL (default ``HF_ENDPOINT`` / huggingface.co).
        retries: Further attempts after a transient failure.
        retry_wait: Seconds before the first retry (doubled each time).
        verify: Hash newly downloaded files against the server's ETag and parse safetensors
            headers; a mismatch evicts the file and counts as a transient failure.

    Returns:
        The snapshot directory (files are links into the shared blob store).

    Raises:
        HubError: the repo/revision/file does not exist, the cache lacks it offline, or the
            download kept failing.
    """
    from huggingface_hub import is_offline_mode, snapshot_download

    folder = _repo_cache(repo_id, cache_dir)
    offline = local_files_only or is_offline_mode()
    where = f"{repo_id}@{revision or 'main'}"
    # snapshot_download is typed for str/Path and list/str only
    hub_cache_dir = os.fspath(cache_dir) if cache_dir is not None else None
    patterns = (allow_patterns if allow_patterns is None or isinstance(allow_patterns, str)
                else list(allow_patterns))

    if not offline:
        reason = _unwritable_cache(folder)
        if reason is not None:  # a read-only cache serves what it holds; anything else is a clear error
            try:
                return Path(snapshot_download(repo_id, revision=revision, cache_dir=hub_cache_dir,
                                              local_files_only=True, allow_patterns=patterns))
            except Exception:  # noqa: BLE001 - not (completely) in the cache
                raise HubError(
                    f"pull {where}: cannot write to the Hub cache {folder} ({reason}); "
                    "pass cache_dir= or set HF_HUB_CACHE to a writable directory"
                ) from None
    before = _blobs(folder)

    def attempt() -> Path:
        # Blobs new since this pull began are checked after every attempt, failed ones included:
        # a failed attempt may already have stored a file under a wrong ETag, and the next
        # attempt (with the right ETag) would leave that blob behind unchecked.
        try:
            path = Path(
                snapshot_download(
                    repo_id,
                    revision=revision,
                    token=token,
                    cache_dir=hub_cache_dir,
                    local_files_only=local_files_only,
                    allow_patterns=patterns,
                    endpoint=endpoint,
                )
            )
        except BaseException:
            if verify:
                _evict_mismatched(folder, _blobs(folder) - before)
            raise
        if verify:
            _verify_snapshot(folder, path, _blobs(folder) - before)
        return path

    return retrying(f"pull {where}", attempt, retries=retries, wait=retry_wait, offline=offline)


def from_pretrained(
    repo_id_or_path: str | os.PathLike[str],
    model_cls: Any = None,
    *,
    subfolder: str | None = None,
    device: Any = "cpu",
    dtype: Any = None,
    **pull_kwargs: Any,
) -> Any:
    """Load a quantized model from a local directory/file or a Hub repo id, in one call.

    Args:
        repo_id_or_path: A local model directory or single file, or ``"owner/name"``.
        model_cls: Model class (default: the diffusers class named in the config).
        subfolder: Folder inside the repo (e.g. ``"transformer"`` of a pipeline repo).
        device: Target device.
        dtype: Cast the dense tensors to this dtype.
        **pull_kwargs: :func:`pull` options (``revision``, ``token``, ``cache_dir``, ...).

    Returns:
        The quantized model.
    """
    local = Path(repo_id_or_path)
    if not local.exists():
        patterns = pull_kwargs.pop("allow_patterns", None)
        if patterns is None and subfolder:
            patterns = [f"{subfolder}/*"]
        local = pull(os.fspath(repo_id_or_path), allow_patterns=patterns, **pull_kwargs)
    if subfolder:
        local = local / subfolder
    return load_pretrained(local, model_cls, device=device, dtype=dtype)
