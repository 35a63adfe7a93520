"""Atomic file and folder writing shared by every backend.

A temporary name next to the destination, the usual permissions, then a rename; errors name the path and
leave nothing behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from secateurs.errors import CheckpointError

__all__ = ["atomic_dir", "atomic_file", "guard_source", "make_parents", "publish", "remove_made", "replace_into"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish(path: str | os.PathLike[str]) -> None:
    """Give a temporary file or folder the permissions a plain ``open`` / ``mkdir`` would have.

    ``mkstemp`` / ``mkdtemp`` create owner-only entries; a model served by another user must stay readable.
    """
    p = Path(path)
    mask = _umask()
    if p.is_dir():
        for root, dirs, files in os.walk(p):
            os.chmod(root, 0o777 & ~mask)
            for d in dirs:
                os.chmod(os.path.join(root, d), 0o777 & ~mask)
            for f in files:
                os.chmod(os.path.join(root, f), 0o666 & ~mask)
    else:
        os.chmod(p, 0o666 & ~mask)


def guard_source(src: str | os.PathLike[str], out: str | os.PathLike[str], flag: str = "the output") -> None:
    """Refuse an output that is, is inside, or contains the source, links resolved (it would destroy the source).

    Raises:
        CheckpointError: ``out`` and ``src`` overlap; the message names both.

    """
    s, o = Path(src).resolve(), Path(out).resolve()
    if o == s:
        why = "is the source itself"
    elif s in o.parents:
        why = "is inside the source"
    elif o in s.parents:
        why = "contains the source"
    else:
        return
    raise CheckpointError(f"{flag} '{out}' {why} '{src}': writing it would destroy the source; choose another path")


def make_parents(path: Path) -> list[Path]:
    """Create the missing folders above ``path``; returns those it created, outermost first.

    Raises:
        CheckpointError: A folder cannot be created.

    """
    missing: list[Path] = []
    p = path.absolute().parent
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    try:
        path.absolute().parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        remove_made(list(reversed(missing)))
        raise CheckpointError(f"cannot create the folder of '{path}': {exc}") from exc
    return list(reversed(missing))


def remove_made(made: list[Path]) -> None:
    """Remove the folders :func:`make_parents` created, innermost first, as long as they are empty."""
    for d in reversed(made):
        try:
            d.rmdir()
        except OSError:
            return


def replace_into(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``, replacing whatever ``out`` was, with nothing left behind.

    ``out`` may be a folder, a file or a link (a link is replaced, never followed).
    """
    if not (out.is_symlink() or out.exists()):
        os.replace(tmp, out)
        return
    # The old one waits in a fresh private folder (a fixed name such as one ending in the process id can be
    # taken by another writer, e.g. in another container sharing the disk).
    holder = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    old = holder / "old"
    try:
        os.replace(out, old)
    except OSError:
        holder.rmdir()
        raise
    try:
        os.replace(tmp, out)
    except OSError:
        os.replace(old, out)
        holder.rmdir()
        raise
    shutil.rmtree(holder, ignore_errors=True)  # never follows a link: the old link itself goes


def _parent(path: Path) -> list[Path]:
    made = make_parents(path)
    if path.is_dir():
        remove_made(made)
        raise CheckpointError(f"'{path}' is a folder; give a file name")
    return made


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; when the body succeeds it is renamed over ``path``.

    Raises:
        CheckpointError: The folder cannot be written (disk full, permission denied, ...); nothing is left.

    """
    out = Path(path)
    made = _parent(out)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=suffix or ".tmp", dir=out.parent)
    except OSError as exc:
        remove_made(made)
        raise CheckpointError(f"cannot write into '{out.parent}': {exc}") from exc
    os.close(fd)
    tmp = Path(name)
    done = False
    try:
        yield tmp
        publish(tmp)
        os.replace(tmp, out)
        done = True
    except OSError as exc:
        raise CheckpointError(f"writing '{out}' failed, nothing was written: {exc}") from exc
    finally:
        if tmp.exists():
            tmp.unlink()
        if not done:
            remove_made(made)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``path`` (for a file plus its sidecars); removed afterwards.

    The caller moves what it wrote into place; errors are reported as :class:`CheckpointError`.
    """
    out = Path(path)
    made = _parent(out)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as exc:
        remove_made(made)
        raise CheckpointError(f"cannot write into '{out.parent}': {exc}") from exc
    try:
        yield tmp
    except OSError as exc:
        raise CheckpointError(f"writing '{out}' failed, nothing was written: {exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if not out.exists():
            remove_made(made)
