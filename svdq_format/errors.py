"""Every exception svdquant raises on purpose.

All of them derive from :class:`SVDQError`, so ``except SVDQError`` catches anything the
library reports about bad input, and nothing else. Messages are one line and name the file,
the tensor key (or layer) and the reason, in that order, the way ``svdq validate`` prints them:

    error: model.safetensors: blocks.0.attn.to_q.wscales: non-finite scale at index 17
"""

from __future__ import annotations

import os

__all__ = [
    "SVDQError",
    "FormatError",
    "HeaderError",
    "VersionError",
    "ManifestError",
    "MixedDirectoryError",
    "TensorError",
    "UnsupportedError",
    "BackendError",
    "QuantizationError",
    "LoRAError",
    "HubError",
    "OutputError",
    "WriteError",
]


class SVDQError(Exception):
    """Base class of every error svdquant raises on purpose."""


class FormatError(SVDQError, ValueError):
    """A file does not follow the SVDQuant checkpoint format (docs/format.md).

    Args:
        file: The file (or directory) that is wrong; ``None`` when it is not known.
        key: The tensor name, layer prefix or metadata field at fault; ``None`` for the
            file as a whole.
        reason: What is wrong, in a few words.
    """

    def __init__(self, file: str | os.PathLike[str] | None, key: str | None, reason: str):
        self.file = None if file is None else os.fspath(file)
        self.key = key
        self.reason = reason
        super().__init__(self._line())

    def _line(self) -> str:
        # always one line: a file or key name with control characters (a hostile manifest's "a\nb") is
        # shown escaped, the reason's whitespace collapsed
        parts = [p if p.isprintable() else p.encode("unicode_escape").decode("ascii") for p in (self.file, self.key)
                 if p]
        parts.append(" ".join(self.reason.split()))
        return ": ".join(parts)


class HeaderError(FormatError):
    """The safetensors container itself is broken: length, JSON, offsets, truncation."""


class VersionError(FormatError):
    """The file was written by a newer, incompatible ``format_version``."""


class ManifestError(FormatError):
    """The SVDQuant metadata (manifest) is missing, malformed or disagrees with the tensors."""


class MixedDirectoryError(ManifestError):
    """A model directory whose files come from different saves (or a save that did not finish),
    or a file replaced while it was being read."""


class TensorError(FormatError):
    """A tensor has the wrong dtype or shape, is missing, unexpected, or holds bad values."""


class UnsupportedError(SVDQError, ValueError):
    """A valid request that this version of svdquant does not implement (named precisely)."""


class BackendError(SVDQError, RuntimeError):
    """A compute backend was requested that cannot run here (no GPU, no compiler, ...)."""


class QuantizationError(SVDQError, ValueError):
    """Quantizing a model or layer failed because of its input (shapes, NaN, ...)."""


class LoRAError(SVDQError, ValueError):
    """A LoRA cannot be read, matched or merged."""


class HubError(SVDQError, RuntimeError):
    """A Hub push or pull failed after retries (the message names repo and file)."""


class OutputError(SVDQError, ValueError):
    """An output path that would destroy data: it is, contains or lies inside an input, is a
    non-empty directory that is not ours (without ``overwrite``), or is a file where a directory
    is needed. Nothing has been written when it is raised."""

    def __init__(self, path: str | os.PathLike[str], reason: str):
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"{self.path}: {' '.join(reason.split())}")


class WriteError(SVDQError, OSError):
    """Writing a file failed (disk full, read-only or missing directory, no permission).

    Raised by every writer of svdquant; the target file, if it existed, is unchanged and no
    temporary file is left behind.
    """

    def __init__(self, path: str | os.PathLike[str], reason: str):
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"{self.path}: cannot write ({reason}); the previous file is unchanged")

    def __str__(self) -> str:  # OSError would format errno/strerror otherwise
        return self.args[0]
