"""What a recovery run is asked to do and what it did: :class:`RecoverOptions`, the loss curve, the record."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch

from secateurs.errors import RecoveryError

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
