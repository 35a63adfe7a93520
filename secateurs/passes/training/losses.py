"""The recovery losses: temperature-softened KL (full or over the teacher's top k), normalised MSE, hidden-state pairs."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from secateurs.errors import RecoveryError
from secateurs.passes.depth import DepthRecord


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
