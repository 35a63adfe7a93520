"""Passes: analyses that attach typed metadata and transforms that rewrite the model."""

from secateurs.passes.allocate import ALLOCATORS, AllocateBudget, LayerBudget
from secateurs.passes.armor import ArmorLinear, ArmorRecord, FactorizeARMOR, fit_armor
from secateurs.passes.base import Pass, PassManager, PassResult, PipelineResult, graph_invariants
from secateurs.passes.channels import ChannelOptions, GroupChange, PruneChannels, PruneRecord
from secateurs.passes.dependencies import AnalyzeDependencies, DependencyRecord
from secateurs.passes.depth import (
    DEPTH_CRITERIA,
    DepthRecord,
    RemoveBlocks,
    RemoveSublayers,
    ZeroSublayer,
    find_blocks,
    find_sublayers,
)
from secateurs.passes.distill import (
    LORA_BACKENDS,
    RECOVER_MODES,
    LoraAdapters,
    LossPoint,
    Recover,
    RecoverOptions,
    RecoverRecord,
    attach_lora,
    layer_map_from_depth,
)
from secateurs.passes.experts import (
    ExpertChange,
    ExpertScores,
    MoEBlock,
    PruneExpertNeurons,
    PruneExperts,
    ScoreExperts,
    find_moe_blocks,
)
from secateurs.passes.importance import CRITERIA, ChannelScores, ScoreChannels
from secateurs.passes.lowrank import FactorizeLowRank, LowRankLinear, LowRankRecord
from secateurs.passes.recover import ReconstructLayers, ReconstructRecord
from secateurs.passes.sparsity import (
    SPARSITY_CRITERIA,
    SparsifyWeights,
    SparsityRecord,
    check_nm,
    remove_masks,
    sparsity_of,
)

__all__ = [
    "ALLOCATORS",
    "CRITERIA",
    "AllocateBudget",
    "ArmorLinear",
    "ArmorRecord",
    "FactorizeARMOR",
    "fit_armor",
    "LayerBudget",
    "DEPTH_CRITERIA",
    "DepthRecord",
    "RemoveBlocks",
    "RemoveSublayers",
    "ZeroSublayer",
    "find_blocks",
    "find_sublayers",
    "AnalyzeDependencies",
    "ChannelOptions",
    "ChannelScores",
    "DependencyRecord",
    "ExpertChange",
    "ExpertScores",
    "MoEBlock",
    "GroupChange",
    "Pass",
    "PassManager",
    "PassResult",
    "PipelineResult",
    "PruneChannels",
    "PruneExpertNeurons",
    "PruneExperts",
    "PruneRecord",
    "ScoreChannels",
    "SPARSITY_CRITERIA",
    "FactorizeLowRank",
    "LowRankLinear",
    "LowRankRecord",
    "ReconstructLayers",
    "ReconstructRecord",
    "ScoreExperts",
    "SparsifyWeights",
    "SparsityRecord",
    "check_nm",
    "remove_masks",
    "sparsity_of",
    "find_moe_blocks",
    "graph_invariants",
    "LORA_BACKENDS",
    "RECOVER_MODES",
    "LoraAdapters",
    "LossPoint",
    "Recover",
    "RecoverOptions",
    "RecoverRecord",
    "attach_lora",
    "layer_map_from_depth",
]
