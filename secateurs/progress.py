"""Progress reporting that the library emits and the command line renders.

Library code never prints (see the conventions): long loops wrap their iterable in :func:`track` and long
single steps run inside :func:`stage`. Both do nothing until a front end installs a renderer with
:func:`reporting`; the CLI installs tqdm bars on standard error.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol, TypeVar

__all__ = ["Renderer", "counting_renderer", "reporting", "stage", "tqdm_renderer", "track"]

T = TypeVar("T")


class Renderer(Protocol):
    """What a front end supplies: wrap an iterable in a progress display."""

    def __call__(self, iterable: Iterable[Any], desc: str, total: int | None) -> Iterable[Any]:
        """Return an iterable yielding the same items while showing progress."""
        ...


_RENDERER: contextvars.ContextVar[Renderer | None] = contextvars.ContextVar("secateurs_progress", default=None)


def track(iterable: Iterable[T], desc: str, total: int | None = None) -> Iterable[T]:
    """``iterable`` itself, shown as a progress bar named ``desc`` when a renderer is installed."""
    renderer = _RENDERER.get()
    if renderer is None:
        return iterable
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    return renderer(iterable, desc, total)


@contextlib.contextmanager
def stage(desc: str) -> Iterator[None]:
    """Show ``desc`` as a one-step bar while the body runs (an export, an engine build)."""
    for _ in track(range(1), desc):
        yield


@contextlib.contextmanager
def reporting(renderer: Renderer | None) -> Iterator[None]:
    """Install ``renderer`` for the body (None: silence)."""
    token = _RENDERER.set(renderer)
    try:
        yield
    finally:
        _RENDERER.reset(token)


def tqdm_renderer(file: Any = None, disable: bool | None = False) -> Renderer:
    """A renderer drawing tqdm bars (standard error unless ``file``) that vanish when done (``disable=None``: TTY only)."""
    from tqdm.auto import tqdm

    def render(iterable: Iterable[Any], desc: str, total: int | None) -> Iterable[Any]:
        return tqdm(iterable, desc=desc, total=total, file=file, leave=False, disable=disable, dynamic_ncols=True)

    return render


def counting_renderer(log: list[tuple[str, int | None]]) -> Callable[[Iterable[Any], str, int | None], Iterable[Any]]:
    """A renderer that records ``(desc, total)`` of every tracked loop in ``log`` (for tests and pipelines)."""

    def render(iterable: Iterable[Any], desc: str, total: int | None) -> Iterable[Any]:
        log.append((desc, total))
        return iterable

    return render
