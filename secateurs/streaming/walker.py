"""The walk over a checkpoint's blocks: load one, score / prune it as the in-memory passes do, write it."""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from secateurs.backends.checkpoint import MANIFEST
from secateurs.backends.expert_layout import PerExpertSource, stores_experts_one_by_one
from secateurs.backends.sharded import ShardedSource, check_shapes
from secateurs.distributed import all_reduce_sum
from secateurs.errors import BudgetError, CheckpointError
from secateurs.frontends.torch_export import capture
from secateurs.ir.depgraph import FLAGS, DependencyInfo
from secateurs.ir.graph import Graph
from secateurs.modeling.rewrite import Snapshot
from secateurs.passes.allocate import AllocateBudget, LayerBudget
from secateurs.passes.base import Pass, PassManager, PassResult
from secateurs.passes.channel_plan import rounded_away, uniform_ratios
from secateurs.passes.channels import ChannelOptions, PruneChannels, PruneRecord, eligible
from secateurs.passes.dependencies import AnalyzeDependencies
from secateurs.passes.depth import RemoveBlocks, angular_distance, mean_cosine
from secateurs.passes.experts import (
    ExpertChange,
    PruneExpertNeurons,
    PruneExperts,
    ScoreExperts,
    find_moe_blocks,
)
from secateurs.passes.hooks import first_tensor
from secateurs.passes.importance import ChannelScores, ScoreChannels
from secateurs.progress import track
from secateurs.streaming import hidden_size
from secateurs.streaming.blocks import (
    _as_inputs,
    _block_list,
    _bytes,
    _first_inputs,
    _forward,
    _meta_model,
    _release_memory,
)
from secateurs.streaming.hidden_size import _HiddenPlan
from secateurs.streaming.options import _CALIBRATED_IMPORTANCE, _CALIBRATED_SPARSITY, Call, StreamOptions
from secateurs.streaming.writer import write_blocks

log = logging.getLogger("secateurs.stream")


@dataclasses.dataclass(frozen=True)
class _Slot:
    """A width group of one block, as the budget allocators see it (``id`` is unique over all blocks)."""

    id: int
    size: int
    kind: str
    name: str
    position: int
    params_per_channel: int


class _GivenBudget(Pass):
    """Analysis pass: the per-group ratios decided from every block's statistics, for this block's groups."""

    requires = (DependencyInfo,)
    provides = (LayerBudget,)

    def __init__(self, ratios: dict[str, float], allocator: str, unit: str) -> None:
        self.ratios, self.allocator, self.unit = ratios, allocator, unit

    def run(self, graph: Graph) -> PassResult:
        info = graph.analysis(DependencyInfo)
        ratios = {g.id: self.ratios.get(g.name, 0.0) for g in info.iter_groups()}
        budget = LayerBudget(self.allocator, 0.0, self.unit, ratios, {g: 1.0 for g in ratios})
        graph.analyses[LayerBudget] = budget
        return PassResult(graph, False, budget)


class _Walker:
    """The meta model, its checkpoint and the calibration streams; walks the blocks one at a time."""

    expert_layout: dict[str, str] | None  # how the experts were written, and why (set by write)

    def __init__(self, folder: Path, opts: StreamOptions, batches: list[dict[str, torch.Tensor]] | None) -> None:
        self.folder, self.opts = folder, opts
        self.source = source = ShardedSource(folder)
        self.model, self.config = _meta_model(folder)
        self.blocks_name = _block_list(self.model, self.config)
        self.blocks = self.model.get_submodule(self.blocks_name)
        expected = {k: tuple(v.shape) for k, v in self.model.state_dict().items()}
        self.per_expert_source = stores_experts_one_by_one(source.tensors) and any(k not in source for k in expected)
        if self.per_expert_source:  # read through transformers' own conversion into the fused layout
            self.source = source = PerExpertSource(folder, self.model)
        if opts.expert_layout == "per-expert" and not find_moe_blocks(self.model):
            raise BudgetError(f"expert_layout='per-expert': {type(self.model).__name__} has no mixture-of-experts "
                              "layer")
        hint = ("; the folder was pruned with per-layer sizes (secateurs.json), which streaming cannot read: stream "
                "the original checkpoint, or prune this one without --stream") if (folder / MANIFEST).is_file() else ""
        check_shapes(source, expected, folder / "config.json", hint)
        known = set(expected)
        skipped = sorted(n for n in source.tensors if n not in known)
        if skipped:
            log.warning("%d stored tensors are not part of %s and are dropped: %s", len(skipped),
                        type(self.model).__name__, ", ".join(skipped[:5]))
        self.passthrough = [n for n in self.model.state_dict() if n in source and
                            not n.startswith(self.blocks_name + ".")]
        self.keys = [list(b.state_dict()) for b in self.blocks.children()]
        for i, block_keys in enumerate(self.keys):
            missing = [f"{self.blocks_name}.{i}.{k}" for k in block_keys if f"{self.blocks_name}.{i}.{k}" not in source]
            if missing:
                raise CheckpointError(f"the checkpoint in '{folder}' lacks block tensors, e.g. '{missing[0]}'")
        self.block_bytes = max(sum(source.info(f"{self.blocks_name}.{i}.{k}").nbytes for k in ks)
                               for i, ks in enumerate(self.keys))
        self.model_bytes = sum(source.info(n).nbytes for n in source.tensors)
        self.dtype = source.info(f"{self.blocks_name}.0.{self.keys[0][0]}").dtype
        self.order = list(range(len(self.keys)))  # source block of every output position
        self.peak_weights = self.peak_acts = 0
        self.walks = 0
        if (opts.experts or opts.expert_neurons) and not find_moe_blocks(self.model):
            raise BudgetError(f"{type(self.model).__name__} has no mixture-of-experts block; experts / "
                              "expert_neurons cannot apply")
        self.first: list[Call] = []
        if opts.calibrated:
            if batches is None:
                raise BudgetError(f"{', '.join(opts.needs_calibration)} need{'s' if len(opts.needs_calibration) == 1 else ''}"
                                  " calibration batches (calib=...)")
            types = getattr(self.config, "layer_types", None)
            if isinstance(types, list) and len(set(types)) > 1:
                raise BudgetError(f"{type(self.model).__name__} mixes attention types {sorted(set(types))}: "
                                  "streamed calibration passes one attention mask to every block, so it cannot "
                                  "calibrate this model; use weight-only criteria or prune it in memory")
            self.first = _first_inputs(self.model, self.blocks_name, source, batches, self.dtype) if batches else []
        self._example: Call | None = None
        self.experts_state = 0 if opts.experts else None
        self.width_state = int(bool(opts.experts)) + int(bool(opts.expert_neurons))
        hidden = (("hidden", float(opts.hidden)),) if opts.hidden else ()
        self.options = ChannelOptions(ratio=0.0, round_to=opts.round_to, min_keep=opts.min_keep,
                                      tensor_parallel=opts.tensor_parallel,
                                      kind_ratios=opts.kind_ratios + hidden,
                                      bias_compensation=bool(opts.bias_compensation), require=False)
        self.removed: list[str] = []
        self.kinds: dict[str, tuple[int, int, bool]] = {}  # kind -> groups selected, smallest, any channel removed
        self.hidden: _HiddenPlan | None = None

    def prefix(self, position: int) -> str:
        """The source checkpoint's name prefix of the block at ``position``."""
        return f"{self.blocks_name}.{self.order[position]}."

    def load(self, position: int, block: nn.Module) -> nn.Module:
        """Assign the block's weights from the checkpoint to ``block`` (a meta module of the same structure)."""
        i = self.order[position]
        prefix = self.prefix(position)
        loaded = self.source.load([prefix + k for k in self.keys[i]])
        self.peak_weights = max(self.peak_weights, sum(t.numel() * t.element_size() for t in loaded.values()))
        block.load_state_dict({k: loaded[prefix + k] for k in self.keys[i]}, assign=True, strict=True)
        del loaded
        unset = [n for n, t in (*block.named_parameters(), *block.named_buffers()) if t.is_meta]
        if unset:
            raise CheckpointError(f"block '{prefix[:-1]}' has tensors the checkpoint does not store, e.g. "
                                  f"'{unset[0]}'; it cannot be streamed")
        return block.eval()

    def note_activations(self, streams: dict[Any, list[Call]]) -> None:
        self.peak_acts = max(self.peak_acts, sum(_bytes(c) for c in streams.values()))

    def streams(self) -> dict[Any, list[Call]]:
        """The calibration streams the transform stages read, all starting at the first block's inputs."""
        if not self.first:
            return {}
        opts = self.opts
        out: dict[Any, list[Call]] = {}
        if self.experts_state is not None:
            out[self.experts_state] = self.first
        if opts.width and (opts.importance in _CALIBRATED_IMPORTANCE or opts.allocate == "cfsp"):
            out[self.width_state] = self.first
        if opts.sparse and opts.sparsity_criterion in _CALIBRATED_SPARSITY:
            out["pruned"] = self.first
            if self.hidden is not None and self.hidden.keep is not None:  # the pruned model's embeddings are sliced
                keep = torch.from_numpy(self.hidden.keep)
                out["pruned"] = [((args[0].index_select(-1, keep), *args[1:]), kwargs) for args, kwargs in self.first]
        return out

    def capture_example(self, block: nn.Module, calls: list[Call] | None) -> dict[str, Any]:
        """Keyword inputs to capture ``block`` with: its first calibration call, or one made up of 8 zero tokens."""
        if calls:
            return _as_inputs(block, calls[0])
        return _as_inputs(block, self._base_call())

    def _base_call(self) -> Call:
        if self._example is None:
            self._example = self.first[0] if self.first else _first_inputs(
                self.model, self.blocks_name, self.source, [{"input_ids": torch.zeros(1, 8, dtype=torch.long)}],
                self.dtype)[0]
        return self._example

    def probe_call(self) -> Call | None:
        """The call every written block is probed with for the reload check.

        The first block's inputs, with seeded random hidden states of the output's hidden size; None when the
        model's preamble cannot be rebuilt outside the blocks (then each block's MLP is probed, see
        :meth:`probe`).
        """
        try:
            args, kwargs = self._base_call()
        except CheckpointError:
            return None
        hidden = args[0]
        width = hidden.shape[-1] if self.hidden is None or self.hidden.keep is None else len(self.hidden.keep)
        gen = torch.Generator().manual_seed(0)
        probe = torch.randn((*hidden.shape[:-1], width), generator=gen).to(hidden.dtype)
        return (probe, *args[1:]), kwargs

    def probe(self, block: nn.Module, position: int, call: Call | None) -> tuple[str, Call, torch.Tensor]:
        """What the written ``block`` gives on the probe: the whole block on ``call``, or its MLP alone."""
        suffix, target = "", block
        if call is None:
            if self.opts.block_capture:  # unreachable: capturing whole blocks needed the preamble already
                raise BudgetError(f"block '{self.blocks_name}.{position}' cannot be probed for the reload check: "
                                  "the model's preamble cannot be rebuilt")
            target, _, suffix = self.width_target(block, position)  # its MLP, which has a linear layer
            first = next(m for m in target.modules() if isinstance(m, nn.Linear))
            gen = torch.Generator().manual_seed(0)
            call = ((torch.randn((1, 8, first.in_features), generator=gen).to(first.weight.dtype),), {})
        with torch.no_grad():
            said = first_tensor(target(*call[0], **call[1]))
        if said is None:
            raise BudgetError(f"{type(target).__name__} returned no tensor on the probe call")
        return suffix, call, said.detach()

    def width_target(self, block: nn.Module, position: int) -> tuple[nn.Module, Any, str]:
        """What width pruning captures: the whole block, or (FFN width by weights alone) only its MLP.

        The MLP alone needs no inputs from the model's preamble (rotary tables, masks), which some models
        cannot rebuild outside the blocks; its scores and cuts are the same.
        """
        if self.opts.block_capture:
            return block, None, ""
        mlp = getattr(block, "mlp", None)
        # the hidden size the MLP reads: its first linear layer's input, or an MoE router's [experts, hidden]
        first = next((p for m in mlp.modules() for p in ([m.weight] if isinstance(m, nn.Linear) else
                                                         [q for q in m._parameters.values() if q is not None])
                      if p.dim() == 2), None) if isinstance(mlp, nn.Module) else None
        if first is None:
            raise BudgetError(f"block '{self.blocks_name}.{position}' ({type(block).__name__}) has no mlp with a "
                              "linear layer to prune")
        assert isinstance(mlp, nn.Module)
        return mlp, (torch.zeros(1, 1, first.shape[1], dtype=first.dtype),), "mlp."

    def depth(self) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
        """First pass over the dense blocks: choose the blocks to remove, then renumber the meta model."""
        opts, n = self.opts, len(self.keys)
        assert opts.layers is not None
        count = int(round(n * opts.layers)) if opts.layers < 1 else int(opts.layers)
        if count >= n:
            raise BudgetError(f"cannot remove {count} of {n} blocks; at least one must stay")
        if count == 0:
            return [], []
        self.walks += 1
        names = [f"{self.blocks_name}.{i}" for i in range(n)]
        influence: dict[Any, float] = {}
        windows: dict[Any, float] = {}
        boundaries: list[list[torch.Tensor]] = [[args[0] for args, _ in self.first]]
        calls = self.first
        for i in track(range(n), "depth scoring blocks"):
            block = self.load(i, copy.deepcopy(self.blocks.get_submodule(str(i))))
            out, _ = _forward(block, calls)
            influence[i] = float(sum(1 - mean_cosine(a[0], o[0]) for (a, _), (o, _) in zip(calls, out, strict=True)))
            if opts.depth_criterion == "angular":
                boundaries.append([args[0] for args, _ in out])
                start = i + 1 - count
                if start >= 0:
                    windows[start] = float(sum(mean_cosine(x, y) for x, y in zip(
                        boundaries[0], boundaries[-1], strict=True)))
                    boundaries.pop(0)
            calls = out
            self.peak_acts = max(self.peak_acts, _bytes(calls) * (count + 1 if windows or boundaries[1:] else 2))
            del block
            _release_memory()
        total = all_reduce_sum({**{("bi", k): v for k, v in influence.items()},
                                **{("win", k): v for k, v in windows.items()}, "n": float(len(self.first))})
        seen = max(total["n"], 1.0)
        if opts.depth_criterion == "bi":
            scores = {names[i]: total[("bi", i)] / seen for i in range(n)}
            removed = sorted(names, key=lambda c: scores[c])[:count]
            chosen = [(c, scores[c]) for c in removed]
        else:
            scores = {names[s]: angular_distance(total[("win", s)] / seen) for s in range(n - count + 1)}
            best = min(range(n - count + 1), key=lambda s: scores[names[s]])
            chosen = [(names[s], scores[names[best]]) for s in range(best, best + count)]
        drop = {int(c.rpartition(".")[2]) for c, _ in chosen}
        self.removed = [c for c, _ in chosen]
        RemoveBlocks(count)._apply(self.model, self.removed, Snapshot(), [])
        self.order = [i for i in range(n) if i not in drop]
        return sorted(chosen, key=lambda t: int(t[0].rpartition(".")[2])), sorted(scores.items())

    def advance(self, block: nn.Module, streams: dict[Any, list[Call]], state: Any,
                influence: list[float] | None = None) -> list[Call] | None:
        """The calls into ``block`` for ``state``; the stream moves on to the next block's inputs."""
        calls = streams.get(state)
        if calls is None:
            return None
        out, _ = _forward(block, calls)
        if influence is not None:
            influence.append(float(sum(1 - mean_cosine(a[0], o[0]) for (a, _), (o, _) in zip(calls, out, strict=True))))
        streams[state] = out
        return calls

    def transform(self, position: int, block: nn.Module, streams: dict[Any, list[Call]], *,
                  budget: dict[str, float] | None = None, survey: list[Any] | None = None,
                  influence: list[float] | None = None) -> tuple[list[ExpertChange], list[tuple[str, int, int]]]:
        """Experts, expert neurons and width on one loaded block, as :func:`secateurs.prune` orders them.

        With ``survey`` the width scores are appended to it (as ``(slot, scores)``) instead of pruning.
        """
        opts = self.opts
        prefix = f"{self.blocks_name}.{position}."
        graph: Graph | None = None
        experts: list[ExpertChange] = []
        if opts.experts or opts.expert_neurons:
            calls = self.advance(block, streams, self.experts_state) if opts.experts else None
            graph = capture(block, self.capture_example(block, calls))
            passes: list[Pass] = []
            if opts.experts:
                passes += [ScoreExperts(opts.expert_importance, calib=[_as_inputs(block, c) for c in calls or []]),
                           PruneExperts(opts.experts)]
            if opts.expert_neurons:
                passes.append(PruneExpertNeurons(opts.expert_neurons))
            result = PassManager(passes)(graph)
            graph = result.graph
            experts = [dataclasses.replace(c, block=prefix + c.block) for name, r, _ in result.results
                       if name in ("PruneExperts", "PruneExpertNeurons") for c in (r.record or [])]
        if not opts.width:
            return experts, []
        calls = self.advance(block, streams, self.width_state, influence)
        target, example, sub = self.width_target(block, position)
        if graph is None:
            graph = capture(target, example if example is not None else self.capture_example(block, calls))
        calibrated = opts.importance in _CALIBRATED_IMPORTANCE
        result = PassManager([AnalyzeDependencies(), ScoreChannels(
            opts.importance or "l2", calib=[_as_inputs(block, c) for c in calls or []] if calibrated else None,
            group_prefix=prefix + sub)])(graph)
        graph = result.graph
        if survey is not None:
            info = graph.analysis(DependencyInfo)
            scores = graph.analysis(ChannelScores).scores
            ratios = dict(opts.kind_ratios)
            for g in info.iter_groups():
                if ratios.get(g.kind, 0.0) > 0 and eligible(g, self.options) and (
                        opts.allocate is None or (g.mixed_at is None and g.size > 1)):
                    slot = _Slot(len(survey), g.size, g.kind, sub + g.name, position, int(g.params_per_channel))
                    survey.append((slot, np.asarray(scores[g.id], dtype=np.float64)))
            return experts, []
        passes = [_GivenBudget({k[len(sub):]: v for k, v in budget.items()}, opts.allocate or "global",
                               opts.budget_unit)] if budget is not None else []
        info = graph.analysis(DependencyInfo)
        result = PassManager([*passes, PruneChannels(self.options)])(graph)
        record: PruneRecord | None = result.record(PruneRecord)
        changes = record.changes if record else []
        self.tally(info, changes)
        return experts, [(prefix + sub + c.name, c.before, c.after) for c in changes]

    def tally(self, info: DependencyInfo, changes: list[Any]) -> None:
        """Count, per kind asked for, the groups one block's plan selected, the smallest, and whether any lost one."""
        removed = {c.kind for c in changes if c.after < c.before}
        for kind, ratio in self.options.kind_ratios:
            if ratio <= 0 or kind == "hidden":  # the hidden size is planned over the whole model (plan_hidden)
                continue
            sizes = [g.size for g in info.iter_groups() if g.kind == kind and eligible(g, self.options)]
            n, smallest, hit = self.kinds.get(kind, (0, 0, False))
            self.kinds[kind] = (n + len(sizes), min([smallest, *sizes]) if n else min(sizes, default=0),
                                hit or kind in removed)

    def uniform_blocks(self) -> bool:
        """Whether every block stores the same tensors with the same shapes (then one block's plan is every one's)."""
        def shapes(position: int) -> list[tuple[str, tuple[int, ...]]]:
            prefix, keys = self.prefix(position), self.keys[self.order[position]]
            return [(k, tuple(self.source.info(prefix + k).shape)) for k in keys]

        first = shapes(0)
        types = getattr(self.config, "layer_types", None)
        return (not isinstance(types, list) or len(set(types)) <= 1) and all(
            shapes(p) == first for p in range(1, len(self.order)))

    def require_removal(self, blocks: str) -> None:
        """Refuse a run in which a kind asked for removed nothing in ``blocks`` (never exit 0 with less done).

        Raises:
            BudgetError: Naming the kind, as the in-memory path does (:func:`require_removal`).

        """
        for kind, ratio in self.options.kind_ratios:
            if ratio <= 0 or kind == "hidden":
                continue
            n, smallest, hit = self.kinds.get(kind, (0, 0, False))
            if hit:
                continue
            what = f"{kind}={ratio:g} ({FLAGS.get(kind, kind)})"
            if not n:
                raise BudgetError(f"{what} selects no prunable group in {blocks}")
            raise rounded_away(what, n, smallest, self.options, f" in {blocks}")

    def plan_hidden(self) -> None:
        """Find the hidden-size group: capture the whole (depth-pruned) model on ``meta`` and analyse it."""
        hidden_size.plan_hidden(self)

    def score_hidden(self, position: int, block: nn.Module) -> None:
        """Add the contributions of block ``position``'s hidden-size members (as :class:`ScoreChannels` does)."""
        hidden_size.score_hidden(self, position, block)

    def stored_name(self, name: str) -> str:
        """The checkpoint's name of a tensor of the model (a tied weight is stored under one of its names)."""
        if name in self.source:
            return name
        target = dict(self.model.named_parameters(remove_duplicate=False)).get(name)
        for alias, t in self.model.named_parameters(remove_duplicate=False):
            if t is target and alias in self.source:
                return alias
        raise CheckpointError(f"the checkpoint in '{self.folder}' lacks '{name}'")

    def finish_hidden(self) -> None:
        """Add the embeddings', final norm's and LM head's contributions (read in row chunks); choose the channels."""
        hidden_size.finish_hidden(self)

    def survey(self) -> dict[int, dict[str, float]] | None:
        """First pass over the blocks: width scores of every block, then one ranking or allocation over all.

        The hidden size's scores are gathered in the same pass.

        Returns:
            Per block position, the fraction to remove per group name (None: width is decided block by block).

        """
        opts = self.opts
        self.walks += 1
        streams = self.streams()
        found: list[tuple[_Slot, np.ndarray]] = []
        influence: list[float] = []
        for position in track(range(len(self.order)), "scoring blocks"):
            block = self.load(position, copy.deepcopy(self.blocks.get_submodule(str(position))))
            start = len(found)
            bi: list[float] = []
            with torch.no_grad():
                self.transform(position, block, streams, survey=found, influence=bi)
                if self.hidden is not None:
                    self.score_hidden(position, block)
            influence.extend([bi[0] if bi else 0.0] * (len(found) - start))
            self.note_activations(streams)
            del block
            _release_memory()
        if self.hidden is not None:
            self.finish_hidden()
        if not opts.surveyed:
            return None
        if not found:
            raise BudgetError(f"no {'/'.join(k for k, _ in opts.kind_ratios)} groups to rank across the blocks")
        slots = [s for s, _ in found]
        scores = {s.id: v for s, v in found}
        if opts.allocate is not None:
            weights = {s.id: float(s.params_per_channel) if opts.budget_unit == "params" else 1.0 for s in slots}
            importance = None
            if opts.allocate == "cfsp":
                total = all_reduce_sum({**{i: v for i, v in enumerate(influence)}, "n": float(len(self.first))})
                importance = np.asarray([total[i] / max(total["n"], 1.0) for i in range(len(slots))])
            allocator = AllocateBudget(0.0, opts.allocate, unit=opts.budget_unit, min_keep=opts.min_keep,
                                       kind_ratios=dict(opts.kind_ratios))
            ratios = allocator.allocate(slots, scores, weights, importance, {s.id: s.kind for s in slots})
            if opts.uniform:
                ratios = uniform_ratios(ratios, slots)
        else:
            ratios = self._global_ranking(slots, scores)
        out: dict[int, dict[str, float]] = {}
        for s in slots:
            out.setdefault(s.position, {})[s.name] = ratios.get(s.id, 0.0)
        return out

    def _global_ranking(self, slots: list[_Slot], scores: dict[int, np.ndarray]) -> dict[int, float]:
        """Per kind, one ranking of scores normalised by each group's mean; the lowest ``ratio`` go.

        This is ``scope="global"`` of :func:`~secateurs.passes.channels.plan_keep` over every block's groups.
        """
        out: dict[int, float] = {}
        for kind, ratio in self.opts.kind_ratios:
            pool: list[tuple[float, int]] = []
            for s in slots:
                if s.kind != kind:
                    continue
                v = scores[s.id]
                mean = float(np.mean(v)) if v.size else 0.0
                pool.extend((float(x), s.id) for x in (v / mean if mean > 0 else np.zeros_like(v)))
            pool.sort(key=lambda t: t[0])
            removed: dict[int, int] = {}
            for _, sid in pool[:int(round(len(pool) * ratio))]:
                removed[sid] = removed.get(sid, 0) + 1
            out.update({s.id: removed.get(s.id, 0) / s.size for s in slots if s.kind == kind})
        return out

    def write(self, dst: str | os.PathLike[str], overwrite: bool, budget: dict[int, dict[str, float]] | None,
              dry_run: bool = False) -> tuple[list[Any], list[Any], list[Any], int, bool]:
        """The last pass: transform, sparsify and write every block (not with ``dry_run``), then the rest."""
        return write_blocks(self, dst, overwrite, budget, dry_run)
