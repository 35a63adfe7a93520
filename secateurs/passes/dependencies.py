"""AnalyzeDependencies: build the coupled channel groups of a captured graph."""

from __future__ import annotations

import dataclasses

from secateurs.ir.depgraph import DependencyInfo, analyze
from secateurs.ir.graph import Graph
from secateurs.ir.rules import OpRuleTable
from secateurs.passes.base import Pass, PassResult

__all__ = ["AnalyzeDependencies", "DependencyRecord"]


@dataclasses.dataclass(frozen=True)
class DependencyRecord:
    """Summary of the analysis for reports."""

    groups: int
    prunable_channels: int
    frozen: int
    unsupported_ops: tuple[str, ...]

    @classmethod
    def of(cls, info: DependencyInfo) -> DependencyRecord:
        """The summary of an analysis (either IR)."""
        return cls(len(info.groups), sum(g.size for g in info.groups.values()), len(info.frozen),
                   tuple(info.unsupported))


class AnalyzeDependencies(Pass):
    """Analysis pass: propagate channels through the op rule table and attach :class:`DependencyInfo`.

    Guarantees: every parameter dim is either in exactly one prunable group per leaf channel space or frozen
    with a reason; graph inputs and outputs are frozen.
    """

    provides = (DependencyInfo,)

    def __init__(self, rules: OpRuleTable | None = None) -> None:
        """Analyse with the op rule table ``rules`` (default: the built-in :data:`secateurs.ir.RULES`)."""
        self.rules = rules

    def run(self, graph: Graph) -> PassResult:
        """Analyse ``graph``."""
        info = analyze(graph, self.rules)
        graph.analyses[DependencyInfo] = info
        return PassResult(graph, False, DependencyRecord.of(info))
