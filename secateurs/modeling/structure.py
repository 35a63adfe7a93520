"""What the passes and the exporters know about a model's structure: its mixture-of-experts blocks.

MoE routing is data-dependent (top-k, gathers), so expert structure is recognised on the module tree rather
than through the op rule table: a block with a *router* (a child whose ``weight`` is ``[E, hidden]``) and
*experts* (a child holding ``E`` experts: fused 3-D parameters with a leading ``E`` dim, as in Hugging Face's
Mixtral / Qwen2-MoE, or an ``nn.ModuleList`` of ``E`` MLPs).
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn

__all__ = ["MoEBlock", "find_moe_blocks"]

log = logging.getLogger(__name__)

_ROUTER_NAMES = ("gate", "router", "gating")
_EXPERT_NAMES = ("experts",)
_UP_NAMES = ("w1", "w3", "gate_proj", "up_proj", "fc1")
_DOWN_NAMES = ("w2", "down_proj", "fc2")


@dataclasses.dataclass(frozen=True)
class MoEBlock:
    """A recognised mixture-of-experts block.

    Attributes:
        name: The block's module name.
        router: The router's module name (its ``weight`` is ``[E, hidden]``).
        experts: The experts' module name.
        num_experts: E.
        top_k: Experts per token.
        fused: True for 3-D fused expert parameters, False for an ``nn.ModuleList``.

    """

    name: str
    router: str
    experts: str
    num_experts: int
    top_k: int
    fused: bool


def _join(a: str, b: str) -> str:
    return f"{a}.{b}" if a else b


def find_moe_blocks(model: nn.Module) -> list[MoEBlock]:
    """Every mixture-of-experts block of ``model`` (see the module docstring for what is recognised)."""
    blocks: list[MoEBlock] = []
    for name, mod in model.named_modules():
        router_name = next((n for n in _ROUTER_NAMES if isinstance(mod._modules.get(n), nn.Module)), None)
        experts_name = next((n for n in _EXPERT_NAMES if isinstance(mod._modules.get(n), nn.Module)), None)
        if router_name is None or experts_name is None:
            continue
        router, experts = mod._modules[router_name], mod._modules[experts_name]
        weight = getattr(router, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            continue
        e = int(weight.shape[0])
        if isinstance(experts, nn.ModuleList):
            fused = False
            if len(experts) != e:
                continue
        else:
            params = [p for p in experts.parameters(recurse=False) if p.dim() == 3]
            if not params or any(p.shape[0] != e for p in params):
                continue
            fused = True
        top_k = next((getattr(m, a) for m in (router, mod) for a in ("top_k", "num_experts_per_tok")
                      if isinstance(getattr(m, a, None), int)), None)
        if top_k is None:
            log.info("MoE-like block %s has no top_k attribute; left alone", name)
            continue
        blocks.append(MoEBlock(name, _join(name, router_name), _join(name, experts_name), e, int(top_k), fused))
    return blocks
