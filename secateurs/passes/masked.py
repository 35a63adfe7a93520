"""The numerical check of a width rewrite: the pruned model must compute what the masked dense model computes.

Shape verification cannot see code that keeps every shape but changes its meaning: a literal channel range
(``h[:, 32:96]`` reads other features once channels before 32 are gone), a split with literal sizes, or a
size that ``torch.export`` bakes in as a constant (``q @ k.T / sqrt(q.size(-1))``). This check runs both
captures side by side on the example inputs. The dense graph runs with every removed channel zeroed wherever
it appears (parameters, buffers and every intermediate value) and with the compensated biases when bias
compensation applies: that is the plan's own meaning. Every node of the dense graph that lines up with a node
of the pruned graph is compared, after slicing away the removed channels, with the pruned graph's value, and
the pruned value then replaces it (zero-padded), so each node is checked on identical inputs and rounding
never accumulates. Nodes where a pruned hidden size enters a normalisation (its statistics change by design)
are not compared. The first node that disagrees names what the model's code does there.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any

import numpy as np
import torch
from torch import fx

from secateurs.ir.depgraph import DependencyInfo
from secateurs.ir.graph import Graph, is_dead

__all__ = ["POSITIONAL", "Disagreement", "Mismatch", "adopted_nodes", "checkpoints", "masked_mismatch", "masked_outputs", "outputs_differ"]


@dataclasses.dataclass(frozen=True)
class Mismatch:
    """Where the pruned graph stops computing what the masked dense graph computes.

    Attributes:
        node: Name of the dense graph's node.
        atoms: Atoms of its input and output values (the groups to freeze are among their leaves).
        detail: What differs, for the frozen group's reason.

    """

    node: str
    atoms: tuple[int, ...]
    detail: str


_UNDEFINED = {"empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided", "empty_permuted", "rand",
              "rand_like", "randn", "randn_like", "randint", "randint_like", "randperm", "bernoulli", "bernoulli_",
              "normal", "normal_", "uniform", "uniform_", "dropout", "native_dropout", "multinomial", "exponential_",
              "poisson", "cauchy_", "geometric_", "log_normal_", "random_"}
"""Ops whose values are arbitrary (uninitialised memory, random numbers): never compared, only adopted."""


def _undefined(node: fx.Node) -> bool:
    return isinstance(node.target, torch._ops.OpOverload) and node.target._opname in _UNDEFINED


def _tolerance(dtype: torch.dtype) -> float:
    """Relative (norm) tolerance: far above rounding of the dtype, far below a wrong channel or constant."""
    return 3e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-3


def _literals(node: fx.Node) -> list[Any]:
    """The non-node leaves of a node's arguments (sizes, bounds, scales traced as constants)."""
    out: list[Any] = []
    _collect_literals((node.args, node.kwargs), out)
    return out


def _collect_literals(value: Any, out: list[Any]) -> None:
    if isinstance(value, (tuple, list)):
        for v in value:
            _collect_literals(v, out)
    elif isinstance(value, dict):
        for v in value.values():
            _collect_literals(v, out)
    elif not isinstance(value, fx.Node):
        out.append(value)


class _Masks:
    """Kept and removed indices of every value dim under a plan, cached per atom."""

    def __init__(self, info: DependencyInfo, keep: dict[int, np.ndarray]) -> None:
        self.info, self.keep = info, keep
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor] | None] = {}
        self._dims: dict[tuple[Any, ...], list[tuple[int, torch.Tensor, torch.Tensor]]] = {}

    def split(self, atom: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(kept, removed) sorted flat indices of ``atom``, or None when it keeps everything."""
        table = self.info.table
        root = table.find(atom)  # unified atoms share their channels: one computation per class
        if root not in self._cache:
            if not any(leaf in self.keep for leaf in table.leaves(root)):  # no pruned leaf: keeps everything
                self._cache[root] = None
                return None
            mask = table.keep_mask(root, self.keep)
            self._cache[root] = None if mask.all() else (torch.from_numpy(np.flatnonzero(mask)),
                                                         torch.from_numpy(np.flatnonzero(~mask)))
        return self._cache[root]

    def dims(self, key: tuple[str, int], value: torch.Tensor,
             device: torch.device | None = None) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """``(dim, kept, removed)`` index tensors (on ``device``, default ``value``'s) for each dim that loses channels."""
        atoms = self.info.values.get(key)
        if atoms is None or len(atoms) != value.dim():
            return []
        where = device or value.device
        memo = (key, tuple(value.shape), where)
        hit = self._dims.get(memo)
        if hit is not None:
            return hit
        out = []
        for d, atom in enumerate(atoms):
            parts = self.split(atom)
            if parts is not None and value.shape[d] == len(parts[0]) + len(parts[1]):
                out.append((d, parts[0].to(where), parts[1].to(where)))
        self._dims[memo] = out
        return out


def _zeroed(value: torch.Tensor, dims: list[tuple[int, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """A copy of ``value`` with the removed channels zeroed (one copy, then only those channels are written)."""
    if not dims:
        return value
    value = value.clone()
    for d, _, removed in dims:
        value.index_fill_(d, removed, False if value.dtype == torch.bool else 0)
    return value


def _sliced(value: torch.Tensor, dims: list[tuple[int, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    for d, kept, _ in dims:
        value = value.index_select(d, kept)
    return value


def _padded(small: torch.Tensor, full_shape: torch.Size,
            dims: list[tuple[int, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """``small`` put back at its kept positions of a zero tensor of ``full_shape``."""
    value = small
    for d, kept, _ in dims:
        shape = list(value.shape)
        shape[d] = full_shape[d]
        value = value.new_zeros(shape).index_copy(d, kept, value)
    return value


def _differs(want: torch.Tensor, got: torch.Tensor) -> float | None:
    """Relative error of ``got`` against ``want`` when it exceeds the tolerance, else None."""
    if want.shape != got.shape or want.dtype != got.dtype:
        return math.inf
    if torch.equal(want, got):
        return None
    if not want.is_floating_point() and not want.is_complex():
        return math.inf
    a, b = want.detach().float(), got.detach().float()
    diff = b - a
    if not bool(torch.isfinite(diff).all()):  # equal infinities and NaNs in the same places are agreement
        same = (a == b) | (torch.isnan(a) & torch.isnan(b))
        diff = torch.where(same, torch.zeros_like(a), diff)
        if not bool(torch.isfinite(diff).all()):
            return math.inf
        a, b = torch.where(same, torch.zeros_like(a), a), torch.where(same, torch.zeros_like(b), b)
    scale = max(float(a.norm()), float(b.norm()))
    err = float(diff.norm())
    if err <= _tolerance(want.dtype) * scale + 1e-6 * math.sqrt(max(a.numel(), 1)):
        return None
    return err / scale if scale > 0 else math.inf


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _write_back(value: torch.Tensor, replacement: torch.Tensor, protected: set[int]) -> torch.Tensor:
    """``replacement`` written into ``value`` when that is allowed (it may be a view), else returned.

    Never into what shares memory with ``protected`` storages (parameters, buffers, inputs).
    """
    if value.dtype != replacement.dtype or value.device.type == "meta" or _storage(value) in protected:
        return replacement
    try:
        value.copy_(replacement)
    except RuntimeError:  # an expanded or otherwise overlapping view cannot be written: keep the copy
        return replacement
    return value


def _flat_inputs(graph: Graph) -> list[Any]:
    return graph.flat_inputs()


class _Stop(Exception):
    """Ends the lockstep run at the first disagreement."""


def _mutates(graph: fx.Graph) -> bool:
    """Whether any node writes into a tensor (``fill_``, ``copy_``, ``index_put_``: code like ``h[:, :2] = 0``)."""
    return any(isinstance(n.target, torch._ops.OpOverload) and n.target._schema.is_mutable
               for n in graph.nodes if n.op == "call_function")


class _Recorder(fx.Interpreter):
    """Runs a graph and keeps the value of every node in ``wanted``.

    Copies are taken only when the graph writes into tensors (a later in-place op must not change a kept value).
    """

    def __init__(self, graph: Graph, wanted: set[str]) -> None:
        super().__init__(graph.interpreter_root(), graph=graph.fx_graph)
        self.values: dict[str, Any] = {}
        self.wanted, self.copy = wanted, _mutates(graph.fx_graph)

    def run_node(self, n: fx.Node) -> Any:
        """Run one node and keep (a copy of) its tensors when a dense node lines up with it."""
        out = super().run_node(n)
        if n.name not in self.wanted:
            return out
        if n.op == "placeholder" or not self.copy:
            self.values[n.name] = out
        elif n.op == "call_function":
            self.values[n.name] = torch.utils._pytree.tree_map(
                lambda v: v.clone() if isinstance(v, torch.Tensor) else v, out)
        return out


class _Lockstep(fx.Interpreter):
    """Runs the dense graph masked, comparing with (and adopting) the pruned graph's aligned values.

    Masking and adopting write into the dense value itself, so that a view of it (``h[:, :2]``, then ``fill_``)
    stays a view: what the model's code writes through it reaches the tensor it came from. Values that share
    memory with the graph's inputs or constants (parameters, buffers) are never written: they get a copy.
    """

    def __init__(self, graph: Graph, info: DependencyInfo, masks: _Masks, pruned: dict[str, Any],
                 partner: dict[str, fx.Node], skip: set[str]) -> None:
        super().__init__(graph.interpreter_root(), graph=graph.fx_graph)
        self.info, self.masks, self.pruned, self.partner, self.skip = info, masks, pruned, partner, skip
        self.mismatch: Mismatch | None = None
        self.protected: set[int] = set()

    def _one(self, node: fx.Node, key: tuple[str, int], value: Any, new: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        dims = self.masks.dims(key, value)
        if node.op == "placeholder" or not isinstance(new, torch.Tensor):
            # parameters stay the dense ones, masked: a wrong slice shows where they are used
            return self._put(value, _zeroed(value, dims)) if dims else value
        want = _sliced(_zeroed(value, dims), dims)
        if node.name not in self.skip and not _undefined(node) and not is_dead(node):
            err = _differs(want, new)
            if err is not None:
                self.mismatch = self._explain(node, err)
                raise _Stop
        if new.shape != want.shape or new.dtype != want.dtype:
            return self._put(value, _zeroed(value, dims)) if dims else value
        return self._put(value, _padded(new, value.shape, dims))

    def _put(self, value: torch.Tensor, replacement: torch.Tensor) -> torch.Tensor:
        return _write_back(value, replacement, self.protected)

    def _explain(self, node: fx.Node, err: float) -> Mismatch:
        names = {v.name for v in [*node.all_input_nodes, node]}
        atoms = [a for key, dims in self.info.values.items() if key[0] in names for a in dims]
        partner = self.partner[node.name]
        old_lit, new_lit = _literals(node), _literals(partner)
        how = f"relative error {err:.3g}" if math.isfinite(err) else "different values"
        if old_lit != new_lit:
            changed = [(a, b) for a, b in zip(old_lit, new_lit, strict=False) if a != b]
            shown = ", ".join(f"{a!r} became {b!r}" for a, b in changed[:2]) or "its constant arguments changed"
            detail = (f"the model's code uses a size traced as a constant at node '{node.name}' ({node.target}: "
                      f"{shown}); pruning would change what it computes ({how})")
        else:
            detail = (f"the model's code reads a fixed channel range or count at node '{node.name}' "
                      f"({node.target}); pruning would make it compute something else ({how})")
        return Mismatch(node.name, tuple(atoms), detail)

    def run_node(self, n: fx.Node) -> Any:
        """Run one dense node, mask it, and compare / adopt the pruned value when the node lines up."""
        out = super().run_node(n)
        if n.op in ("placeholder", "get_attr"):
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.device.type != "meta":
                    self.protected.add(_storage(t))
        if n.op not in ("placeholder", "call_function"):
            return out
        partner = self.partner.get(n.name)
        new = self.pruned.pop(partner.name, None) if partner is not None else None
        if isinstance(out, (list, tuple)):
            news = new if isinstance(new, (list, tuple)) and len(new) == len(out) else [None] * len(out)
            return type(out)(self._one(n, (n.name, k), v, w) for k, (v, w) in enumerate(zip(out, news, strict=True)))
        return self._one(n, (n.name, -1), out, new)


def masked_mismatch(
    old: Graph,
    new: Graph,
    info: DependencyInfo,
    keep: dict[int, np.ndarray],
    partner: dict[str, fx.Node],
    overrides: dict[str, torch.Tensor] | None = None,
) -> Mismatch | None:
    """Compare the pruned capture ``new`` with the dense capture ``old`` masked by ``keep``.

    Args:
        old: The dense capture the plan was made on (its program still holds the dense tensors).
        new: The capture of the rewritten module.
        info: The dependency analysis of ``old``.
        keep: Group id -> keep mask of the plan.
        partner: Dense node name -> the pruned node it lines up with.
        overrides: Parameter / buffer name -> full-size tensor that replaces the dense one (compensated biases, a
            scale that follows a pruned size).

    Returns:
        None when every aligned node agrees, else the first disagreement.

    """
    if new.values is not None:  # recorded with its values: the forward that captured it computed them
        pruned, new.values = new.values, None
    else:
        recorder = _Recorder(new, {p.name for p in partner.values()})
        with torch.no_grad():
            recorder.run(*_flat_inputs(new))
        pruned = recorder.values
        del recorder
    inputs = _inputs_with(old, overrides)
    masks = _Masks(info, keep)
    skip = {node for node, atoms in info.mixing.items()
            if any(leaf in keep for a in atoms for leaf in info.table.leaves(a))}
    runner = _Lockstep(old, info, masks, pruned, partner, skip)
    try:
        with torch.no_grad():
            runner.run(*inputs)
    except _Stop:
        pass
    return runner.mismatch


def adopted_nodes(old: Graph, info: DependencyInfo, keep: dict[int, np.ndarray]) -> set[str]:
    """Dense nodes whose pruned value the masked run takes instead of computing it.

    Where a pruned hidden size enters a normalisation (its statistics change by design) and ops whose values are
    arbitrary (uninitialised memory, random numbers).
    """
    out = {node for node, atoms in info.mixing.items()
           if any(leaf in keep for a in atoms for leaf in info.table.leaves(a))}
    out.update(n.name for n in old.fx_graph.nodes if n.op == "call_function" and _undefined(n))
    return out


class Disagreement(Exception):
    """The masked dense run disagrees with a pruned value at a node it compares (the message says where)."""


POSITIONAL = {torch.ops.aten.slice.Tensor, torch.ops.aten.narrow.default, torch.ops.aten.select.int,
              torch.ops.aten.split.Tensor, torch.ops.aten.split_with_sizes.default, torch.ops.aten.chunk.default,
              torch.ops.aten.unbind.int, torch.ops.aten.index.Tensor, torch.ops.aten.index_select.default,
              torch.ops.aten.gather.default, torch.ops.aten.take.default, torch.ops.aten.roll.default,
              torch.ops.aten.unfold.default, torch.ops.aten.as_strided.default, torch.ops.aten.diagonal.default}
"""Ops that read fixed positions of a dim: where a literal range meets pruned channels."""


def checkpoints(old: Graph, partner: dict[str, fx.Node] | None = None) -> set[str]:
    """Dense nodes the cheap check compares one by one, besides the outputs.

    Ops that read fixed positions (and the parts of their outputs), and, with ``partner`` (dense node name ->
    the pruned graph's node), every call whose constant arguments changed (a size-dependent literal: a reshape to
    fewer heads, or a scale ``1 / sqrt(width)``).
    """
    out: set[str] = set()
    for n in old.fx_graph.nodes:
        if n.op != "call_function":
            continue
        if n.target in POSITIONAL or (n.target is operator.getitem and isinstance(n.args[0], fx.Node)
                                      and n.args[0].target in POSITIONAL):
            out.add(n.name)
        elif partner is not None and n.name in partner and _literals(n) != _literals(partner[n.name]):
            out.add(n.name)
    return out


def masked_outputs(
    old: Graph,
    info: DependencyInfo,
    keep: dict[int, np.ndarray],
    pruned: dict[str, Any],
    overrides: dict[str, torch.Tensor] | None = None,
    compare: set[str] | frozenset[str] = frozenset(),
) -> list[Any]:
    """The dense graph's outputs under the plan's meaning: every removed channel zeroed everywhere, then sliced away.

    The cheap check's reference (one run of the dense graph): the nodes of :func:`adopted_nodes` take their pruned
    value from ``pruned`` (dense node name -> value), zero-padded, once their inputs are found equal to the pruned
    ones (so that what comes before an adopted norm is checked too); the nodes in ``compare`` are compared with
    their pruned values as they are computed. A disagreement raises :class:`Disagreement`. In a
    graph that writes into tensors (``relu_``, ``h[:, :2] = 0`` as ``slice`` + ``fill_``) adopted values are written
    into the dense value itself, so that a view stays the view a later write goes through; masks are written in
    place in every graph (only the removed channels, and a view of a masked value is masked the same way). Never
    into what shares memory with a parameter, buffer or input: that gets a copy.
    """
    masks = _Masks(info, keep)
    adopt = adopted_nodes(old, info, keep)
    inputs = _inputs_with(old, overrides)
    inplace = _mutates(old.fx_graph)
    protected = {_storage(t) for t in inputs if isinstance(t, torch.Tensor) and t.device.type != "meta"}
    feed = iter(inputs)
    env: dict[fx.Node, Any] = {}
    result: list[Any] = []

    def writable(value: torch.Tensor) -> bool:
        return value.device.type != "meta" and _storage(value) not in protected

    def masked(key: tuple[str, int], value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        dims = masks.dims(key, value)
        if not dims:
            return value
        # in place: only the removed channels are written, and a view stays a view; not through a broadcast
        # (``expand`` of a KV head to its query heads: one element stands for several)
        if writable(value) and all(st != 0 or sz < 2 for st, sz in zip(value.stride(), value.shape, strict=True)):
            try:
                for d, _, removed in dims:
                    value.index_fill_(d, removed, False if value.dtype == torch.bool else 0)
                return value
            except RuntimeError:  # an expanded or otherwise overlapping view cannot be written
                pass
        return _zeroed(value, dims)

    def put(value: torch.Tensor, replacement: torch.Tensor) -> torch.Tensor:
        return _write_back(value, replacement, protected)

    def run(n: fx.Node) -> Any:
        fn: Any = n.target
        return fn(*fx.node.map_arg(n.args, env.__getitem__), **fx.node.map_arg(n.kwargs, env.__getitem__))

    def check(n: fx.Node, why: str) -> None:
        value, small = env.get(n), pruned.get(n.name)
        if not isinstance(value, torch.Tensor) or not isinstance(small, torch.Tensor):
            return
        err = _differs(_sliced(value, masks.dims((n.name, -1), value)), small)
        if err is not None:
            how = f"relative error {err:.3g}" if math.isfinite(err) else "different shapes or values"
            raise Disagreement(f"node '{n.name}' ({n.target}, {why}) differs from the masked dense model's ({how})")

    with torch.no_grad():
        for n in old.fx_graph.nodes:
            if n.op == "placeholder":
                value = next(feed)  # parameters, buffers and inputs: a masked copy, never written
                if isinstance(value, torch.Tensor):
                    dims = masks.dims((n.name, -1), value)
                    if dims and not _mask_is_redundant(n, info, {d for d, _, _ in dims}):
                        value = _zeroed(value, dims)
                env[n] = value
            elif n.op == "call_function":
                if is_dead(n):
                    continue
                small = pruned.get(n.name)
                if n.name in adopt and isinstance(small, torch.Tensor):
                    for i in n.all_input_nodes:
                        check(i, f"read by the adopted '{n.name}'")
                    full = n.meta["val"]
                    padded = _padded(small, full.shape, masks.dims((n.name, -1), full, small.device))
                    padded = padded.clone() if padded is small else padded  # the pruned value is never written
                    if inplace:  # computed all the same, so that a view stays a view
                        out = run(n)
                        env[n] = put(out, padded) if isinstance(out, torch.Tensor) else padded
                    else:
                        env[n] = padded
                    continue
                out = run(n)
                if isinstance(out, (list, tuple)):
                    out = type(out)(masked((n.name, k), v) for k, v in enumerate(out))
                else:
                    out = masked((n.name, -1), out)
                env[n] = out
                if n.name in compare:
                    check(n, "compared one by one")
            elif n.op == "output":
                for r in torch.utils._pytree.tree_leaves(n.args):
                    v = env[r] if isinstance(r, fx.Node) else r
                    result.append(_sliced(v, masks.dims((r.name, -1), v))
                                  if isinstance(r, fx.Node) and isinstance(v, torch.Tensor) else v)
            else:
                raise ValueError(f"cannot run node '{n.name}' ({n.op}) of a recorded graph")
    return result


_CHANNEL_DIM = {torch.ops.aten.linear.default: -1, torch.ops.aten.conv1d.default: 1, torch.ops.aten.conv2d.default: 1,
                torch.ops.aten.conv3d.default: 1, torch.ops.aten.convolution.default: 1}
"""Ops ``op(input, weight, bias, ...)`` whose weight is ``[out, in, ...]``, and the channel dim of input / output."""


def _mask_is_redundant(node: fx.Node, info: DependencyInfo, pruned: set[int]) -> bool:
    """Whether zeroing the removed channels (of dims ``pruned``) of placeholder ``node`` cannot change the masked run.

    So for a weight / bias used only by linear layers and convolutions whose output channels are its rows (masked
    after the op) and whose input channels are its columns (zero in the masked input): proved from the analysis'
    classes, per dim; anything else is masked.
    """
    find = info.table.find
    mine = info.values.get((node.name, -1))
    if not mine or not node.users:
        return False
    for user in node.users:
        dim = _CHANNEL_DIM.get(user.target)  # type: ignore[call-overload]
        x = user.args[0] if user.args else None
        if dim is None or not isinstance(x, fx.Node) or x is node or node not in user.args[1:3]:
            return False
        if user.target is torch.ops.aten.convolution.default and (len(user.args) < 7 or user.args[6] is not False):
            return False  # transposed: the weight is [in, out / groups, ...]
        out, inp = info.values.get((user.name, -1)), info.values.get((x.name, -1))
        if not out or not inp:
            return False
        if user.args[1] is node:
            if len(mine) < 2 or not pruned <= {0, 1} or find(mine[0]) != find(out[dim]) or (
                    1 in pruned and find(mine[1]) != find(inp[dim])):
                return False
        elif len(mine) != 1 or find(mine[0]) != find(out[dim]):
            return False
    return True


def _inputs_with(old: Graph, overrides: dict[str, torch.Tensor] | None) -> list[Any]:
    """The dense graph's placeholder values, with ``overrides`` (name -> tensor) for parameters and buffers."""
    inputs = _flat_inputs(old)
    if overrides:
        names = [n.name for n in old.fx_graph.nodes if n.op == "placeholder"]
        for i, name in enumerate(names[: len(inputs)]):
            fqn = old.params.get(name) or old.buffers.get(name)
            if fqn in overrides:
                inputs[i] = overrides[fqn]
    return inputs


def outputs_differ(want: list[Any], got: list[Any]) -> str | None:
    """Why the pruned outputs ``got`` are not the masked dense outputs ``want`` (None when they agree)."""
    if len(want) != len(got):
        return f"the pruned model returns {len(got)} values, the masked dense model {len(want)}"
    for i, (a, b) in enumerate(zip(want, got, strict=True)):
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            err = _differs(a, b)
            if err is not None:
                return f"output #{i} differs from the masked dense model's (relative error {err:.3g})"
        elif a != b:
            return f"output #{i} is {b!r}, the masked dense model's {a!r}"
    return None
