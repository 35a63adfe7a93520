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

__all__ = ["atomic_dir", "atomic_file", "publish"]


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


def _parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(f"cannot create the folder of '{path}': {exc}") from exc
    if path.is_dir():
        raise CheckpointError(f"'{path}' is a folder; give a file name")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; when the body succeeds it is renamed over ``path``.

    Raises:
        CheckpointError: The folder cannot be written (disk full, permission denied, ...); nothing is left.

    """
    out = Path(path)
    _parent(out)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=suffix or ".tmp", dir=out.parent)
    except OSError as exc:
        raise CheckpointError(f"cannot write into '{out.parent}': {exc}") from exc
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        publish(tmp)
        os.replace(tmp, out)
    except OSError as exc:
        raise CheckpointError(f"writing '{out}' failed, nothing was written: {exc}") from exc
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``path`` (for a file plus its sidecars); removed afterwards.

    The caller moves what it wrote into place; errors are reported as :class:`CheckpointError`.
    """
    out = Path(path)
    _parent(out)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as exc:
        raise CheckpointError(f"cannot write into '{out.parent}': {exc}") from exc
    try:
        yield tmp
    except OSError as exc:
        raise CheckpointError(f"writing '{out}' failed, nothing was written: {exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
