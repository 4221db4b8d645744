"""Hub calls retried on transient failures; what still fails is one line of :class:`HubError`."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from .errors import FormatError, HubError

__all__ = ["one_line", "is_permanent", "retrying"]

T = TypeVar("T")


def one_line(exc: BaseException) -> str:
    """The exception (and its cause) as one line of at most 400 characters."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    cause = exc.__cause__
    if cause is not None and str(cause) and str(cause) not in str(exc):  # e.g. "Error while uploading" ← the HTTP error
        text += " (" + " ".join(str(cause).split()) + ")"
    return text if len(text) <= 400 else text[:397] + "..."


def is_permanent(exc: BaseException, *, offline: bool) -> bool:
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


def retrying(what: str, fn: Callable[[], T], *, retries: int, wait: float, offline: bool = False) -> T:
    """``fn()``, retried ``retries`` times (waits of ``wait`` seconds, doubled each time) unless the
    error is permanent (:func:`is_permanent`).

    Raises:
        HubError: ``what`` and the last error, in one line.
    """
    last: BaseException | None = None
    for attempt in range(retries + 1):
        try:
            return fn()
        except HubError:
            raise
        except Exception as exc:  # noqa: BLE001 - classified below
            if is_permanent(exc, offline=offline):
                raise HubError(f"{what}: {one_line(exc)}") from exc
            last = exc
            if attempt < retries:
                time.sleep(wait * (2**attempt))
    assert last is not None
    raise HubError(f"{what}: failed after {retries + 1} attempts: {one_line(last)}") from last
