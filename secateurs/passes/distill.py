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
import dataclasses
import hashlib
import inspect
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils import prune as torch_prune

from secateurs.errors import CheckpointError, PassContractError, RecoveryError
from secateurs.frontends.torch_export import split_inputs
from secateurs.ir.graph import Graph
from secateurs.passes.base import Pass, PassResult
from secateurs.passes.depth import DepthRecord
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

RECOVER_MODES = ("full", "lora")
LORA_BACKENDS = ("auto", "peft", "native")
_DISTILL_KINDS = ("auto", "kl", "mse")
_SCHEDULES = ("constant", "cosine")
_FORMAT = 1
_SHARD = 16  # batches per teacher-cache shard

Call = tuple[tuple[Any, ...], dict[str, Any]]
LossFn = Callable[[Any, Any], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class RecoverOptions:
    """Options of :class:`Recover` (plain values: a recipe can hold them).

    Attributes:
        steps: Optimizer steps (0: the pass does nothing).
        lr: Peak learning rate (AdamW); None: 1e-4 for ``full``, 1e-3 for ``lora``.
        accumulate: Batches whose gradients are summed into one optimizer step.
        weight_decay: AdamW weight decay.
        warmup: Steps of linear learning-rate warm-up.
        schedule: ``"constant"`` or ``"cosine"`` (decay to 0 at ``steps``) after warm-up.
        max_grad_norm: Gradient norm clip (None: no clipping).
        temperature: Softmax temperature of the KL distillation term.
        alpha: Weight of distillation against the task loss when there is one (``labels`` or ``loss_fn``):
            ``alpha * distill + (1 - alpha) * task``. Without a task loss distillation has weight 1.
        distill: ``"kl"`` (logits), ``"mse"`` (normalised squared error of the main output) or ``"auto"``
            (``kl`` when the outputs have ``logits``, else ``mse``).
        hidden_weight: Weight of hidden-state matching (0: off).
        layer_map: For hidden-state matching: the teacher layer (0-based) of every student layer; None: from the
            depth records given to :class:`Recover`, the identity when depths are equal, else evenly spaced.
        mode: ``"full"`` (every parameter trains) or ``"lora"`` (low-rank adapters on linear layers, merged at
            the end).
        lora_rank: Adapter rank.
        lora_alpha: Adapter scale numerator (the update is ``lora_alpha / lora_rank * B @ A``).
        lora_targets: Module names (or prefixes ending in ``.``) that get adapters; empty: every linear layer
            except the output head.
        lora_backend: ``"peft"``, ``"native"`` (a parametrization, exact with masks) or ``"auto"`` (peft when it
            is installed and no target is masked).
        keep_zeros: Layers whose weights hold zeros (at least 1%) without an attached mask keep them.
        eval_every: Evaluate on the held-out batches every this many steps (0: only before and after).
        patience: Stop after this many evaluations without a better held-out loss (0: never stop early).
            With held-out data the weights of the best evaluation are the ones kept.
        checkpoint_dir: Folder for resumable training state (None: no checkpoints).
        checkpoint_every: Steps between checkpoints (one is also written at the end).
        resume: Continue from the latest checkpoint in ``checkpoint_dir`` when there is one.
        cache_teacher: Precompute the teacher's outputs once into ``cache_dir`` (safetensors shards).
        cache_dir: Folder of the teacher cache (None: ``checkpoint_dir/teacher``).
        cache_top_k: With ``cache_teacher`` and logit distillation: keep only the top ``k`` logits per position
            (and their ids) in the cache; the KL runs over them (None: the full logits).
        device: Where to train (None: where the model is); the model goes back where it was afterwards.
        bf16: bfloat16 autocast of the forward passes (CUDA or CPU; weights and optimizer stay float32).
        seed: Seed of adapter initialisation, data order and dropout.

    """

    steps: int = 100
    lr: float | None = None
    accumulate: int = 1
    weight_decay: float = 0.0
    warmup: int = 0
    schedule: str = "constant"
    max_grad_norm: float | None = 1.0
    temperature: float = 2.0
    alpha: float = 0.5
    distill: str = "auto"
    hidden_weight: float = 0.0
    layer_map: tuple[int, ...] | None = None
    mode: str = "full"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ()
    lora_backend: str = "auto"
    keep_zeros: bool = True
    eval_every: int = 0
    patience: int = 0
    checkpoint_dir: str | None = None
    checkpoint_every: int = 50
    resume: bool = False
    cache_teacher: bool = False
    cache_dir: str | None = None
    cache_top_k: int | None = None
    device: str | None = None
    bf16: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        """Validate every option with a message naming it."""
        choices = {"mode": RECOVER_MODES, "lora_backend": LORA_BACKENDS, "distill": _DISTILL_KINDS,
                   "schedule": _SCHEDULES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise RecoveryError(f"unknown recovery {name} {getattr(self, name)!r}; choose from {allowed}")
        ints = {"steps": 0, "accumulate": 1, "warmup": 0, "lora_rank": 1, "eval_every": 0, "patience": 0,
                "checkpoint_every": 1}
        for name, low in ints.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise RecoveryError(f"recovery option {name} must be an integer >= {low}, got {value!r}")
        floats = {"weight_decay": self.weight_decay, "temperature": self.temperature, "alpha": self.alpha,
                  "hidden_weight": self.hidden_weight, "lora_alpha": self.lora_alpha}
        for name, value in floats.items():
            if not isinstance(value, (int, float)) or math.isnan(value) or value < 0:
                raise RecoveryError(f"recovery option {name} must be a number >= 0, got {value!r}")
        if self.alpha > 1:
            raise RecoveryError(f"recovery option alpha must be in [0, 1], got {self.alpha!r}")
        if self.temperature == 0:
            raise RecoveryError("recovery option temperature must be > 0")
        if self.lr is not None and not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise RecoveryError(f"recovery option lr must be > 0, got {self.lr!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise RecoveryError(f"recovery option max_grad_norm must be > 0 or None, got {self.max_grad_norm!r}")
        if self.resume and self.checkpoint_dir is None:
            raise RecoveryError("recovery option resume needs checkpoint_dir")
        if self.cache_teacher and self.cache_dir is None and self.checkpoint_dir is None:
            raise RecoveryError("recovery option cache_teacher needs cache_dir (or checkpoint_dir)")
        if self.cache_top_k is not None:
            if isinstance(self.cache_top_k, bool) or not isinstance(self.cache_top_k, int) or self.cache_top_k < 1:
                raise RecoveryError(f"recovery option cache_top_k must be an integer >= 1, got {self.cache_top_k!r}")
            if not self.cache_teacher:
                raise RecoveryError("recovery option cache_top_k needs cache_teacher")
        if self.layer_map is not None:
            object.__setattr__(self, "layer_map", tuple(int(i) for i in self.layer_map))
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))

    @property
    def learning_rate(self) -> float:
        """``lr``, or the mode's default."""
        if self.lr is not None:
            return float(self.lr)
        return 1e-3 if self.mode == "lora" else 1e-4


@dataclasses.dataclass(frozen=True)
class LossPoint:
    """One point of the loss curve: after ``step`` optimizer steps (0: before training).

    ``train_loss`` is the step's mean objective over its accumulated batches; ``eval_loss`` the held-out loss
    when the step was evaluated (the task loss when batches have labels or a ``loss_fn`` is given, else the
    distillation objective); ``perplexity`` is ``exp(eval_loss)`` when that is the model's own cross-entropy.
    """

    step: int
    train_loss: float | None
    eval_loss: float | None = None
    perplexity: float | None = None


@dataclasses.dataclass(frozen=True)
class RecoverRecord:
    """What a :class:`Recover` pass did.

    Attributes:
        mode: ``"full"`` or ``"lora"`` (with the backend, e.g. ``"lora/peft"``).
        objective: The loss as a formula, e.g. ``"0.5*kl(T=2) + 0.5*task"``.
        curve: Loss points in step order (evaluations are points with an ``eval_loss``).
        steps: Optimizer steps done in total (a resumed run counts those before the interruption too).
        seconds: Training time in seconds (also summed over resumed runs).
        stopped_early: Whether ``patience`` ended the run before ``steps``.
        best_step: The step whose weights were kept (the best held-out loss), or None without held-out data.
        resumed_from: The checkpoint step this run started from, or None.
        trained_params: Number of trained parameter elements (adapters only in LoRA mode).

    """

    mode: str
    objective: str
    curve: tuple[LossPoint, ...]
    steps: int
    seconds: float
    stopped_early: bool
    best_step: int | None
    resumed_from: int | None
    trained_params: int

    @property
    def evaluations(self) -> tuple[LossPoint, ...]:
        """The points with a held-out loss."""
        return tuple(p for p in self.curve if p.eval_loss is not None)

    def table(self) -> str:
        """The held-out evaluations as a text table."""
        lines = [f"{'step':>6} {'train loss':>11} {'held-out':>10} {'perplexity':>11}"]
        for p in self.evaluations:
            train = f"{p.train_loss:11.4f}" if p.train_loss is not None else f"{'-':>11}"
            ppl = f"{p.perplexity:11.4f}" if p.perplexity is not None else f"{'-':>11}"
            lines.append(f"{p.step:6d} {train} {p.eval_loss:10.4f} {ppl}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- masks


def _pruned_tensors(module: nn.Module) -> list[str]:
    """Names of the tensors of ``module`` reparametrized by ``torch.nn.utils.prune`` (``weight`` usually)."""
    return [h._tensor_name for h in module._forward_pre_hooks.values()
            if isinstance(h, torch_prune.BasePruningMethod) and h._tensor_name is not None]


def _is_layer(module: nn.Module) -> bool:
    if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
        return True
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _refresh_masked(model: nn.Module) -> None:
    """Recompute every masked tensor (``orig * mask``) so reads between forwards see the trained values."""
    with torch.no_grad():
        for mod in model.modules():
            for name in _pruned_tensors(mod):
                orig, mask = getattr(mod, name + "_orig"), getattr(mod, name + "_mask")
                setattr(mod, name, orig * mask.to(orig.dtype))


def _attach_zero_masks(model: nn.Module) -> list[nn.Module]:
    """Temporary masks on unmasked layers whose weights hold >= 1% exact zeros (not on tied weights)."""
    owners: dict[int, int] = {}
    for mod in model.modules():
        for p in mod.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    attached = []
    for mod in model.modules():
        w = mod._parameters.get("weight") if _is_layer(mod) else None
        if w is None or "weight" in _pruned_tensors(mod) or owners.get(id(w), 0) > 1:
            continue
        zeros = float((w.detach() == 0).float().mean())
        if zeros >= 0.01:
            torch_prune.custom_from_mask(mod, "weight", (w.detach() != 0).to(w.dtype))
            attached.append(mod)
    return attached


# ---------------------------------------------------------------------------------------------- LoRA


class _LoraDelta(nn.Module):
    """Parametrization ``W -> W + scale * B @ A`` (transposed for Hugging Face's ``Conv1D`` ``[in, out]``)."""

    def __init__(self, out_features: int, in_features: int, rank: int, scale: float, transposed: bool,
                 like: torch.Tensor) -> None:
        super().__init__()
        self.lora_a = nn.Parameter(torch.empty(rank, in_features, dtype=like.dtype, device=like.device))
        self.lora_b = nn.Parameter(torch.zeros(out_features, rank, dtype=like.dtype, device=like.device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # peft's initialisation: B = 0, so W is unchanged
        self.scale, self.transposed = scale, transposed

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        delta = self.scale * (self.lora_b @ self.lora_a)
        return w + (delta.t() if self.transposed else delta).to(w.dtype)


class LoraAdapters:
    """Low-rank adapters attached to a model by :func:`attach_lora`; :meth:`merge` folds them in."""

    def __init__(self, model: nn.Module, backend: str, layers: tuple[str, ...], handle: Any) -> None:
        self.model, self.backend, self.layers, self._handle = model, backend, layers, handle
        self.active = True

    def parameters(self) -> list[nn.Parameter]:
        """The adapter parameters, in a fixed order."""
        if self.backend == "peft":
            return [p for n, p in self.model.named_parameters() if ".lora_A." in n or ".lora_B." in n]
        return [p for delta in self._handle for p in (delta.lora_a, delta.lora_b)]

    def merge(self) -> None:
        """Fold the adapters into the base weights and remove them (masks stay attached and applied)."""
        self._finish(merge=True)

    def unload(self) -> None:
        """Remove the adapters without merging them."""
        self._finish(merge=False)

    def _finish(self, merge: bool) -> None:
        if not self.active:
            return
        self.active = False
        if self.backend == "peft":
            with torch.no_grad():
                self._handle.merge_and_unload() if merge else self._handle.unload()
            for attr in ("peft_config", "_hf_peft_config_loaded"):
                if attr in vars(self.model):
                    delattr(self.model, attr)
            return
        for name in self.layers:
            mod = self.model.get_submodule(name)
            tensor = "weight_orig" if "weight" in _pruned_tensors(mod) else "weight"
            with torch.no_grad():
                parametrize.remove_parametrizations(mod, tensor, leave_parametrized=merge)
        _refresh_masked(self.model)


def _default_lora_targets(model: nn.Module, ignore_outputs: bool = True) -> list[str]:
    head = None
    getter = getattr(model, "get_output_embeddings", None)
    if ignore_outputs and callable(getter):
        with contextlib.suppress(Exception):
            head = getter()
    return [n for n, m in model.named_modules() if (isinstance(m, nn.Linear) or
            (type(m).__name__ == "Conv1D" and hasattr(m, "nf"))) and m is not head]


def _select(names: list[str], patterns: Sequence[str]) -> list[str]:
    return [n for n in names if any(n == p or (p.endswith(".") and n.startswith(p)) for p in patterns)]


def attach_lora(model: nn.Module, targets: Sequence[str] | None = None, *, rank: int = 8, alpha: float = 16.0,
                backend: str = "auto") -> LoraAdapters:
    """Attach low-rank adapters to linear layers of ``model`` (in place) and return them.

    Args:
        model: The model.
        targets: Module names (or prefixes ending in ``.``); None: every linear layer except the output head.
        rank: Adapter rank.
        alpha: The update is ``alpha / rank * B @ A`` (``B`` starts at zero, so outputs do not change).
        backend: ``"peft"``, ``"native"`` (a ``torch.nn.utils.parametrize`` parametrization of the weight, or of
            ``weight_orig`` under a pruning mask so the update is masked too) or ``"auto"`` (peft when it is
            installed and no target is masked or a ``Conv1D``).

    Raises:
        RecoveryError: No target matched, a target is not a linear layer, the backend is unknown, or peft is
            asked for but missing or a target is masked (peft's update would bypass the mask).

    """
    if backend not in LORA_BACKENDS:
        raise RecoveryError(f"unknown LoRA backend {backend!r}; choose from {LORA_BACKENDS}")
    linear = _default_lora_targets(model, ignore_outputs=False)
    names = _default_lora_targets(model) if not targets else _select(linear, targets)
    if targets:
        stray = [t for t in targets if not _select(linear, [t])]
        if stray:
            raise RecoveryError(f"LoRA targets {stray} match no linear layer of the model")
    if not names:
        raise RecoveryError("the model has no linear layer for LoRA adapters")
    mods = {n: model.get_submodule(n) for n in names}
    masked = [n for n, m in mods.items() if "weight" in _pruned_tensors(m)]
    conv1d = [n for n, m in mods.items() if not isinstance(m, nn.Linear)]
    try:
        import peft  # noqa: F401
        have_peft = True
    except ImportError:
        have_peft = False
    if backend == "auto":
        backend = "peft" if have_peft and not masked and not conv1d else "native"
    if backend == "peft":
        if not have_peft:
            raise RecoveryError("LoRA backend 'peft' is not installed: pip install peft, or use backend 'native'")
        if masked or conv1d:
            raise RecoveryError(f"layer '{(masked or conv1d)[0]}' is masked or a Conv1D: peft's adapters would "
                                "bypass the mask; use LoRA backend 'native'")
        from peft import LoraConfig
        from peft.tuners.lora import LoraModel

        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(names),  # type: ignore[arg-type]
                            lora_dropout=0.0)
        handle = LoraModel(model, config, "default")
        return LoraAdapters(model, "peft", tuple(names), handle)
    deltas = []
    for n, mod in mods.items():
        tensor = "weight_orig" if n in masked else "weight"
        w = getattr(mod, tensor)
        transposed = not isinstance(mod, nn.Linear)
        out_f, in_f = (w.shape[1], w.shape[0]) if transposed else (w.shape[0], w.shape[1])
        delta = _LoraDelta(out_f, in_f, rank, alpha / rank, transposed, w.detach())
        parametrize.register_parametrization(mod, tensor, delta, unsafe=True)
        deltas.append(delta)
    _refresh_masked(model)
    return LoraAdapters(model, "native", tuple(names), deltas)


# ---------------------------------------------------------------------------------------------- layers


def layer_map_from_depth(records: Sequence[DepthRecord], layers: int) -> tuple[int, ...]:
    """The teacher layer of every kept student layer after block removal (in order).

    Args:
        records: The :class:`DepthRecord` of every ``RemoveBlocks`` run, in order (each names blocks in the
            numbering of its own time, like ``model.layers.3``).
        layers: The teacher's number of layers.

    Raises:
        RecoveryError: The records name blocks of more than one block list or outside ``layers``.

    """
    kept = list(range(layers))
    parents: set[str] = set()
    for rec in records:
        drop = set()
        for name, _ in rec.removed:
            parent, _, idx = name.rpartition(".")
            if not idx.isdigit():
                raise RecoveryError(f"removed block '{name}' has no layer index; give layer_map explicitly")
            parents.add(parent)
            drop.add(int(idx))
        if len(parents) > 1:
            raise RecoveryError(f"blocks were removed from several lists {sorted(parents)}; give layer_map")
        if any(i >= len(kept) for i in drop):
            raise RecoveryError(f"depth record removes {sorted(drop)} but only {len(kept)} layers are left")
        kept = [k for pos, k in enumerate(kept) if pos not in drop]
    return tuple(kept)


def _hidden_pairs(student: int, teacher: int, layer_map: Sequence[int] | None) -> list[tuple[int, int]]:
    """(student, teacher) indices into ``hidden_states`` (index 0 is the embedding output, not matched)."""
    if layer_map is not None:
        if len(layer_map) != student or any(not 0 <= t < teacher for t in layer_map):
            raise RecoveryError(f"layer_map {tuple(layer_map)} must give a teacher layer in [0, {teacher}) for each "
                                f"of the {student} student layers")
        return [(i + 1, t + 1) for i, t in enumerate(layer_map)]
    if student == teacher:
        return [(i, i) for i in range(1, student + 1)]
    return [(i, round(i * teacher / student)) for i in range(1, student + 1)]


# ---------------------------------------------------------------------------------------------- outputs


def _main(out: Any, kind: str) -> torch.Tensor:
    """The output distillation compares: logits for ``kl``, the last hidden state (else logits) for ``mse``."""
    names = ("logits",) if kind == "kl" else ("last_hidden_state", "logits")
    for name in names:
        t = getattr(out, name, None)
        if isinstance(t, torch.Tensor):
            return t
    if isinstance(out, torch.Tensor):
        return out
    leaves = [v for v in torch.utils._pytree.tree_leaves(out) if isinstance(v, torch.Tensor) and v.is_floating_point()]
    if not leaves:
        raise RecoveryError(f"the model's output ({type(out).__name__}) holds no floating-point tensor to distil")
    return leaves[0]


def _hidden(out: Any) -> tuple[torch.Tensor, ...]:
    hs = getattr(out, "hidden_states", None)
    if not isinstance(hs, (tuple, list)) or not hs:
        raise RecoveryError("hidden_weight needs hidden states: the model must return 'hidden_states' when "
                            "called with output_hidden_states=True")
    return tuple(hs)


def _token_mask(batch: Any, t: torch.Tensor) -> torch.Tensor | None:
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    if isinstance(mask, torch.Tensor) and t.dim() >= 3 and tuple(mask.shape) == tuple(t.shape[:2]):
        return mask.to(t.device, torch.float32)
    return None


def _kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float, mask: torch.Tensor | None) -> torch.Tensor:
    s = torch.log_softmax(student.float() / temperature, dim=-1)
    t = torch.log_softmax(teacher.float() / temperature, dim=-1)
    per = (t.exp() * (t - s)).sum(-1) * temperature**2
    if mask is None:
        return per.mean()
    return (per * mask).sum() / mask.sum().clamp_min(1)


def _kl_top_k(student: torch.Tensor, values: torch.Tensor, index: torch.Tensor, temperature: float,
              mask: torch.Tensor | None) -> torch.Tensor:
    """KL over the teacher's top-k tokens: the teacher renormalised on them, the student's full softmax read there."""
    s = torch.log_softmax(student.float() / temperature, dim=-1).gather(-1, index.long())
    t = torch.log_softmax(values.float() / temperature, dim=-1)
    per = (t.exp() * (t - s)).sum(-1) * temperature**2
    if mask is None:
        return per.mean()
    return (per * mask).sum() / mask.sum().clamp_min(1)


def _nmse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    s, t = student.float(), teacher.float()
    err, ref = (s - t).pow(2), t.pow(2)
    if mask is None:
        return err.mean() / ref.mean().clamp_min(1e-12)
    m = mask.reshape(*mask.shape, *([1] * (t.dim() - mask.dim())))
    return (err * m).sum() / (ref * m).sum().clamp_min(1e-12)


def _accepts_hidden(model: nn.Module) -> bool:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return True
    return "output_hidden_states" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _device(model: nn.Module, default: torch.device) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else default


def _to(value: Any, device: torch.device) -> Any:
    return torch.utils._pytree.tree_map(lambda v: v.to(device) if isinstance(v, torch.Tensor) else v, value)


def _indexed(data: Any) -> Sequence[Any]:
    """``data`` itself when it has a length and integer indexing (read lazily), else its items in a list."""
    iterable_only = isinstance(data, torch.utils.data.IterableDataset)  # has __getitem__, which raises
    if not iterable_only and not isinstance(data, (dict, str, bytes)) and hasattr(data, "__len__") and \
            hasattr(data, "__getitem__"):
        return data  # type: ignore[no-any-return]
    return list(data)


def _fingerprint(batches: Sequence[Any]) -> str:
    h = hashlib.sha256()
    for i in range(len(batches)):
        for leaf in torch.utils._pytree.tree_leaves(batches[i]):
            if isinstance(leaf, torch.Tensor):
                t = leaf.detach().cpu().contiguous()
                h.update(f"{t.dtype}{tuple(t.shape)}".encode())
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
            else:
                h.update(repr(leaf).encode())
    return h.hexdigest()


def _model_fingerprint(model: nn.Module) -> str:
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            h.update(f"{name}{tuple(p.shape)}{float(p.double().sum()):.10e}{float(p.double().abs().sum()):.10e}"
                     .encode())
    return h.hexdigest()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    # copies: safetensors refuses tensors that share storage, and the model keeps training meanwhile
    save_file({k: (v.detach().cpu() if v.is_cuda else v.detach().clone()).contiguous() for k, v in tensors.items()},
              str(tmp))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclasses.dataclass
class _Target:
    main: torch.Tensor
    hidden: dict[int, torch.Tensor]
    index: torch.Tensor | None = None  # token ids of ``main`` when it holds only the top-k logits


class _Teacher:
    """Teacher outputs per batch: computed live, or read from a safetensors cache built once."""

    def __init__(self, teacher: nn.Module | None, kind: str, hidden: list[int], device: torch.device,
                 autocast: Callable[[], Any], top_k: int | None = None) -> None:
        self.teacher, self.kind, self.hidden, self.device, self.autocast = teacher, kind, hidden, device, autocast
        self.top_k = top_k if kind == "kl" else None
        self.cache: Path | None = None
        self._open: dict[Path, Any] = {}

    def compute(self, batch: Any) -> _Target:
        if self.teacher is None:
            raise RecoveryError("the teacher is needed (no usable teacher cache); pass the dense model")
        args, kwargs = split_inputs(self.teacher, batch)
        kwargs.pop("labels", None)
        if self.hidden:
            kwargs["output_hidden_states"] = True
        where = _device(self.teacher, self.device)
        with torch.no_grad(), self.autocast():
            out = self.teacher(*_to(args, where), **_to(kwargs, where))
        hs = _hidden(out) if self.hidden else ()
        for i in self.hidden:
            if i >= len(hs):
                raise RecoveryError(f"teacher layer {i - 1} is out of range: the teacher returns {len(hs)} hidden states")
        return _Target(_main(out, self.kind).detach().to(self.device),
                       {i: hs[i].detach().to(self.device) for i in self.hidden})

    def get(self, split: str, index: int, batch: Any) -> _Target:
        if self.cache is None:
            return self.compute(batch)
        from safetensors import safe_open

        path = self.cache / f"{split}-{index // _SHARD:05d}.safetensors"
        handle = self._open.get(path)
        if handle is None:
            handle = self._open[path] = safe_open(str(path), framework="pt", device="cpu")
        main = handle.get_tensor(f"{index}.main").to(self.device)
        ids = handle.get_tensor(f"{index}.index").to(self.device) if self.top_k is not None else None
        return _Target(main, {i: handle.get_tensor(f"{index}.hidden.{i}").to(self.device) for i in self.hidden}, ids)

    def build_cache(self, folder: Path, splits: dict[str, Sequence[Any]], teacher_layers: int | None) -> None:
        """Reuse the cache in ``folder`` when it matches these batches and this teacher, else (re)build it."""
        folder.mkdir(parents=True, exist_ok=True)
        manifest = folder / "manifest.json"
        want = {"format": _FORMAT, "kind": self.kind, "hidden": self.hidden, "top_k": self.top_k,
                "batches": {s: [len(b), _fingerprint(b)] for s, b in splits.items()}}
        if self.teacher is not None:
            want["teacher"] = _model_fingerprint(self.teacher)
        try:
            have = json.loads(manifest.read_text())
        except (OSError, ValueError):
            have = None
        usable = have is not None and all(have.get(k) == v for k, v in want.items() if k != "teacher") and \
            (self.teacher is None or have.get("teacher") == want["teacher"])
        if not usable:
            if self.teacher is None:
                raise RecoveryError(f"teacher cache '{folder}' is missing or was built for other data; "
                                    "pass the teacher to build it")
            manifest.unlink(missing_ok=True)
            home = _device(self.teacher, self.device)
            self.teacher.to(self.device)
            try:
                for split, batches in splits.items():
                    for start in track(range(0, len(batches), _SHARD), f"teacher cache ({split})"):
                        shard: dict[str, torch.Tensor] = {}
                        for i in range(start, min(start + _SHARD, len(batches))):
                            target = self.compute(batches[i])
                            if self.top_k is not None and self.top_k < target.main.shape[-1]:
                                top = target.main.topk(self.top_k, dim=-1)
                                shard[f"{i}.main"] = top.values.contiguous()
                                shard[f"{i}.index"] = top.indices.to(torch.int32).contiguous()
                            elif self.top_k is not None:
                                shard[f"{i}.main"] = target.main
                                shard[f"{i}.index"] = torch.arange(target.main.shape[-1], dtype=torch.int32) \
                                    .expand_as(target.main).contiguous()
                            else:
                                shard[f"{i}.main"] = target.main
                            shard.update({f"{i}.hidden.{j}": t for j, t in target.hidden.items()})
                        _save_tensors(shard, folder / f"{split}-{start // _SHARD:05d}.safetensors")
            finally:
                self.teacher.to(home)
            _write_atomic(manifest, json.dumps({**want, "teacher_layers": teacher_layers}))
        self.cache = folder
        self.teacher = None  # the teacher is no longer needed


# ---------------------------------------------------------------------------------------------- the pass


@dataclasses.dataclass
class _State:
    step: int = 0
    curve: list[LossPoint] = dataclasses.field(default_factory=list)
    best_loss: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    seconds: float = 0.0
    stopped_early: bool = False
    best: dict[str, torch.Tensor] | None = None


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

        Raises:
            RecoveryError: The teacher's outputs do not match the student's (another vocabulary or head), there
                is nothing to optimise, or the teacher is missing where distillation needs it.
            CheckpointError: A checkpoint to resume from is unreadable or belongs to another model or mode.
            PassContractError: A parameter changed shape during training.

        """
        o = self.options
        model = graph.module
        if o.steps == 0:
            return PassResult(graph, False, RecoverRecord(o.mode, "", (), 0, 0.0, False, None, None, 0))
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


def _state_tensors(model: nn.Module, trainable: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """What training changes: the trained parameters and every floating-point buffer (norm statistics)."""
    out: dict[str, torch.Tensor] = dict(trainable)
    for name, buf in model.named_buffers():
        if buf.is_floating_point() and not name.endswith("_mask"):
            out[name] = buf
    return out


class _Checkpoints:
    """Resumable training state in ``folder``: ``step-NNNNNNNN/`` folders and a ``latest.json`` pointer."""

    def __init__(self, folder: Path, mode: str) -> None:
        self.folder, self.mode = folder, mode

    def save(self, model: nn.Module, trainable: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer,
             state: _State, seconds: float) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"model.{n}": t for n, t in _state_tensors(model, trainable).items()}
        names = list(trainable)
        opt_state = optimizer.state_dict()
        for idx, slots in opt_state["state"].items():
            for key, value in slots.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optim.{names[idx]}.{key}"] = value
        tensors["rng.cpu"] = torch.get_rng_state()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng.cuda.{i}"] = s
        if state.best is not None:
            tensors.update({f"best.{n}": t for n, t in state.best.items()})
        scalars = {
            "format": _FORMAT, "mode": self.mode, "step": state.step, "seconds": seconds,
            "best_loss": state.best_loss, "best_step": state.best_step, "bad_evals": state.bad_evals,
            "stopped_early": state.stopped_early, "trainable": {n: list(p.shape) for n, p in trainable.items()},
            "curve": [dataclasses.asdict(p) for p in state.curve],
            "optimizer_groups": [{k: v for k, v in g.items() if k != "params"} for g in opt_state["param_groups"]],
        }
        final = self.folder / f"step-{state.step:08d}"
        tmp = self.folder / f".step-{state.step:08d}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        _save_tensors(tensors, tmp / "state.safetensors")
        _write_atomic(tmp / "state.json", json.dumps(scalars, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _write_atomic(self.folder / "latest.json", json.dumps({"checkpoint": final.name, "step": state.step}))
        for old in self.folder.glob("step-*"):
            if old != final and re.fullmatch(r"step-\d{8}", old.name):
                shutil.rmtree(old, ignore_errors=True)

    def load(self, model: nn.Module, trainable: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer,
             state: _State, device: torch.device) -> int | None:
        """Restore the latest checkpoint into the model, optimizer and ``state``; its step, or None if none."""
        pointer = self.folder / "latest.json"
        if not pointer.exists():
            log.info("no recovery checkpoint in '%s'; starting from step 0", self.folder)
            return None
        try:
            folder = self.folder / json.loads(pointer.read_text())["checkpoint"]
            scalars = json.loads((folder / "state.json").read_text())
            from safetensors.torch import load_file

            tensors = load_file(str(folder / "state.safetensors"))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"cannot read recovery checkpoint in '{self.folder}': {exc}") from exc
        if scalars.get("format") != _FORMAT or scalars.get("mode") != self.mode:
            raise CheckpointError(f"recovery checkpoint '{folder}' was written in mode {scalars.get('mode')!r}, "
                                  f"this run is {self.mode!r}")
        want = {n: list(p.shape) for n, p in trainable.items()}
        if scalars.get("trainable") != want:
            diff = sorted(set(map(str, scalars.get("trainable", {}).items())) ^ set(map(str, want.items())))[:3]
            raise CheckpointError(f"recovery checkpoint '{folder}' belongs to another model: {diff}")
        with torch.no_grad():
            for name, current in _state_tensors(model, trainable).items():
                key = f"model.{name}"
                if key not in tensors or tuple(tensors[key].shape) != tuple(current.shape):
                    raise CheckpointError(f"recovery checkpoint '{folder}' lacks tensor '{name}' of shape "
                                          f"{tuple(current.shape)}")
                current.copy_(tensors[key])
        names = list(trainable)
        slots: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                name, _, slot = key[len("optim."):].rpartition(".")
                if name not in trainable:
                    raise CheckpointError(f"recovery checkpoint '{folder}' has optimizer state for unknown '{name}'")
                slots.setdefault(names.index(name), {})[slot] = value.to(device)
        groups = optimizer.state_dict()["param_groups"]
        for group, saved in zip(groups, scalars["optimizer_groups"], strict=False):
            group.update({k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})
        optimizer.load_state_dict({"state": slots, "param_groups": groups})
        torch.set_rng_state(tensors["rng.cpu"])
        cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda)
        best = {k[len("best."):]: v for k, v in tensors.items() if k.startswith("best.")}
        state.step, state.seconds = int(scalars["step"]), float(scalars["seconds"])
        state.best_loss, state.best_step = scalars["best_loss"], scalars["best_step"]
        state.bad_evals, state.stopped_early = int(scalars["bad_evals"]), bool(scalars["stopped_early"])
        state.curve = [LossPoint(**p) for p in scalars["curve"]]
        state.best = best or None
        return state.step
