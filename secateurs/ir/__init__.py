"""The IR: captured graph, channel atoms, op rule table and dependency analysis."""

from secateurs.ir.atoms import AtomTable
from secateurs.ir.depgraph import ChannelGroup, DependencyInfo, FrozenGroup, Member, analyze
from secateurs.ir.graph import Graph
from secateurs.ir.rules import RULES, OpRuleTable, RuleContext, op_rule

__all__ = [
    "RULES",
    "AtomTable",
    "ChannelGroup",
    "DependencyInfo",
    "FrozenGroup",
    "Graph",
    "Member",
    "OpRuleTable",
    "RuleContext",
    "analyze",
    "op_rule",
]
