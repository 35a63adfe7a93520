"""Low-rank adapters for recovery: peft's or a built-in parametrization that keeps sparsity masks exact."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils import prune as torch_prune

from secateurs.errors import RecoveryError
from secateurs.passes.training.options import LORA_BACKENDS


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
