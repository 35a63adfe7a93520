"""Reports for people: plots of what a pruning run did (matplotlib, optional)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from secateurs.errors import CheckpointError
from secateurs.passes.depth import DepthRecord

__all__ = ["plot_depth"]


def plot_depth(record: DepthRecord, path: str | os.PathLike[str]) -> Path:
    """Bar chart of every depth candidate's score, removed ones highlighted; written atomically as PNG.

    Raises:
        CheckpointError: matplotlib is missing or the file cannot be written.

    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise CheckpointError("plotting needs matplotlib: pip install 'secateurs[plot]'") from exc
    out = Path(path)
    names = [n for n, _ in record.scores]
    values = [v for _, v in record.scores]
    gone = {n for n, _ in record.removed}
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * len(names)), 3.2))
    ax.bar(range(len(names)), values, color=["tab:red" if n in gone else "tab:blue" for n in names])
    ax.set_xticks(range(len(names)), [n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[-1] if "." in n else n
                                      for n in names], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel(record.criterion)
    ax.set_title(f"depth candidates ({record.criterion}); red = removed")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".png", dir=out.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, out)
    except OSError as exc:
        raise CheckpointError(f"cannot write plot '{out}': {exc}") from exc
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
    return out
