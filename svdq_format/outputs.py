"""Output paths that cannot destroy data (docs/reliability.md, promise 10).

Every command and converter that writes a model, a file or a directory checks its output here
*before* reading or computing anything:

* the output is not an input, does not contain one and does not lie inside one (paths are
  resolved, so ``.``/``..``/symlinks do not hide the overlap);
* a directory output that exists is a directory, and if it is not empty it holds only what an
  interrupted run of ours left (hidden temporary files, the quantizer's resume state) unless
  ``overwrite`` is given — then the whole-directory commit of :mod:`svdq_format.commit` replaces
  the model files as one unit;
* a file output is not an existing directory.

A refusal is one :class:`~svdq_format.errors.OutputError` line naming the path and the reason.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from .errors import OutputError

__all__ = ["check_output", "inside_directory"]

#: Entries an interrupted write of ours leaves in an output directory (not "foreign").
_OURS_PREFIXES = (".svdq-",)
_OURS_SUFFIXES = (".tmp",)


def _ours(name: str) -> bool:
    return name.startswith(".") and (name.startswith(_OURS_PREFIXES) or name.endswith(_OURS_SUFFIXES))


def _overlap(out: Path, inp: Path) -> str | None:
    if out == inp:
        return "is"
    if inp.is_relative_to(out):
        return "contains"
    if out.is_relative_to(inp):
        return "lies inside"
    return None


def check_output(
    output: str | os.PathLike[str],
    inputs: Iterable[str | os.PathLike[str] | None],
    *,
    directory: bool,
    overwrite: bool = False,
) -> Path:
    """Refuse an output path that would destroy data; return it.

    Args:
        output: The file or directory about to be written.
        inputs: The paths the command reads (None and Hub ids that are no local path are
            skipped).
        directory: The output is a directory (else a file).
        overwrite: Accept a non-empty directory that holds other files (the user's
            ``--overwrite``).

    Raises:
        OutputError: naming the output and why it is refused.
    """
    out = Path(output)
    real = out.resolve()
    for inp in inputs:
        if inp is None or not os.path.exists(inp):
            continue
        how = _overlap(real, Path(inp).resolve())
        if how:
            raise OutputError(out, f"{how} the input {inp}: refusing to write over what is being read")
    if directory:
        if out.exists() and not out.is_dir():
            raise OutputError(out, "exists and is not a directory")
        if out.is_dir() and not overwrite:
            foreign = sorted(e.name for e in out.iterdir() if not _ours(e.name))
            if foreign:
                shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
                raise OutputError(out, f"directory is not empty ({shown}); pass --overwrite (overwrite=True) "
                                  "to replace its model")
    elif out.is_dir():
        raise OutputError(out, "is a directory; give a file name")
    return out


def inside_directory(directory: str | os.PathLike[str], name: str) -> Path | None:
    """``directory / name`` for a file name from a user or a file, or None when that would leave
    ``directory`` (an absolute name, ``..``, a symlink pointing out)."""
    if not name or os.path.isabs(name) or Path(name).drive:
        return None
    p = Path(directory) / name
    return p if p.resolve().is_relative_to(Path(directory).resolve()) else None
