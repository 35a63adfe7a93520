"""ScoreOnnxChannels: magnitude importance of every channel of every group of an ONNX graph.

The criteria are those of :class:`secateurs.passes.importance.ScoreChannels` that need only the weights:
``l1`` (sum of |w|), ``l2`` (root of the sum of w^2) and ``maw`` (largest |w|), over every weight member of
a group; a callable ``(graph, info, group) -> scores`` is also accepted. Calibration-based criteria need
a PyTorch model and are not available on an ONNX file.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from secateurs.errors import BudgetError
from secateurs.ir.depgraph import ChannelGroup, DependencyInfo
from secateurs.ir.onnx_graph import OnnxGraph
from secateurs.passes.importance import ChannelScores
from secateurs.passes.onnx_base import OnnxPass, OnnxPassResult

__all__ = ["ONNX_CRITERIA", "ScoreOnnxChannels"]

ONNX_CRITERIA = ("l1", "l2", "maw")
OnnxCriterion = str | Callable[[OnnxGraph, DependencyInfo, ChannelGroup], np.ndarray]


def _per_position(array: np.ndarray, dim: int, how: str) -> np.ndarray:
    x = np.moveaxis(np.asarray(array, dtype=np.float64), dim, 0).reshape(array.shape[dim], -1)
    if how == "l1":
        return np.abs(x).sum(1)
    if how == "l2":
        return np.square(x).sum(1)
    return np.abs(x).max(1) if x.shape[1] else np.zeros(x.shape[0])


def _reduce_positions(values: np.ndarray, idx: np.ndarray, size: int, how: str) -> np.ndarray:
    hit = idx >= 0
    if how == "max":
        out = np.zeros(size)
        np.maximum.at(out, idx[hit], values[hit])
        return out
    return np.bincount(idx[hit], weights=values[hit], minlength=size).astype(np.float64)


class ScoreOnnxChannels(OnnxPass):
    """Analysis pass: score every channel of every prunable group; attaches :class:`ChannelScores`."""

    requires = (DependencyInfo,)
    provides = (ChannelScores,)

    def __init__(self, criterion: OnnxCriterion = "l2") -> None:
        """Create the pass with one of :data:`ONNX_CRITERIA` or a callable ``(graph, info, group) -> scores``.

        Raises:
            BudgetError: The criterion is unknown or needs calibration data (``taylor``, ``activation``, ...).

        """
        if not callable(criterion) and criterion not in ONNX_CRITERIA:
            raise BudgetError(
                f"importance {criterion!r} is not available for ONNX files; choose one of {', '.join(ONNX_CRITERIA)} "
                "(calibration-based criteria need the PyTorch model)"
            )
        self.criterion = criterion

    def run(self, graph: OnnxGraph) -> OnnxPassResult:
        """Score every group of the dependency analysis."""
        info = graph.analysis(DependencyInfo)
        scores: dict[int, np.ndarray] = {}
        if callable(self.criterion):
            for g in info.iter_groups():
                s = np.asarray(self.criterion(graph, info, g), dtype=np.float64)
                if s.shape != (g.size,):
                    raise BudgetError(f"custom importance for group {g.name} has shape {s.shape}, expected ({g.size},)")
                scores[g.id] = s
            result = ChannelScores("custom", scores)
        else:
            how = "max" if self.criterion == "maw" else str(self.criterion)
            cache: dict[str, np.ndarray] = {}
            for g in info.iter_groups():
                total = np.zeros(g.size)
                for m in g.members:
                    if not m.is_param:
                        continue
                    array = cache.get(m.placeholder)
                    if array is None:
                        array = cache[m.placeholder] = graph.array(m.placeholder)
                    per = _per_position(array, m.dim, how)
                    red = _reduce_positions(per, info.channel_positions(m, g.id), g.size,
                                            "max" if how == "max" else "sum")
                    total = np.maximum(total, red) if how == "max" else total + red
                scores[g.id] = np.sqrt(total) if how == "l2" else total
            result = ChannelScores(str(self.criterion), scores)
        graph.analyses[ChannelScores] = result
        return OnnxPassResult(graph, False, result)
