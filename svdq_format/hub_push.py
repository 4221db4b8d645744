"""Publish SVDQuant models on the Hub: the model card and one atomic commit.

* :func:`push_to_hub` — validate the model directory (never publish a broken checkpoint),
  generate the model card, then ``create_repo`` + one ``create_commit`` with weights, config
  and card (atomic on the Hub), retried on transient errors (:mod:`svdq_format.hub_retry`).
* :func:`make_model_card` — the card: ``base_model``, ``base_model_relation: quantized``,
  ``library_name: svdquant``, tags, quantization settings, fidelity table, how to load.

Also what ``save_pretrained(push_to_hub=True)`` of a loaded model calls
(:mod:`svdq_format.diffusers`); :mod:`svdq_format.hub` re-exports both.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .checkpoint import validate
from .errors import FormatError
from .hub_retry import retrying
from .model import save_pretrained
from .spec import FormatMetadata

__all__ = ["LIBRARY_NAME", "FIDELITY_NAME", "CARD_NAME", "make_model_card", "push_to_hub"]

LIBRARY_NAME = "svdquant"
#: Optional file in a model directory with measured fidelity (rendered as a table in the card).
FIDELITY_NAME = "fidelity.json"
CARD_NAME = "README.md"


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
        with tempfile.TemporaryDirectory(prefix="svdq-push-") as tmp:
            save_pretrained(source, tmp, max_shard_size=max_shard_size)
            return push_to_hub(tmp, repo_id, revision=revision, private=private, commit_message=commit_message,
                               token=token, endpoint=endpoint, create_pr=create_pr, base_model=base_model,
                               license=license, retries=retries, retry_wait=retry_wait)

    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

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

    return retrying(f"push {folder} to {repo_id}@{branch}", attempt, retries=retries, wait=retry_wait)
