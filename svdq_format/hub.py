"""The Hugging Face Hub: pull and push SVDQuant models with huggingface_hub's own machinery.

* :func:`pull` — ``snapshot_download`` (revision, token, cache_dir, local_files_only/offline,
  allow_patterns) with retries, then every newly downloaded file is checked against the
  server's hash (sha256 for LFS files, the git blob id otherwise) and safetensors headers are
  parsed; a corrupt file is removed from the cache before the retry, so the cache never keeps
  one.
* :func:`from_pretrained` — :func:`pull` + :func:`svdq_format.model.load_pretrained`.
* :func:`push_to_hub` — validate the model directory (never publish a broken checkpoint),
  generate the model card, then ``create_repo`` + one ``create_commit`` with weights, config
  and card (atomic on the Hub), retried on transient errors.
* :func:`make_model_card` — the card: ``base_model``, ``base_model_relation: quantized``,
  ``library_name: svdquant``, tags, quantization settings, fidelity table, how to load.

Transient failures (HTTP 5xx/429, dropped connections, checksum mismatches) are retried
``retries`` times; what still fails raises :class:`~svdq_format.errors.HubError` naming the
repo, the revision and the reason. Nothing here speaks HTTP itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from .errors import FormatError, HubError

__all__ = [
    "LIBRARY_NAME",
    "FIDELITY_NAME",
    "pull",
    "from_pretrained",
    "push_to_hub",
    "make_model_card",
]

LIBRARY_NAME = "svdquant"
#: Optional file in a model directory with measured fidelity (rendered as a table in the card).
FIDELITY_NAME = "fidelity.json"
CARD_NAME = "README.md"

T = TypeVar("T")


class _Corrupt(Exception):
    """A downloaded file does not match the server's hash or is not a valid safetensors file."""


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    cause = exc.__cause__
    if cause is not None and str(cause) and str(cause) not in str(exc):  # e.g. "Error while uploading" ← the HTTP error
        text += " (" + " ".join(str(cause).split()) + ")"
    return text if len(text) <= 400 else text[:397] + "..."


def _is_permanent(exc: BaseException, *, offline: bool) -> bool:
    """Errors that a retry cannot fix (missing repo/revision/file, auth, bad request, offline)."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(exc, (RepositoryNotFoundError, RevisionNotFoundError)):
        return True
    if isinstance(exc, LocalEntryNotFoundError):
        return offline  # online, it wraps a failed HEAD (5xx, connection): worth a retry
    if isinstance(exc, EntryNotFoundError):
        return True
    if isinstance(exc, HfHubHTTPError) and exc.response is not None:
        status = exc.response.status_code
        return 400 <= status < 500 and status not in (408, 429)
    return isinstance(exc, (ValueError, TypeError, FormatError))


def _retrying(what: str, fn: Callable[[], T], *, retries: int, wait: float, offline: bool = False) -> T:
    last: BaseException | None = None
    for attempt in range(retries + 1):
        try:
            return fn()
        except HubError:
            raise
        except Exception as exc:  # noqa: BLE001 - classified below
            if _is_permanent(exc, offline=offline):
                raise HubError(f"{what}: {_one_line(exc)}") from exc
            last = exc
            if attempt < retries:
                time.sleep(wait * (2**attempt))
    assert last is not None
    raise HubError(f"{what}: failed after {retries + 1} attempts: {_one_line(last)}") from last


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
    from .io import read_header

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

    return _retrying(f"pull {where}", attempt, retries=retries, wait=retry_wait, offline=offline)


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
    from .model import load_pretrained

    local = Path(repo_id_or_path)
    if not local.exists():
        patterns = pull_kwargs.pop("allow_patterns", None)
        if patterns is None and subfolder:
            patterns = [f"{subfolder}/*"]
        local = pull(os.fspath(repo_id_or_path), allow_patterns=patterns, **pull_kwargs)
    if subfolder:
        local = local / subfolder
    return load_pretrained(local, model_cls, device=device, dtype=dtype)


# --------------------------------------------------------------------------- model card


def _table(rows: Sequence[Mapping[str, Any]]) -> str:
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def _fidelity_rows(obj: Any) -> list[dict[str, Any]]:
    """Accepts ``[{...}, ...]``, ``{"metrics": ...}``, ``{name: value}`` or ``{name: {col: value}}``."""
    if isinstance(obj, Mapping) and "metrics" in obj:
        obj = obj["metrics"]
    if isinstance(obj, list):
        return [dict(r) for r in obj if isinstance(r, Mapping)]
    if isinstance(obj, Mapping):
        rows = []
        for name, value in obj.items():
            rows.append({"metric": name, **value} if isinstance(value, Mapping) else {"metric": name, "value": value})
        return rows
    return []


def _summary(values: Iterable[Any]) -> str:
    vals = sorted({v for v in values}, key=str)
    return ", ".join(str(v) for v in vals) if vals else "-"


def make_model_card(
    folder: str | os.PathLike[str],
    *,
    repo_id: str | None = None,
    base_model: str | None = None,
    license: str | None = None,
    tags: Sequence[str] = (),
    subfolder: str | None = None,
) -> Any:
    """Generate the model card (a huggingface_hub ``ModelCard``) of an SVDQuant model directory.

    For a pipeline directory, pass the pipeline folder and ``subfolder`` (e.g. ``"transformer"``),
    the quantized component the card describes.

    The YAML header carries ``base_model`` (argument, else the metadata's ``base_model``),
    ``base_model_relation: quantized``, ``library_name: svdquant``, tags and an ``svdquant``
    block (format version, precisions, kinds, ranks, layer count); the body has the settings,
    the fidelity table (from ``fidelity.json`` when present) and loading instructions.
    """
    from huggingface_hub import ModelCard, ModelCardData

    from .spec import FormatMetadata

    root = Path(folder)
    d = root / subfolder if subfolder else root
    cfg = json.loads((d / "config.json").read_text())
    meta = FormatMetadata.from_json(cfg.get("quantization_config"), file=str(d / "config.json"))
    layers = meta.layers.values()
    precisions = sorted({s.precision for s in layers})
    kinds = sorted({s.kind for s in layers})
    ranks = sorted({s.rank for s in layers})
    base = base_model or meta.extra.get("base_model")
    class_name = cfg.get("_class_name", "the model")
    name = repo_id or root.name
    settings = {k: v for k, v in meta.extra.items() if k != "base_model"}
    data = ModelCardData(
        base_model=base,
        base_model_relation="quantized" if base else None,
        library_name=LIBRARY_NAME,
        license=license,
        tags=sorted({LIBRARY_NAME, "4-bit", "diffusers", *precisions, *tags}),
        svdquant={
            "format_version": meta.format_version,
            "layout": meta.layout,
            "precision": precisions,
            "kind": kinds,
            "rank": ranks,
            "layers": len(meta.layers),
            "model_class": class_name,
        },
    )
    body = [f"# {name}", ""]
    body.append(
        f"SVDQuant 4-bit ({'/'.join(precisions) or 'no'} weights) version of "
        + (f"[{base}](https://huggingface.co/{base})" if base else "a diffusers model")
        + f": {len(meta.layers)} linear layers of `{class_name}` stored as 4-bit residual + 16-bit low-rank branch "
        "([SVDQuant](https://arxiv.org/abs/2411.05007)), in the versioned svdquant checkpoint format."
    )
    body += ["", "## Quantization", ""]
    rows: list[dict[str, Any]] = [
        {"setting": "format_version", "value": meta.format_version},
        {"setting": "layout", "value": meta.layout},
        {"setting": "precision", "value": _summary(s.precision for s in layers)},
        {"setting": "kind", "value": _summary(s.kind for s in layers)},
        {"setting": "rank", "value": _summary(s.rank for s in layers)},
        {"setting": "compute dtype", "value": _summary(s.dtype for s in layers)},
        {"setting": "quantized layers", "value": len(meta.layers)},
        {"setting": "producer", "value": " ".join(f"{k}={v}" for k, v in sorted(meta.producer.items()))},
    ]
    rows += [{"setting": k, "value": json.dumps(v) if not isinstance(v, (str, int, float)) else v}
             for k, v in sorted(settings.items())]
    body.append(_table(rows))
    fidelity_path = d / FIDELITY_NAME if (d / FIDELITY_NAME).is_file() else root / FIDELITY_NAME
    if fidelity_path.is_file():
        rows_f = _fidelity_rows(json.loads(fidelity_path.read_text()))
        if rows_f:
            body += ["", "## Fidelity", "", _table(rows_f)]
    repo = name if repo_id else "<repo_id>"
    sub_arg = f', subfolder="{subfolder}"' if subfolder else ""
    body += [
        "",
        "## How to load",
        "",
        "```python",
        "import svdq_format  # registers quant_method \"svdquant\" with diffusers",
        f"from diffusers import {class_name}",
        "",
        f"model = {class_name}.from_pretrained(\"{repo}\"{sub_arg})",
        "```",
        "",
        "or without diffusers' loader: `svdq_format.hub.from_pretrained(\"" + repo + "\"" + sub_arg + ")`; "
        "from the command line: `svdq pull " + repo + "`.",
        "",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))


# --------------------------------------------------------------------------- push


def _quantized_dirs(folder: Path) -> list[str]:
    """``[""]`` for a model directory, else the pipeline component folders holding SVDQuant models."""
    def is_svdq(d: Path) -> bool:
        try:
            qc = json.loads((d / "config.json").read_text()).get("quantization_config")
        except (OSError, ValueError, AttributeError):
            return False
        return isinstance(qc, dict) and qc.get("quant_method") == "svdquant"

    if is_svdq(folder):
        return [""]
    if not (folder / "model_index.json").is_file():
        return []
    return sorted(d.name for d in folder.iterdir() if d.is_dir() and is_svdq(d))


def _is_weight_file(path: str, model_dirs: Sequence[str] = ("",)) -> bool:
    parent, _, name = path.rpartition("/")
    return parent in model_dirs and name.startswith("diffusion_pytorch_model") and (
        name.endswith(".safetensors") or name.endswith(".safetensors.index.json"))


def push_to_hub(
    source: Any,
    repo_id: str,
    *,
    revision: str | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
    token: str | bool | None = None,
    endpoint: str | None = None,
    create_pr: bool = False,
    base_model: str | None = None,
    license: str | None = None,
    max_shard_size: int | str = "10GB",
    retries: int = 3,
    retry_wait: float = 1.0,
) -> Any:
    """Publish an SVDQuant model directory (or a quantized model) as one Hub commit.

    ``source`` may also be a diffusers pipeline directory (``model_index.json``) whose
    components include SVDQuant models (e.g. ``transformer/``); each is validated and the card
    describes the first.

    The directory is validated first (headers, manifest, values): a broken checkpoint is never
    uploaded. Every file of the directory plus a generated ``README.md`` (unless the directory
    has one) go into a single ``create_commit``, so the repo never shows half an upload; weight
    files of an earlier upload that the new one lacks (old shards, index) are deleted in the
    same commit.

    Args:
        source: A model directory, or a quantized model (saved to a temporary directory first).
        repo_id: ``"owner/name"``; created if needed.
        revision: Branch to commit to (created from ``main`` if missing).
        private: Visibility of a newly created repo.
        commit_message: Default ``"Upload SVDQuant model"``.
        token: Hub token.
        endpoint: Hub URL.
        create_pr: Open a pull request instead of committing to the branch.
        base_model: Card ``base_model`` (default: the metadata's ``base_model``).
        license: Card license.
        max_shard_size: Shard size when ``source`` is a model.
        retries: Further attempts after a transient failure.
        retry_wait: Seconds before the first retry (doubled each time).

    Returns:
        huggingface_hub's ``CommitInfo`` (``.oid`` is the new commit).

    Raises:
        FormatError: the directory is not a valid SVDQuant model.
        HubError: the upload failed (after retries) or was refused.
    """
    if not isinstance(source, (str, os.PathLike)):
        from .model import save_pretrained

        with tempfile.TemporaryDirectory(prefix="svdq-push-") as tmp:
            save_pretrained(source, tmp, max_shard_size=max_shard_size)
            return push_to_hub(tmp, repo_id, revision=revision, private=private, commit_message=commit_message,
                               token=token, endpoint=endpoint, create_pr=create_pr, base_model=base_model,
                               license=license, retries=retries, retry_wait=retry_wait)

    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    from .io import validate

    folder = Path(source)
    if not folder.is_dir():
        raise FormatError(str(folder), None, "not a directory")
    quantized = _quantized_dirs(folder)
    if not quantized:
        raise FormatError(str(folder), "config.json", "no SVDQuant model here (nor in a pipeline component folder)")
    for q in quantized:
        validate(folder / q if q else folder)
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    card = None if (folder / CARD_NAME).is_file() else str(make_model_card(
        folder, repo_id=repo_id, base_model=base_model, license=license, subfolder=quantized[0] or None))
    api = HfApi(endpoint=endpoint, token=token)
    branch = revision or "main"

    def attempt() -> Any:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if branch != "main":
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        ops: list[Any] = [CommitOperationAdd(path_in_repo=p.relative_to(folder).as_posix(), path_or_fileobj=str(p))
                          for p in files]
        if card is not None:
            ops.append(CommitOperationAdd(path_in_repo=CARD_NAME, path_or_fileobj=card.encode()))
        # Weights of an earlier upload that this one does not have (e.g. shards → single file)
        # would otherwise stay next to the new ones and make the revision inconsistent.
        new = {op.path_in_repo for op in ops}
        ops += [CommitOperationDelete(path_in_repo=f) for f in api.list_repo_files(repo_id, revision=branch)
                if f not in new and _is_weight_file(f, quantized)]
        return api.create_commit(
            repo_id,
            operations=ops,
            commit_message=commit_message or "Upload SVDQuant model",
            revision=branch,
            create_pr=create_pr,
        )

    return _retrying(f"push {folder} to {repo_id}@{branch}", attempt, retries=retries, wait=retry_wait)
