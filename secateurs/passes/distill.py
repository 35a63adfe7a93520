"""Recovery training after pruning: distillation from the dense model, full or LoRA fine-tuning.

:class:`Recover` trains the pruned model (the student) on batches of data for a few hundred steps, with a
loss that mixes three terms:

- distillation: ``KL(teacher || student)`` of temperature-softened logits (times ``T^2``) when the outputs have
  ``logits``, else the mean squared error of the main output (``last_hidden_state`` of an encoder) divided by the
  teacher's mean square, so the weight does not depend on the scale of the activations;
- the task loss: the model's own ``loss`` when batches hold ``labels`` (Hugging Face style), or ``loss_fn``;
  ``alpha`` weighs distillation against it (``alpha * distill + (1 - alpha) * task``);
- hidden-state matching (``hidden_weight``): the normalised squared error between student and teacher hidden
  states (``output_hidden_states=True``), each kept student layer matched to its teacher layer: by the depth
  records when blocks were removed, an explicit ``layer_map``, or evenly spaced.

Shapes never change: the pass trains the weights the earlier passes left. Masks attached by
:class:`~secateurs.passes.sparsity.SparsifyWeights` (``torch.nn.utils.prune``) stay enforced: the forward uses
``weight_orig * weight_mask``, and in LoRA mode the adapters' update is added to ``weight_orig`` *inside* the
mask (a parametrization), so the update is masked while training and merging it is exact: 2:4 still holds
after the merge and the merged model computes what the trained one did. Layers whose weights already hold
zeros without a mask (``keep_masks=False``) get a temporary mask for the run (``keep_zeros``). Adapters come
from ``peft`` when it is installed and no targeted layer is masked, else from the built-in parametrization.

Training state (trainable tensors, buffers, optimizer moments, random state, the best weights so far) is
checkpointed to ``checkpoint_dir`` as safetensors plus a JSON file of scalars, written to a new folder that is
renamed into place, so an interrupted run resumes where its last checkpoint left it with the same loss curve.
Nothing is pickled. With ``cache_teacher`` the teacher's outputs are computed once into safetensors shards and
read back during training, so the teacher can be dropped (pass ``teacher=None`` once the cache exists);
``cache_top_k`` keeps only the ``k`` largest logits of every position and their token ids (the KL is then taken
over the teacher's top ``k``, renormalised: sparse distillation), which shrinks the cache by ``vocab / (2 k)``.

Training data can be any map-style dataset (``len`` and integer indexing: a list, a ``torch.utils.data.Dataset``,
a Hugging Face ``datasets.Dataset`` of tensors): it is read batch by batch when needed, never copied whole; other
iterables (generators) are read once into a list. bf16 autocast works on CUDA and on CPU.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from secateurs.errors import PassContractError, RecoveryError
from secateurs.frontends.torch_export import split_inputs
from secateurs.ir.graph import Graph
from secateurs.passes.base import Pass, PassResult, recorded
from secateurs.passes.depth import DepthRecord
from secateurs.passes.training.checkpoints import _Checkpoints, _State, _state_tensors
from secateurs.passes.training.lora import LoraAdapters, _attach_zero_masks, _refresh_masked, attach_lora
from secateurs.passes.training.losses import (
    _accepts_hidden,
    _hidden,
    _hidden_pairs,
    _kl,
    _kl_top_k,
    _main,
    _nmse,
    _token_mask,
    layer_map_from_depth,
)
from secateurs.passes.training.options import (
    LORA_BACKENDS,
    RECOVER_MODES,
    LossFn,
    LossPoint,
    RecoverOptions,
    RecoverRecord,
)
from secateurs.passes.training.teacher import _device, _indexed, _Teacher, _to
from secateurs.progress import track

__all__ = [
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

log = logging.getLogger(__name__)

class Recover(Pass):
    """Transform pass: recovery training of the pruned model against the dense one (see the module docstring).

    Weights change, shapes do not; the graph stays valid (its analyses are dropped, as they may depend on
    weights).

    Example:
        >>> dense = copy.deepcopy(model)
        >>> secateurs.prune(model, example, ffn=0.4)
        >>> Recover(dense, train_batches, eval_data=held_out, options=RecoverOptions(steps=200))(graph)

    """

    transforms = True
    transactional = True

    def __init__(self, teacher: nn.Module | None, data: Iterable[Any], *, eval_data: Iterable[Any] | None = None,
                 options: RecoverOptions | None = None, loss_fn: LossFn | None = None,
                 depth: Sequence[DepthRecord] = ()) -> None:
        """Create the pass.

        Args:
            teacher: The dense model (outputs to distil); None for task-loss-only training or when the
                teacher cache already exists.
            data: Training batches: dicts of tensors (keyword inputs, Hugging Face style, ``labels`` for the
                task loss) or tuples of positional tensors, cycled in a seeded order. A map-style dataset (``len``
                and integer indexing) is read batch by batch as needed; any other iterable is read once into a list.
            eval_data: Held-out batches for evaluation, early stopping and choosing the kept weights.
            options: The :class:`RecoverOptions` (defaults if None).
            loss_fn: Task loss ``(student_output, batch) -> scalar`` instead of the model's own ``loss``.
            depth: Depth records of the block removals done before (for hidden-state layer matching).

        Raises:
            RecoveryError: ``data`` (or a given ``eval_data``) is empty, or ``teacher`` is not a module.

        """
        if teacher is not None and not isinstance(teacher, nn.Module):
            raise RecoveryError(f"the teacher must be an nn.Module, got {type(teacher).__name__}")
        self.teacher = teacher
        self.data = _indexed(data)
        if not len(self.data):
            raise RecoveryError("recovery data is empty: give at least one training batch")
        self.eval_data = None if eval_data is None else _indexed(eval_data)
        if self.eval_data is not None and not len(self.eval_data):
            raise RecoveryError("held-out recovery data (eval_data) is empty")
        self.options = options if options is not None else RecoverOptions()
        if not isinstance(self.options, RecoverOptions):
            raise RecoveryError(f"options must be RecoverOptions, got {type(self.options).__name__}")
        if self.options.patience and self.eval_data is None:
            raise RecoveryError("early stopping (patience) needs held-out data (eval_data)")
        self.loss_fn, self.depth = loss_fn, tuple(depth)

    # -- setup ---------------------------------------------------------------------------------------

    def _has_task(self, batch: Any) -> bool:
        return self.loss_fn is not None or (isinstance(batch, dict) and "labels" in batch)

    def _weights(self, batch: Any) -> tuple[float, float, float]:
        """(distillation, task, hidden) weights for batches like ``batch``."""
        o = self.options
        has_task = self._has_task(batch)
        distill = o.alpha if has_task else 1.0
        task = 1.0 - o.alpha if has_task else 0.0
        return distill, task, o.hidden_weight

    def _objective(self, kind: str) -> str:
        d, t, h = self._weights(self.data[0])
        parts = []
        if d:
            parts.append(f"{d:g}*" + (f"kl(T={self.options.temperature:g})" if kind == "kl" else "nmse"))
        if t:
            parts.append(f"{t:g}*task")
        if h:
            parts.append(f"{h:g}*hidden")
        return " + ".join(parts)

    def run(self, graph: Graph) -> PassResult:
        """Train the graph's module in place; shapes do not change.

        Every parameter and buffer is copied into the transaction first (in memory up to
        :data:`~secateurs.modeling.rewrite.ROLLBACK_MEMORY`, then on disk), so a failed or interrupted run, or a
        check failing after it, restores the model exactly.

        Raises:
            RecoveryError: The teacher's outputs do not match the student's (another vocabulary or head), there
                is nothing to optimise, or the teacher is missing where distillation needs it.
            CheckpointError: A checkpoint to resume from is unreadable or belongs to another model or mode.
            PassContractError: A parameter changed shape during training.

        """
        o = self.options
        if o.steps == 0:
            return PassResult(graph, False, RecoverRecord(o.mode, "", (), 0, 0.0, False, None, None, 0))
        with recorded() as snap:
            for tensor in [*graph.module.parameters(), *graph.module.buffers()]:
                snap.record_values(tensor)
            for mod in graph.module.modules():  # adapters and masks come and go: the tables as they were
                snap.record_module(mod)
            return self._run(graph)

    def _run(self, graph: Graph) -> PassResult:
        o = self.options
        model = graph.module
        distill_w, task_w, hidden_w = self._weights(self.data[0])
        if distill_w == 0 and task_w == 0 and hidden_w == 0:
            raise RecoveryError("nothing to optimise: alpha=0 without a task loss and hidden_weight=0")
        if self.teacher is None and (distill_w or hidden_w) and not o.cache_teacher:
            raise RecoveryError("distillation needs the teacher (dense model); pass it, or set alpha=0 and "
                                "hidden_weight=0 to train on the task loss alone")
        shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        try:
            first = next(model.parameters())
            home = first.device
        except StopIteration:
            raise RecoveryError("the model has no parameters to train") from None
        device = torch.device(o.device) if o.device is not None else home
        teacher_home, teacher_training = None, False
        if self.teacher is not None:
            teacher_home = next(self.teacher.parameters(), first).device
            teacher_training = self.teacher.training
        use_bf16 = o.bf16 and device.type in ("cuda", "cpu")
        if o.bf16 and not use_bf16:
            log.warning("bf16 autocast works on CUDA and CPU; training in float32 on %s", device)

        def autocast() -> Any:
            return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()

        was_training = model.training
        flags = {n: p.requires_grad for n, p in model.named_parameters()}
        rng_devices = [device] if device.type == "cuda" else []
        model.to(device)
        attached: list[nn.Module] = []
        adapters: LoraAdapters | None = None
        ok = False
        try:
            with torch.random.fork_rng(devices=rng_devices):
                torch.manual_seed(o.seed)
                if self.teacher is not None:
                    self.teacher.eval()
                    if not o.cache_teacher:  # a cached teacher visits the device only while the cache is built
                        self.teacher.to(device)
                kind, pairs, layers = self._inspect(model, device, autocast, hidden_w)
                teacher = _Teacher(self.teacher, kind, [t for _, t in pairs], device, autocast, o.cache_top_k)
                if (distill_w or hidden_w) and o.cache_teacher:
                    folder = self._cache_folder()
                    splits = {"train": self.data}
                    if self.eval_data is not None and not self._has_task(self.eval_data[0]):
                        splits["eval"] = self.eval_data
                    teacher.build_cache(folder, splits, layers)
                self._check_teacher(model, teacher, kind, pairs, device, autocast)
                if o.keep_zeros:
                    attached = _attach_zero_masks(model)
                if o.mode == "lora":
                    for p in model.parameters():
                        p.requires_grad_(False)
                    adapters = attach_lora(model, o.lora_targets or None, rank=o.lora_rank, alpha=o.lora_alpha,
                                           backend=o.lora_backend)
                    trainable = dict(self._named(model, adapters.parameters()))
                else:
                    for p in model.parameters():
                        p.requires_grad_(True)
                    trainable = dict(model.named_parameters())
                record = self._train(model, trainable, teacher, kind, pairs, device, autocast,
                                     "lora/" + adapters.backend if adapters else "full")
                ok = True
        finally:
            if adapters is not None:
                adapters.merge() if ok else adapters.unload()
            for mod in attached:
                torch_prune.remove(mod, "weight")
            _refresh_masked(model)
            for n, p in model.named_parameters():
                p.requires_grad_(flags.get(n, p.requires_grad))
            model.to(home)
            model.train(was_training)
            if self.teacher is not None and teacher_home is not None:
                self.teacher.to(teacher_home).train(teacher_training)
        after = {n: tuple(p.shape) for n, p in model.named_parameters()}
        if after != shapes:
            changed = sorted(set(after.items()) ^ set(shapes.items()))[:3]
            raise PassContractError(f"Recover changed parameter shapes or names: {changed}")
        graph.analyses.clear()
        return PassResult(graph, record.steps > 0 or record.resumed_from is not None, record)

    @staticmethod
    def _named(model: nn.Module, params: list[nn.Parameter]) -> list[tuple[str, nn.Parameter]]:
        names = {id(p): n for n, p in model.named_parameters()}
        return [(names[id(p)], p) for p in params]

    def _inspect(self, model: nn.Module, device: torch.device, autocast: Callable[[], Any],
                 hidden_w: float) -> tuple[str, list[tuple[int, int]], int | None]:
        """The distillation kind, the hidden-state pairs and the teacher's depth, from one forward of each."""
        o = self.options
        batch = self.data[0]
        args, kwargs = split_inputs(model, batch)
        if hidden_w:
            for who in (model, self.teacher):
                if who is not None and not _accepts_hidden(who):
                    raise RecoveryError(f"hidden_weight needs hidden states, but {type(who).__name__}.forward takes "
                                        "no output_hidden_states argument")
            kwargs["output_hidden_states"] = True
        model.eval()
        with torch.no_grad(), autocast():
            out = model(*_to(args, device), **_to(kwargs, device))
        kind = o.distill
        if kind == "auto":
            kind = "kl" if isinstance(getattr(out, "logits", None), torch.Tensor) else "mse"
        if self._weights(batch)[1] and self.loss_fn is None and not isinstance(getattr(out, "loss", None),
                                                                                torch.Tensor):
            raise RecoveryError("the batches hold 'labels' but the model returns no 'loss'; give loss_fn")
        if not hidden_w:
            return kind, [], None
        student_layers = len(_hidden(out)) - 1
        if self.teacher is not None:
            targs, tkw = split_inputs(self.teacher, batch)
            tkw.pop("labels", None)
            tkw["output_hidden_states"] = True
            tdev = _device(self.teacher, device)
            with torch.no_grad(), autocast():
                teacher_layers = len(_hidden(self.teacher(*_to(targs, tdev), **_to(tkw, tdev)))) - 1
        else:
            teacher_layers = self._cached_teacher_layers()
        layer_map = o.layer_map
        if layer_map is None and self.depth:
            layer_map = layer_map_from_depth(self.depth, teacher_layers)
        return kind, _hidden_pairs(student_layers, teacher_layers, layer_map), teacher_layers

    def _cache_folder(self) -> Path:
        o = self.options
        return Path(o.cache_dir) if o.cache_dir else Path(str(o.checkpoint_dir)) / "teacher"

    def _cached_teacher_layers(self) -> int:
        try:
            return int(json.loads((self._cache_folder() / "manifest.json").read_text())["teacher_layers"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise RecoveryError(f"hidden-state matching without the teacher needs a teacher cache in "
                                f"'{self._cache_folder()}' built with hidden states: {exc}") from exc

    def _check_teacher(self, model: nn.Module, teacher: _Teacher, kind: str, pairs: list[tuple[int, int]],
                       device: torch.device, autocast: Callable[[], Any]) -> None:
        distill_w, _, hidden_w = self._weights(self.data[0])
        if not (distill_w or hidden_w):
            return
        args, kwargs = split_inputs(model, self.data[0])
        if pairs:
            kwargs["output_hidden_states"] = True
        with torch.no_grad(), autocast():
            out = model(*_to(args, device), **_to(kwargs, device))
        target = teacher.get("train", 0, self.data[0])
        mine = _main(out, kind)
        if target.index is not None:
            if tuple(target.main.shape[:-1]) != tuple(mine.shape[:-1]) or int(target.index.max()) >= mine.shape[-1]:
                raise RecoveryError(f"the teacher's top-{target.main.shape[-1]} logits {tuple(target.main.shape)} do not "
                                    f"match the student's output {tuple(mine.shape)} (another vocabulary?)")
        elif tuple(target.main.shape) != tuple(mine.shape):
            raise RecoveryError(f"the teacher's output {tuple(target.main.shape)} does not match the student's "
                                f"{tuple(mine.shape)} (another vocabulary or output head?)")
        hs = _hidden(out) if pairs else ()
        for s, t in pairs:
            if tuple(hs[s].shape) != tuple(target.hidden[t].shape):
                raise RecoveryError(f"student hidden state {s} {tuple(hs[s].shape)} and teacher hidden state {t} "
                                    f"{tuple(target.hidden[t].shape)} differ; hidden matching needs equal hidden sizes")

    # -- training ------------------------------------------------------------------------------------

    def _loss(self, model: nn.Module, split: str, index: int, batch: Any, teacher: _Teacher, kind: str,
              pairs: list[tuple[int, int]], device: torch.device, autocast: Callable[[], Any],
              weights: tuple[float, float, float]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(objective, task loss or None) of one batch."""
        distill_w, task_w, hidden_w = weights
        args, kwargs = split_inputs(model, batch)
        if pairs and hidden_w:
            kwargs["output_hidden_states"] = True
        with autocast():
            out = model(*_to(args, device), **_to(kwargs, device))
        total = torch.zeros((), device=device)
        task = None
        if self.loss_fn is not None:
            task = self.loss_fn(out, _to(batch, device))
        elif isinstance(batch, dict) and "labels" in batch:
            task = out.loss
        if task_w and task is not None:
            total = total + task_w * task.float()
        if distill_w or hidden_w:
            target = teacher.get(split, index, batch)
            mine = _main(out, kind)
            mask = _token_mask(batch, mine)
            if distill_w:
                if kind == "kl" and target.index is not None:
                    d = _kl_top_k(mine, target.main, target.index, self.options.temperature, mask)
                elif kind == "kl":
                    d = _kl(mine, target.main, self.options.temperature, mask)
                else:
                    d = _nmse(mine, target.main, mask)
                total = total + distill_w * d
            if hidden_w and pairs:
                hs = _hidden(out)
                h = sum(_nmse(hs[s], target.hidden[t], _token_mask(batch, hs[s])) for s, t in pairs)
                total = total + hidden_w * h / len(pairs)
        return total, task

    def _evaluate(self, model: nn.Module, teacher: _Teacher, kind: str, pairs: list[tuple[int, int]],
                  device: torch.device, autocast: Callable[[], Any]) -> tuple[float, float | None]:
        """Held-out loss (task loss when there is one, else the distillation objective) and perplexity."""
        assert self.eval_data is not None
        model.eval()
        losses = []
        builtin = self.loss_fn is None
        with torch.no_grad():
            for i in range(len(self.eval_data)):
                batch = self.eval_data[i]
                d, _, h = self._weights(batch)
                weights = (0.0, 1.0, 0.0) if self._has_task(batch) else (d, 0.0, h)
                total, task = self._loss(model, "eval", i, batch, teacher, kind, pairs, device, autocast, weights)
                builtin = builtin and task is not None
                losses.append(float(total))
        model.train()
        loss = sum(losses) / len(losses)
        return loss, (math.exp(min(loss, 700.0)) if builtin else None)

    def _lr(self, step: int) -> float:
        o = self.options
        factor = min(1.0, (step + 1) / o.warmup) if o.warmup else 1.0
        if o.schedule == "cosine":
            span = max(o.steps - o.warmup, 1)
            factor *= 0.5 * (1 + math.cos(math.pi * min(max(step - o.warmup, 0), span) / span))
        return o.learning_rate * factor

    def _order(self, epoch: int) -> list[int]:
        gen = torch.Generator().manual_seed(self.options.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.data), generator=gen).tolist()

    def _train(self, model: nn.Module, trainable: dict[str, nn.Parameter], teacher: _Teacher, kind: str,
               pairs: list[tuple[int, int]], device: torch.device, autocast: Callable[[], Any],
               mode: str) -> RecoverRecord:
        o = self.options
        params = list(trainable.values())
        optimizer = torch.optim.AdamW(params, lr=o.learning_rate, weight_decay=o.weight_decay)
        state = _State()
        ckpt = _Checkpoints(Path(o.checkpoint_dir), mode) if o.checkpoint_dir else None
        resumed_from = None
        if ckpt is not None and o.resume:
            resumed_from = ckpt.load(model, trainable, optimizer, state, device)
        start = time.perf_counter()
        evaluate = self.eval_data is not None
        if evaluate and not state.curve:
            loss, ppl = self._evaluate(model, teacher, kind, pairs, device, autocast)
            state.curve.append(LossPoint(0, None, loss, ppl))
            self._consider(model, trainable, state, loss, 0)
        model.train()
        orders: dict[int, list[int]] = {}
        n = len(self.data)
        for step in track(range(state.step, o.steps), "recover", total=max(o.steps - state.step, 0)):
            if state.stopped_early:
                break
            for group in optimizer.param_groups:
                group["lr"] = self._lr(step)
            optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for j in range(o.accumulate):
                g = step * o.accumulate + j
                order = orders.get(g // n)
                if order is None:
                    order = orders[g // n] = self._order(g // n)
                index = order[g % n]
                batch = self.data[index]
                objective, _ = self._loss(model, "train", index, batch, teacher, kind, pairs, device, autocast,
                                          self._weights(batch))
                (objective / o.accumulate).backward()
                total += float(objective.detach()) / o.accumulate
            if not math.isfinite(total):
                raise RecoveryError(f"the recovery loss is {total} at step {step + 1}; lower lr")
            if o.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, o.max_grad_norm)
            optimizer.step()
            state.step = step + 1
            point = LossPoint(state.step, total)
            if evaluate and (state.step == o.steps or (o.eval_every and state.step % o.eval_every == 0)):
                loss_eval, ppl = self._evaluate(model, teacher, kind, pairs, device, autocast)
                point = LossPoint(state.step, total, loss_eval, ppl)
                log.info("recover step %d/%d: training objective %.4f, held-out loss %.4f%s", state.step, o.steps,
                         total if total is not None else float("nan"), loss_eval,
                         f", perplexity {ppl:.3f}" if ppl is not None else "")
                self._consider(model, trainable, state, loss_eval, state.step)
                if o.patience and state.bad_evals >= o.patience and state.step < o.steps:
                    state.stopped_early = True
            state.curve.append(point)
            done = state.step == o.steps or state.stopped_early
            if ckpt is not None and (done or state.step % o.checkpoint_every == 0):
                ckpt.save(model, trainable, optimizer, state, state.seconds + time.perf_counter() - start)
        if state.best is not None and state.best_step != state.step:
            current = _state_tensors(model, trainable)
            with torch.no_grad():
                for name, value in state.best.items():
                    current[name].copy_(value)
        model.eval()
        return RecoverRecord(
            mode=mode, objective=self._objective(kind), curve=tuple(state.curve), steps=state.step,
            seconds=state.seconds + time.perf_counter() - start, stopped_early=state.stopped_early,
            best_step=state.best_step, resumed_from=resumed_from,
            trained_params=sum(p.numel() for p in params),
        )

    @staticmethod
    def _consider(model: nn.Module, trainable: dict[str, nn.Parameter], state: _State, loss: float,
                  step: int) -> None:
        """Keep a copy of the weights when ``loss`` is the best held-out loss so far."""
        if state.best_loss is None or loss < state.best_loss:
            state.best_loss, state.best_step, state.bad_evals = loss, step, 0
            state.best = {n: t.detach().to("cpu", copy=True) for n, t in _state_tensors(model, trainable).items()}
        else:
            state.bad_evals += 1
