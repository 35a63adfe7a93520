"""Mixture-of-experts pruning: whole experts (with the router's rows) and neurons inside every expert.

MoE routing is data-dependent (top-k, gathers), so expert structure is recognised on the module tree rather
than through the op rule table: a block with a *router* (a child whose ``weight`` is ``[E, hidden]``) and
*experts* (a child holding ``E`` experts: fused 3-D parameters with a leading ``E`` dim, as in Hugging Face's
Mixtral / Qwen2-MoE, or an ``nn.ModuleList`` of ``E`` MLPs).

Importance of an expert comes from calibration data (the UNCURL idea of task-specific expert pruning):
``frequency`` counts the tokens that route to it in their top-k, ``mass`` sums its router probability over
all tokens, ``output_norm`` sums the norm of the expert's (routing-weighted) output over the tokens it serves. Removing experts keeps ``top_k <= experts left``; if the router renormalises its top-k weights
(Mixtral), removing an expert that no token selects leaves outputs unchanged.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from secateurs.distributed import all_reduce_sum, shard
from secateurs.errors import BudgetError, VerificationError
from secateurs.frontends.torch_export import capture_call
from secateurs.ir.graph import Graph
from secateurs.modeling.rewrite import Snapshot
from secateurs.modeling.structure import _DOWN_NAMES, _UP_NAMES, MoEBlock, find_moe_blocks
from secateurs.passes.base import Pass, PassResult, transaction
from secateurs.passes.criteria import step_criteria
from secateurs.passes.hooks import calibration_calls, first_tensor, run_calibration

__all__ = ["ExpertChange", "ExpertScores", "MoEBlock", "PruneExpertNeurons", "PruneExperts", "ScoreExperts", "find_moe_blocks"]

log = logging.getLogger(__name__)

EXPERT_CRITERIA = step_criteria("experts")  # registered in secateurs.passes.criteria


@dataclasses.dataclass
class ExpertScores:
    """Per-block expert importances (higher = more important) and the routing statistics behind them."""

    criterion: str
    scores: dict[str, np.ndarray]
    batches: int


class ScoreExperts(Pass):
    """Analysis pass: route calibration batches and score every expert of every MoE block."""

    provides = (ExpertScores,)

    def __init__(self, criterion: str = "frequency", *, calib: Iterable[Any] | None = None) -> None:
        """Create the pass.

        Args:
            criterion: ``"frequency"`` (tokens routed to the expert), ``"mass"`` (summed router probability) or
                ``"output_norm"`` (summed norm of the expert's weighted output on the tokens routed to it).
            calib: Calibration batches (tuples or dicts); defaults to the capture's example inputs.

        """
        if criterion not in EXPERT_CRITERIA:
            raise BudgetError(f"unknown expert criterion {criterion!r}; choose from {EXPERT_CRITERIA}")
        self.criterion = criterion
        self.calib = calib

    def run(self, graph: Graph) -> PassResult:
        """Score the experts of ``graph.module``."""
        model = graph.module
        blocks = find_moe_blocks(model)
        freq = {b.name: np.zeros(b.num_experts) for b in blocks}
        norms = {b.name: np.zeros(b.num_experts) for b in blocks}
        mass = {b.name: np.zeros(b.num_experts) for b in blocks}
        hooks = []
        for b in blocks:
            def hook(_m: nn.Module, _inp: Any, out: Any, b: MoEBlock = b) -> None:
                logits = first_tensor(out)
                if logits is None:
                    raise BudgetError(f"router '{b.router}' returned no logits tensor")
                probs = torch.softmax(logits.detach().float().reshape(-1, b.num_experts), -1)
                top = probs.topk(b.top_k, -1).indices.reshape(-1)
                freq[b.name] += np.bincount(top.numpy(), minlength=b.num_experts)
                mass[b.name] += probs.sum(0).double().numpy()

            hooks.append(model.get_submodule(b.router).register_forward_hook(hook))
            if self.criterion == "output_norm":
                hooks.extend(self._norm_hooks(model, b, norms))
        calib = shard(calibration_calls(graph, self.calib))  # under torchrun: this rank's share, then summed
        run_calibration(model, calib, hooks)
        chosen = {"frequency": freq, "mass": mass, "output_norm": norms}[self.criterion]
        chosen = all_reduce_sum(chosen)
        batches = int(all_reduce_sum({"batches": len(calib)})["batches"])
        result = ExpertScores(self.criterion, chosen, batches)
        graph.analyses[ExpertScores] = result
        return PassResult(graph, False, result)


    @staticmethod
    def _norm_hooks(model: nn.Module, b: MoEBlock, norms: dict[str, np.ndarray]) -> list[Any]:
        """Hooks that add each expert's output norm on its tokens to ``norms[b.name]``."""
        experts = model.get_submodule(b.experts)
        if not b.fused:
            def per_expert(index: int) -> Any:
                def hook(_m: nn.Module, _inp: Any, out: Any) -> None:
                    if isinstance(out, torch.Tensor):
                        norms[b.name][index] += float(out.detach().float().norm(dim=-1).sum())
                return hook
            return [e.register_forward_hook(per_expert(i)) for i, e in enumerate(experts.children())]
        gate_up, down = experts._parameters.get("gate_up_proj"), experts._parameters.get("down_proj")
        act = getattr(experts, "act_fn", None)
        if gate_up is None or down is None or act is None:
            raise BudgetError(f"output_norm needs gate_up_proj, down_proj and act_fn on '{b.experts}'")

        def hook(_m: nn.Module, inputs: tuple[Any, ...]) -> None:
            hidden, index, weights = inputs[0], inputs[1], inputs[2]
            with torch.no_grad():
                for e in range(b.num_experts):
                    tok, slot = torch.where(index == e)
                    if tok.numel() == 0:
                        continue
                    g, u = torch.nn.functional.linear(hidden[tok], gate_up[e]).chunk(2, dim=-1)
                    out = torch.nn.functional.linear(act(g) * u, down[e]) * weights[tok, slot, None]
                    norms[b.name][e] += float(out.float().norm(dim=-1).sum())

        return [experts.register_forward_pre_hook(hook)]


@dataclasses.dataclass(frozen=True)
class ExpertChange:
    """Experts (or per-expert neurons) of one block before and after."""

    block: str
    before: int
    after: int
    what: str = "experts"


def _replace(snap: Snapshot, owner: nn.Module, name: str, new: torch.Tensor) -> None:
    old = owner._parameters[name]
    snap.record(owner, "param", name, old)
    owner._parameters[name] = nn.Parameter(new.contiguous(), requires_grad=old.requires_grad)  # type: ignore[union-attr]


def _set(snap: Snapshot, owner: Any, name: str, value: Any) -> None:
    if hasattr(owner, name):
        snap.record(owner, "attr", name, getattr(owner, name))
        setattr(owner, name, value)


def _recapture(graph: Graph, snap: Snapshot, what: str) -> Graph:
    try:
        return capture_call(graph.module, graph.args, graph.kwargs)
    except Exception as exc:
        snap.restore()
        raise VerificationError(f"the model no longer runs after {what}; it was restored: {exc}") from exc


class PruneExperts(Pass):
    """Transform pass: remove the least important experts of every MoE block, with their router rows.

    Requires :class:`ExpertScores`. Attributes ``num_experts`` of the router, the experts and the block are
    updated. At least ``max(top_k, ceil(E * min_keep))`` experts stay.
    """

    requires = (ExpertScores,)
    transforms = True
    transactional = True

    def __init__(self, ratio: float, *, min_keep: float = 0.0) -> None:
        """Remove ``ratio`` (in [0, 1)) of the experts of every block."""
        if not isinstance(ratio, (int, float)) or math.isnan(ratio) or not 0.0 <= ratio < 1.0:
            raise BudgetError(f"experts ratio must be in [0, 1), got {ratio!r}")
        self.ratio = float(ratio)
        self.min_keep = min_keep

    def run(self, graph: Graph) -> PassResult:
        """Remove experts and re-capture the model."""
        scores = graph.analysis(ExpertScores).scores
        model = graph.module
        snap = transaction()
        changes: list[ExpertChange] = []
        with torch.no_grad():
            for b in find_moe_blocks(model):
                keep_n = max(b.top_k, math.ceil(b.num_experts * self.min_keep),
                             b.num_experts - int(round(b.num_experts * self.ratio)))
                if keep_n >= b.num_experts or b.name not in scores:
                    continue
                order = np.argsort(-scores[b.name], kind="stable")
                kept = torch.from_numpy(np.sort(order[:keep_n]))
                router = model.get_submodule(b.router)
                for pname in ("weight", "bias"):
                    p = router._parameters.get(pname)
                    if p is not None and p.shape[0] == b.num_experts:
                        _replace(snap, router, pname, p.detach().index_select(0, kept))
                experts = model.get_submodule(b.experts)
                if b.fused:
                    for pname, p in list(experts._parameters.items()):
                        if p is not None and p.dim() >= 2 and p.shape[0] == b.num_experts:
                            _replace(snap, experts, pname, p.detach().index_select(0, kept))
                else:
                    assert isinstance(experts, nn.ModuleList)
                    snap.record(experts, "attr", "_modules", experts._modules)
                    experts._modules = {str(i): experts[int(j)] for i, j in enumerate(kept.tolist())}
                for owner in (router, experts, model.get_submodule(b.name)):
                    for attr in ("num_experts", "num_local_experts", "out_features"):
                        if isinstance(getattr(owner, attr, None), int) and getattr(owner, attr) == b.num_experts:
                            _set(snap, owner, attr, keep_n)
                changes.append(ExpertChange(b.name, b.num_experts, keep_n))
        if not changes:
            return PassResult(graph, False, changes)
        # The top-level model keeps a count for its load-balancing loss; it holds when every block agrees.
        counts = {b.num_experts for b in find_moe_blocks(model)}
        olds = {c.before for c in changes}
        if len(counts) == 1 and len(olds) == 1 and getattr(model, "num_experts", None) == olds.pop():
            _set(snap, model, "num_experts", counts.pop())
        return PassResult(_recapture(graph, snap, "removing experts"), True, changes)


class PruneExpertNeurons(Pass):
    """Transform pass: remove the same number of FFN neurons from every expert (each its own choice).

    Neuron importance is MAW (the largest absolute weight a neuron owns in its gate / up rows and down
    column), computed per expert. Fused experts keep a rectangular ``[E, 2I', H]`` / ``[E, H, I']`` layout, with
    ``I'`` rounded to the nearest multiple of 8 neurons (16 bytes in bf16 / fp16, the dtype a checkpoint pruned in
    fp32 may be served in): torch's ``grouped_mm``, which transformers runs fused experts with, refuses other
    strides.
    """

    transforms = True
    transactional = True

    def __init__(self, ratio: float) -> None:
        """Remove ``ratio`` (in [0, 1)) of the neurons of every expert."""
        if not isinstance(ratio, (int, float)) or math.isnan(ratio) or not 0.0 <= ratio < 1.0:
            raise BudgetError(f"expert neuron ratio must be in [0, 1), got {ratio!r}")
        self.ratio = float(ratio)

    def run(self, graph: Graph) -> PassResult:
        """Slice every expert's neurons and re-capture the model."""
        model = graph.module
        snap = transaction()
        changes: list[ExpertChange] = []
        with torch.no_grad():
            for b in find_moe_blocks(model):
                experts = model.get_submodule(b.experts)
                change = self._fused(snap, experts, b) if b.fused else self._listed(snap, experts, b)
                if change is not None:
                    changes.append(change)
        if not changes:
            return PassResult(graph, False, changes)
        return PassResult(_recapture(graph, snap, "pruning expert neurons"), True, changes)

    def _keep(self, n: int) -> int:
        return max(1, n - int(round(n * self.ratio)))

    def _fused(self, snap: Snapshot, experts: nn.Module, b: MoEBlock) -> ExpertChange | None:
        gate_up = experts._parameters.get("gate_up_proj")
        down = experts._parameters.get("down_proj")
        if gate_up is None or down is None or gate_up.shape[1] % 2:
            log.info("fused experts %s have no gate_up_proj/down_proj pair; neurons left alone", b.experts)
            return None
        inter = gate_up.shape[1] // 2
        if down.shape[2] != inter:
            return None
        keep_n = self._keep(inter)
        # 16 bytes in the narrowest float dtype the model may run in (bf16 / fp16: 8 neurons), whatever dtype it is
        # pruned in (a bf16 checkpoint is loaded in fp32 here)
        align = max(1, 16 // min(down.element_size(), 2))
        if inter % align == 0:  # the dense layout runs with grouped_mm; the pruned one must too
            keep_n = min(inter, max(align, align * int(keep_n / align + 0.5)))
        if keep_n == inter:
            log.warning("expert neurons of %s: %d of %d rounds back to %d (grouped_mm needs multiples of %d); "
                        "left alone", b.experts, self._keep(inter), inter, inter, align)
            return None
        gate, up = gate_up[:, :inter], gate_up[:, inter:]
        score = torch.maximum(torch.maximum(gate.abs().amax(2), up.abs().amax(2)), down.abs().amax(1))
        idx = score.topk(keep_n, dim=1).indices.sort(dim=1).values  # [E, keep]
        rows = idx.unsqueeze(-1).expand(-1, -1, gate.shape[2])
        new_gate_up = torch.cat([gate.gather(1, rows), up.gather(1, rows)], 1)
        new_down = down.gather(2, idx.unsqueeze(1).expand(-1, down.shape[1], -1))
        _replace(snap, experts, "gate_up_proj", new_gate_up)
        _replace(snap, experts, "down_proj", new_down)
        for attr in ("intermediate_dim", "intermediate_size", "moe_intermediate_size"):
            if isinstance(getattr(experts, attr, None), int):
                _set(snap, experts, attr, keep_n)
        return ExpertChange(b.name, inter, keep_n, "neurons per expert")

    def _listed(self, snap: Snapshot, experts: nn.Module, b: MoEBlock) -> ExpertChange | None:
        before = after = 0
        for expert in experts.children():
            ups: list[nn.Linear] = [m for n in _UP_NAMES if isinstance(m := expert._modules.get(n), nn.Linear)]
            downs: list[nn.Linear] = [m for n in _DOWN_NAMES if isinstance(m := expert._modules.get(n), nn.Linear)]
            if not ups or len(downs) != 1 or any(u.out_features != downs[0].in_features for u in ups):
                log.info("expert in %s is not an up/gate/down MLP; neurons left alone", b.experts)
                return None
            inter = downs[0].in_features
            keep_n = self._keep(inter)
            score = downs[0].weight.abs().amax(0)
            for u in ups:
                score = torch.maximum(score, u.weight.abs().amax(1))
            idx = score.topk(keep_n).indices.sort().values
            for u in ups:
                _replace(snap, u, "weight", u.weight.index_select(0, idx))
                if u.bias is not None:
                    _replace(snap, u, "bias", u.bias.index_select(0, idx))
                _set(snap, u, "out_features", keep_n)
            _replace(snap, downs[0], "weight", downs[0].weight.index_select(1, idx))
            _set(snap, downs[0], "in_features", keep_n)
            before, after = inter, keep_n
        return ExpertChange(b.name, before, after, "neurons per expert") if after < before else None
