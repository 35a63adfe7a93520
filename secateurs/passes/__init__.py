"""Passes: analyses that attach typed metadata and transforms that rewrite the model."""

from secateurs.passes.base import Pass, PassManager, PassResult, PipelineResult, graph_invariants
from secateurs.passes.channels import ChannelOptions, GroupChange, PruneChannels, PruneRecord
from secateurs.passes.dependencies import AnalyzeDependencies, DependencyRecord
from secateurs.passes.importance import CRITERIA, ChannelScores, ScoreChannels

__all__ = [
    "CRITERIA",
    "AnalyzeDependencies",
    "ChannelOptions",
    "ChannelScores",
    "DependencyRecord",
    "GroupChange",
    "Pass",
    "PassManager",
    "PassResult",
    "PipelineResult",
    "PruneChannels",
    "PruneRecord",
    "ScoreChannels",
    "graph_invariants",
]
