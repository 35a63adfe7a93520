"""Depth pruning: remove whole residual blocks, or single attention / MLP sublayers (FinerCut).

Blocks are the children of a module list (``model.layers``, ``encoder.layer``, a ResNet stage's layers) whose
output has the shape of their input on the example inputs, so the residual path carries on without them.
A removed block is deleted from its list; Hugging Face bookkeeping follows (``config.num_hidden_layers``,
``config.layer_types``, every attention's ``layer_idx`` for KV-cache indexing). A removed sublayer is replaced
by :class:`ZeroSublayer`, which contributes nothing to the residual stream.

Scores come from calibration batches:
    ``bi``: block influence (ShortGPT), ``1 - cos(input, output)`` of a candidate, averaged over tokens.
    ``angular``: the angular distance ``arccos(cos(h_l, h_{l+n})) / pi`` between the input of block ``l`` and
        the output of block ``l+n-1``; the ``n`` consecutive blocks with the smallest distance go.
    ``greedy``: FinerCut; bypass each remaining candidate in turn, keep the removal that changes the model's
        output least (``1 - cos`` of the final output), repeat.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from secateurs.distributed import all_reduce_sum, shard
from secateurs.errors import BudgetError, VerificationError
from secateurs.frontends.torch_export import capture_call
from secateurs.ir.graph import Graph
from secateurs.modeling.layers import ZeroSublayer, hidden_input
from secateurs.modeling.rewrite import Snapshot
from secateurs.passes.base import Pass, PassResult, transaction
from secateurs.passes.criteria import step_criteria
from secateurs.passes.hooks import calibration_calls, first_tensor
from secateurs.progress import track

__all__ = [
    "DEPTH_CRITERIA",
    "DepthRecord",
    "RemoveBlocks",
    "RemoveSublayers",
    "ZeroSublayer",
    "angular_distance",
    "block_influence",
    "find_blocks",
    "find_sublayers",
    "mean_cosine",
]

log = logging.getLogger(__name__)

DEPTH_CRITERIA = step_criteria("depth")  # registered in secateurs.passes.criteria
_ATTENTION_NAMES = ("self_attn", "attention", "attn")
_MLP_NAMES = ("mlp", "feed_forward", "ffn")


def _features(t: torch.Tensor) -> torch.Tensor:
    """Rows of feature vectors: channels of a ``[B, C, H, W]`` map, the last dim otherwise."""
    t = t.detach().float()
    if t.dim() == 4:
        t = t.movedim(1, -1)
    return t.reshape(-1, t.shape[-1])


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine similarity of the feature vectors (tokens, or pixels of a feature map) of ``a`` and ``b``."""
    return float(torch.nn.functional.cosine_similarity(_features(a), _features(b), dim=-1).mean())


@dataclasses.dataclass(frozen=True)
class DepthRecord:
    """What a depth pass removed, with the score behind each choice (lower = more redundant)."""

    criterion: str
    removed: tuple[tuple[str, float], ...]
    scores: tuple[tuple[str, float], ...]

    def table(self) -> str:
        """The candidates as a text table, removed ones marked."""
        gone = {n for n, _ in self.removed}
        lines = [f"{'candidate':<48} {self.criterion:>9}  removed"]
        lines += [f"{n:<48} {s:9.4f}  {'yes' if n in gone else ''}" for n, s in self.scores]
        return "\n".join(lines)


def _run(model: nn.Module, calls: list[tuple[tuple[Any, ...], dict[str, Any]]]) -> list[torch.Tensor]:
    outs = []
    with torch.no_grad():
        for args, kwargs in track(calls, "depth scoring"):
            out = model(*args, **kwargs)
            t = out if isinstance(out, torch.Tensor) else next(
                v for v in torch.utils._pytree.tree_leaves(out) if isinstance(v, torch.Tensor) and v.is_floating_point()
            )
            outs.append(t.detach().float())
    return outs


def _residual_blocks(graph: Graph) -> set[str]:
    """Modules that add their own input to something they computed (a residual connection)."""
    stacks: dict[str, set[str]] = {}
    for node in graph.nodes():
        stack = node.meta.get("nn_module_stack") or {}
        stacks[node.name] = {str(v[0]) for v in stack.values()}
    out: set[str] = set()
    for node in graph.nodes():
        if node.op != "call_function" or node.target not in (torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor):
            continue
        inside = stacks[node.name]
        for arg in node.args[:2]:
            if not isinstance(arg, torch.fx.Node):
                continue
            # Follow value-preserving ops (a no-op ``.to()`` is recorded where the input was re-used) back to
            # where the operand was computed; if that is outside a module holding the add, it is its input.
            origin = arg
            while origin.op == "call_function" and origin.target in _SAME_VALUE and isinstance(
                    origin.args[0], torch.fx.Node):
                origin = origin.args[0]
            out.update(m for m in inside if m and m not in stacks.get(origin.name, set()))
    return out


_SAME_VALUE = {
    torch.ops.aten.to.dtype, torch.ops.aten._to_copy.default, torch.ops.aten.to.dtype_layout,
    torch.ops.aten.alias.default, torch.ops.aten.clone.default, torch.ops.aten.contiguous.default,
    torch.ops.aten.dropout.default, torch.ops.aten.detach.default,
}


def find_blocks(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], graph: Graph | None = None) -> list[str]:
    """Names of removable blocks: residual list children (2+ of one class) whose output has their input's shape.

    With ``graph`` given, a block must contain a residual add of its own input (a conv-bn-act layer of the same
    shape is not removable); without it, matching shapes are enough.
    """
    lists = []
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.ModuleList, nn.Sequential)) and len(mod) >= 2:
            kinds = {type(c) for c in mod}
            if len(kinds) == 1:
                lists.append((name, mod))
    same: dict[str, bool] = {}
    hooks = []
    for lname, lst in lists:
        for i, child in enumerate(lst):
            full = f"{lname}.{i}" if lname else str(i)

            def hook(_m: nn.Module, inp: tuple[Any, ...], out: Any, full: str = full) -> None:
                x = next((a for a in inp if isinstance(a, torch.Tensor)), None)
                y = first_tensor(out)
                same[full] = same.get(full, True) and x is not None and y is not None and x.shape == y.shape

            hooks.append(child.register_forward_hook(hook, with_kwargs=False))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    residual = _residual_blocks(graph) if graph is not None else None
    found = [n for n, ok in same.items() if ok and (residual is None or n in residual)]
    # Nested candidates (a ResNet stage and its blocks): keep the finest, so removals never overlap.
    return [n for n in found if not any(o.startswith(n + ".") for o in found)]


def find_sublayers(model: nn.Module, blocks: list[str]) -> list[str]:
    """Attention and MLP children of the given blocks (FinerCut candidates)."""
    out = []
    for b in blocks:
        block = model.get_submodule(b)
        for names in (_ATTENTION_NAMES, _MLP_NAMES):
            child = next((n for n in names if isinstance(block._modules.get(n), nn.Module)), None)
            if child is not None and not isinstance(block._modules[child], ZeroSublayer):
                out.append(f"{b}.{child}")
    return out


@contextmanager
def _bypassed(model: nn.Module, names: Iterable[str], *, zero: bool) -> Iterator[None]:
    """Temporarily make blocks identities (``zero=False``) or sublayers contribute zeros (``zero=True``)."""
    hooks = []
    for name in names:
        def hook(_m: nn.Module, inp: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
            x = hidden_input(inp, kwargs)
            rep = torch.zeros_like(x) if zero else x
            if isinstance(out, torch.Tensor):
                return rep
            return (rep, *out[1:])

        hooks.append(model.get_submodule(name).register_forward_hook(hook, with_kwargs=True))
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


class _DepthPass(Pass):
    transforms = True
    transactional = True
    zero = False

    def __init__(self, amount: float, criterion: str = "bi", *, calib: Iterable[Any] | None = None) -> None:
        if criterion not in DEPTH_CRITERIA:
            raise BudgetError(f"unknown depth criterion {criterion!r}; choose from {DEPTH_CRITERIA}")
        if not isinstance(amount, (int, float)) or not math.isfinite(amount) or amount < 0:
            raise BudgetError(f"depth amount must be a count >= 1 or a fraction in [0, 1), got {amount!r}")
        self.amount = amount
        self.criterion = criterion
        self.calib = calib

    def _count(self, n: int) -> int:
        count = int(round(n * self.amount)) if self.amount < 1 else int(self.amount)
        if count >= n:
            raise BudgetError(f"cannot remove {count} of {n} candidates; at least one must stay")
        return count

    def _candidates(self, graph: Graph) -> list[str]:
        raise NotImplementedError

    def _streams(self, model: nn.Module, cands: list[str], calls: list[Any]) -> dict[str, list[tuple[
            torch.Tensor, torch.Tensor]]]:
        """Per candidate and call: the residual stream before it and after it.

        A block's output is the stream after it; a sublayer's output is added to the residual, so the stream
        after it is input + output.
        """
        pairs: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {c: [] for c in cands}
        hooks = []
        for c in cands:
            def hook(_m: nn.Module, inp: tuple[Any, ...], kwargs: dict[str, Any], out: Any, c: str = c) -> None:
                x = hidden_input(inp, kwargs).detach()
                y = first_tensor(out)
                if y is not None:
                    pairs[c].append((x, (x + y if self.zero else y).detach()))

            hooks.append(model.get_submodule(c).register_forward_hook(hook, with_kwargs=True))
        try:
            _run(model, calls)
        finally:
            for h in hooks:
                h.remove()
        return pairs

    def _scores(self, model: nn.Module, cands: list[str], calls: list[Any]) -> dict[str, float]:
        """Block influence: 1 - cos of the stream before and after a candidate, averaged over calls.

        Under ``torchrun`` every rank runs its share of the calls and the sums are added up over the ranks.
        """
        return _influence(self._streams(model, cands, shard(calls)))

    def _choose(self, model: nn.Module, cands: list[str], count: int, calls: list[Any]) -> tuple[
            list[tuple[str, float]], dict[str, float]]:
        if self.criterion == "bi":
            scores = self._scores(model, cands, calls)
            chosen = sorted(cands, key=lambda c: scores[c])[:count]
            return [(c, scores[c]) for c in chosen], scores
        if self.criterion == "angular":
            return self._angular(model, cands, count, calls)
        reference = _run(model, calls)
        removed: list[tuple[str, float]] = []
        first: dict[str, float] = {}
        for _ in range(count):
            trial = {}
            for c in cands:
                if any(c == r for r, _ in removed):
                    continue
                with _bypassed(model, [r for r, _ in removed] + [c], zero=self.zero):
                    outs = _run(model, calls)
                trial[c] = 1 - sum(mean_cosine(a, b) for a, b in zip(outs, reference, strict=True)) / len(outs)
            if not first:
                first = dict(trial)
            best = min(trial, key=lambda c: trial[c])
            removed.append((best, trial[best]))
        return removed, first

    def _angular(self, model: nn.Module, cands: list[str], count: int, calls: list[Any]) -> tuple[
            list[tuple[str, float]], dict[str, float]]:
        pairs = self._streams(model, cands, shard(calls))
        windows: dict[str, float] = {}
        for start in range(len(cands) - count + 1):
            a, b = cands[start], cands[start + count - 1]
            if not self.zero and a.rpartition(".")[0] != b.rpartition(".")[0]:
                continue  # a window of blocks must stay inside one block list
            windows[a] = float(sum(mean_cosine(x, y) for (x, _), (_, y) in zip(pairs[a], pairs[b], strict=True)))
        total = all_reduce_sum({**windows, "": float(len(pairs[cands[0]]))})
        best: tuple[float, int] | None = None
        scores = {}
        for start, a in enumerate(cands):
            if a not in windows:
                continue
            dist = angular_distance(total[a] / max(total[""], 1.0))
            scores[a] = dist
            if best is None or dist < best[0]:
                best = (dist, start)
        if best is None:
            raise BudgetError("no window of consecutive candidates fits")
        window = cands[best[1]:best[1] + count]
        return [(c, best[0]) for c in window], scores

    def run(self, graph: Graph) -> PassResult:
        """Score the candidates, remove the chosen ones, re-capture."""
        model = graph.module
        cands = self._candidates(graph)
        what = "layers= (--layers)" if isinstance(self, RemoveBlocks) else "sublayers= (--sublayers)"
        if not cands and self.amount > 0:
            raise BudgetError(f"{what} selects nothing: the model has no repeated residual blocks "
                              f"({'sublayers' if what.startswith('sub') else 'blocks'} are found in a list of "
                              "identical modules that each add to the residual stream)")
        count = self._count(len(cands)) if cands else 0
        if count == 0:
            if self.amount > 0:
                raise BudgetError(f"{what} {self.amount:g} of {len(cands)} candidates rounds to none; give a count "
                                  "(1, 2, ...) or a larger fraction")
            return PassResult(graph, False, DepthRecord(self.criterion, (), ()))
        calls = calibration_calls(graph, self.calib)
        was_training = model.training
        model.eval()
        try:
            removed, scores = self._choose(model, cands, count, calls)
        finally:
            model.train(was_training)
        snap = transaction()
        self._apply(model, [n for n, _ in removed], snap, calls)
        try:
            new = capture_call(model, graph.args, graph.kwargs)
        except Exception as exc:
            snap.restore()
            raise VerificationError(f"the model no longer runs after depth pruning; it was restored: {exc}") from exc
        record = DepthRecord(self.criterion, tuple(removed), tuple(sorted(scores.items(), key=lambda t: t[0])))
        return PassResult(new, True, record)

    def _apply(self, model: nn.Module, names: list[str], snap: Snapshot, calls: list[Any]) -> None:
        raise NotImplementedError


def angular_distance(cos: float) -> float:
    """``arccos(cos) / pi``, in [0, 1] (the angular distance of ShortGPT's layer-window criterion)."""
    return math.acos(max(-1.0, min(1.0, cos))) / math.pi


def _influence(pairs: dict[str, list[tuple[torch.Tensor, torch.Tensor]]]) -> dict[str, float]:
    """Mean ``1 - cos`` per candidate; the sums and counts are added up over ``torchrun`` ranks."""
    sums = {c: float(sum(1 - mean_cosine(x, y) for x, y in v)) for c, v in pairs.items()}
    counts = {c: float(len(v)) for c, v in pairs.items()}
    total = all_reduce_sum({**{("sum", c): v for c, v in sums.items()}, **{("n", c): v for c, v in counts.items()}})
    return {c: total[("sum", c)] / total[("n", c)] if total[("n", c)] else 0.0 for c in pairs}


def block_influence(model: nn.Module, blocks: list[str], calls: list[Any]) -> dict[str, float]:
    """Block influence (ShortGPT) of each named block on the calibration calls: ``1 - cos(input, output)``.

    Under ``torchrun`` each rank runs its share of the calls and the sums are added up over the ranks.
    """
    was_training = model.training
    model.eval()
    try:
        return _influence(RemoveBlocks(1)._streams(model, blocks, shard(calls)))
    finally:
        model.train(was_training)


class RemoveBlocks(_DepthPass):
    """Transform pass: remove ``amount`` whole blocks (a count >= 1, or a fraction of all blocks)."""

    def _candidates(self, graph: Graph) -> list[str]:
        return find_blocks(graph.module, graph.args, graph.kwargs, graph)

    def _apply(self, model: nn.Module, names: list[str], snap: Snapshot, calls: list[Any]) -> None:
        by_list: dict[str, list[int]] = {}
        for n in names:
            parent, _, idx = n.rpartition(".")
            by_list.setdefault(parent, []).append(int(idx))
        config: Any = getattr(model, "config", None)
        for parent, drop in by_list.items():
            lst = model.get_submodule(parent) if parent else model
            kept = [i for i in range(len(lst._modules)) if i not in drop]
            snap.record(lst, "attr", "_modules", lst._modules)
            lst._modules = {str(j): lst._modules[str(i)] for j, i in enumerate(kept)}
            for j, block in enumerate(lst.children()):
                for mod in block.modules():
                    if isinstance(getattr(mod, "layer_idx", None), int):
                        snap.record(mod, "attr", "layer_idx", mod.layer_idx)
                        setattr(mod, "layer_idx", j)  # noqa: B010 - nn.Module attribute typing
            stage = re.search(r"\.(\d+)\.(?:layers|blocks)$", parent)
            depths = getattr(config, "depths", None) if config is not None else None
            if stage and isinstance(depths, list) and int(stage.group(1)) < len(depths) and \
                    depths[int(stage.group(1))] == len(kept) + len(drop):
                # ResNet / ConvNeXt / Swin count blocks per stage in config.depths
                snap.record(config, "attr", "depths", list(depths))
                new_depths = list(depths)
                new_depths[int(stage.group(1))] = len(kept)
                config.depths = new_depths
            if config is not None and getattr(config, "num_hidden_layers", None) == len(kept) + len(drop):
                snap.record(config, "attr", "num_hidden_layers", config.num_hidden_layers)
                config.num_hidden_layers = len(kept)
                types = getattr(config, "layer_types", None)
                if isinstance(types, list) and len(types) == len(kept) + len(drop):
                    snap.record(config, "attr", "layer_types", types)
                    config.layer_types = [types[i] for i in kept]


class RemoveSublayers(_DepthPass):
    """Transform pass: replace ``amount`` attention / MLP sublayers by :class:`ZeroSublayer` (FinerCut)."""

    zero = True

    def _candidates(self, graph: Graph) -> list[str]:
        return find_sublayers(graph.module, find_blocks(graph.module, graph.args, graph.kwargs, graph))

    def _apply(self, model: nn.Module, names: list[str], snap: Snapshot, calls: list[Any]) -> None:
        extras: dict[str, int] = {}
        hooks = []
        for n in names:
            def hook(_m: nn.Module, _inp: Any, out: Any, n: str = n) -> None:
                extras[n] = 0 if isinstance(out, torch.Tensor) else len(out) - 1

            hooks.append(model.get_submodule(n).register_forward_hook(hook))
        try:
            _run(model, calls[:1])
        finally:
            for h in hooks:
                h.remove()
        for n in names:
            parent, _, leaf = n.rpartition(".")
            owner = model.get_submodule(parent)
            snap.record(owner, "attr", "_modules", dict(owner._modules))
            owner._modules[leaf] = ZeroSublayer(extras[n])
