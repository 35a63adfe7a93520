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
from secateurs.passes.criteria import WeightCriterion, channel_criterion, criteria_names
from secateurs.passes.importance import ChannelScores
from secateurs.passes.onnx_base import OnnxPass, OnnxPassResult

__all__ = ["ONNX_CRITERIA", "ScoreOnnxChannels"]

ONNX_CRITERIA = criteria_names(("weights",))  # every criterion that needs the weights alone
OnnxCriterion = str | Callable[[OnnxGraph, DependencyInfo, ChannelGroup], np.ndarray]


class ScoreOnnxChannels(OnnxPass):
    """Analysis pass: score every channel of every prunable group; attaches :class:`ChannelScores`."""

    requires = (DependencyInfo,)
    provides = (ChannelScores,)

    def __init__(self, criterion: OnnxCriterion = "l2") -> None:
        """Create the pass with one of :data:`ONNX_CRITERIA` or a callable ``(graph, info, group) -> scores``.

        Raises:
            BudgetError: The criterion is unknown or needs calibration data (``taylor``, ``activation``, ...).

        """
        if not callable(criterion):
            channel_criterion(criterion, needs=("weights",), where="an ONNX file")
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
            scorer = channel_criterion(self.criterion, needs=("weights",), where="an ONNX file")
            assert isinstance(scorer, WeightCriterion)
            cache: dict[str, np.ndarray] = {}
            for g in info.iter_groups():
                members = []
                for m in g.members:
                    if not m.is_param:
                        continue
                    array = cache.get(m.placeholder)
                    if array is None:
                        array = cache[m.placeholder] = graph.array(m.placeholder)
                    members.append((array, m.dim, info.channel_positions(m, g.id)))
                scores[g.id] = scorer.score(members, g.size, g.name)
            result = ChannelScores(str(self.criterion), scores)
        graph.analyses[ChannelScores] = result
        return OnnxPassResult(graph, False, result)
