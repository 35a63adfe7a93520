"""Physically shrink an ``nn.Module`` according to per-group keep masks.

Weights, biases, norm statistics and other buffers are sliced; module attributes (``in_features``,
``out_channels``, ``groups``, ``num_features``, ``normalized_shape``, ...) are updated from the new shapes.
Every change is recorded in a :class:`Snapshot` so it can be rolled back bit-exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from secateurs.ir.depgraph import DependencyInfo
from secateurs.ir.graph import Graph
from secateurs.modeling.hf_attributes import dense_head_dim, sync_module
from secateurs.modeling.layers import sync_multihead

__all__ = ["Snapshot", "apply_keep", "check_module_attributes", "compensate_biases", "slice_dims"]

log = logging.getLogger(__name__)

_MISSING = object()


ROLLBACK_MEMORY = int(os.environ.get("SECATEURS_ROLLBACK_MEMORY", str(2 << 30)))
"""Bytes of old tensor values a :class:`Snapshot` keeps in memory; beyond it they are written to a temporary
folder (``SECATEURS_ROLLBACK_MEMORY`` sets it; 0 writes every copy to disk)."""

_MODULE_STATE = ("_parameters", "_buffers", "_modules", "_forward_pre_hooks", "_forward_hooks")


@dataclasses.dataclass
class _Spilled:
    """An old tensor value written to disk by a :class:`Snapshot` (read back with ``weights_only``)."""

    path: str


@dataclasses.dataclass
class Snapshot:
    """Old values of everything a transform replaced or edited, newest last, so it can be rolled back exactly.

    Three kinds of record: a replaced parameter / buffer / attribute (:meth:`record`: the old object is kept, no
    copy), a module's whole state before a structural edit (:meth:`record_module`: its parameter, buffer,
    submodule and hook tables and instance attributes, shallow), and the values of a tensor about to be edited
    in place (:meth:`record_values`: a copy, kept in memory up to :data:`ROLLBACK_MEMORY` bytes in all and in
    a temporary folder beyond; when the folder has no room, a warning says the edit cannot be undone and the
    rollback check names the tensor). :meth:`discard` frees the copies once the change is kept.
    """

    entries: list[tuple[Any, str, str, Any]] = dataclasses.field(default_factory=list)
    edited: set[int] = dataclasses.field(default_factory=set)
    held: int = 0
    short: bool = False
    _folder: str | None = dataclasses.field(default=None, repr=False)

    def record(self, owner: Any, kind: str, name: str, old: Any) -> None:
        """Remember ``owner``'s ``name`` (``kind`` is ``param``, ``buffer`` or ``attr``) before a change."""
        self.entries.append((owner, kind, name, old))

    def record_module(self, module: nn.Module) -> None:
        """Remember ``module``'s tables and instance attributes before a structural edit.

        A submodule replaced, a weight reparametrised by ``torch.nn.utils.prune``: tensors in them are kept, not
        copied.
        """
        state = {key: dict(getattr(module, key)) for key in _MODULE_STATE}
        self.entries.append((module, "module", "", (state, dict(module.__dict__))))

    def record_values(self, tensor: torch.Tensor) -> None:
        """Copy ``tensor``'s values before it is edited in place (once per tensor and snapshot)."""
        if id(tensor) in self.edited:
            return
        old = tensor.detach()
        size = old.numel() * old.element_size()
        if self.held + size <= ROLLBACK_MEMORY:
            self.held += size
            saved: Any = old.clone()
        else:
            path = ""
            try:
                if self._folder is None:
                    self._folder = tempfile.mkdtemp(prefix="secateurs-rollback-")
                path = os.path.join(self._folder, f"{len(self.entries)}.pt")
                torch.save(old.cpu().contiguous(), path)
            except OSError as exc:  # no room for the copy: the edit goes on, and a rollback will say it cannot undo it
                if path:
                    with contextlib.suppress(OSError):
                        os.remove(path)
                if not self.short:
                    log.warning("no room to keep a rollback copy (%s); if this pass fails, its in-place edits cannot be "
                                "undone (set SECATEURS_ROLLBACK_MEMORY or TMPDIR)", exc)
                self.short = True
                return
            saved = _Spilled(path)
        self.edited.add(id(tensor))
        self.entries.append((tensor, "values", "", saved))

    def restore(self) -> None:
        """Put every recorded value back, in reverse order, then free the copies."""
        for owner, kind, name, old in reversed(self.entries):
            if kind == "param":
                owner._parameters[name] = old
            elif kind == "buffer":
                owner._buffers[name] = old
            elif kind == "values":
                value = torch.load(old.path, weights_only=True) if isinstance(old, _Spilled) else old
                with torch.no_grad():
                    owner.copy_(value)
            elif kind == "module":
                state, attrs = old
                for key in [k for k in owner.__dict__ if k not in attrs]:
                    del owner.__dict__[key]
                owner.__dict__.update(attrs)
                for key, table in state.items():
                    getattr(owner, key).clear()
                    getattr(owner, key).update(table)
            elif old is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, old)
        self.discard()

    def discard(self) -> None:
        """Forget every record (the change is kept) and delete copies written to disk."""
        self.entries.clear()
        self.edited.clear()
        self.held = 0
        self.short = False
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None


def _owner(model: nn.Module, fqn: str) -> tuple[nn.Module, str]:
    path, _, leaf = fqn.rpartition(".")
    return (model.get_submodule(path) if path else model), leaf


def _set_attr(snap: Snapshot, module: nn.Module, name: str, value: Any) -> None:
    old = getattr(module, name, _MISSING)
    if old is not _MISSING and old == value:
        return
    snap.record(module, "attr", name, old)
    setattr(module, name, value)


def compensate_biases(
    graph: Graph,
    info: DependencyInfo,
    keep: dict[int, np.ndarray],
    means: dict[tuple[str, int], np.ndarray],
    snap: Snapshot,
) -> tuple[int, int]:
    """Fold the mean contribution of removed input channels into each consumer's bias (FLAP).

    For a consumer ``y = W x + b`` losing input channels R, ``b += W[:, R] @ mean(x_R)``, so the output
    keeps its expected value. Conv weights are summed over the kernel (exact away from padded borders).
    Consumers without a bias are skipped (adding one would change the checkpoint layout).

    Args:
        graph: The captured graph.
        info: Its dependency analysis.
        keep: Group id -> keep mask (before slicing).
        means: (weight placeholder, weight dim) -> mean input per channel, from calibration.
        snap: Records the old biases, so the rollback restores them.

    Returns:
        (consumers compensated, consumers that lost inputs but have no bias).

    """
    model = graph.module
    state = {**graph.params, **graph.buffers}
    done = skipped = 0
    with torch.no_grad():
        for use in info.consumers:
            key = (use.weight_node, use.weight_dim)
            fqn = state.get(use.weight_node)
            if fqn is None or key not in means:
                continue
            mask = info.table.keep_mask(info.values[(use.weight_node, -1)][use.weight_dim], keep)
            removed = np.flatnonzero(~mask)
            if removed.size == 0:
                continue
            owner, _ = _owner(model, fqn)
            bias = getattr(owner, "bias", None)
            if not isinstance(bias, nn.Parameter):
                skipped += 1
                continue
            # [out, ..., in] (Hugging Face's Conv1D stores [in, out]: moving its dim 0 last does the same).
            w = model.get_parameter(fqn).detach().double().movedim(use.weight_dim, -1)
            w = w.reshape(w.shape[0], -1, w.shape[-1]).sum(1) if w.dim() > 2 else w
            idx = torch.from_numpy(removed)
            delta = w[:, idx] @ torch.from_numpy(means[key][removed]).to(w.dtype)
            if delta.shape != bias.shape:
                skipped += 1
                continue
            snap.record(owner, "param", "bias", bias)
            owner._parameters["bias"] = nn.Parameter((bias.detach().double() + delta).to(bias.dtype),
                                                     requires_grad=bias.requires_grad)
            done += 1
    return done, skipped


def apply_keep(
    graph: Graph, info: DependencyInfo, keep: dict[int, np.ndarray], snap: Snapshot | None = None
) -> Snapshot:
    """Slice every parameter and buffer of ``graph.module`` to the channels kept by ``keep``.

    Args:
        graph: The captured graph the analysis ran on.
        info: The dependency analysis of ``graph``.
        keep: Group id -> boolean mask of kept channels. Groups not listed keep everything.
        snap: An existing snapshot to extend (e.g. after bias compensation), or None.

    Returns:
        A snapshot that :meth:`Snapshot.restore` rolls back.

    """
    model = graph.module
    snap = snap if snap is not None else Snapshot()
    aliases: dict[int, list[str]] = {}
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(
        model.named_buffers(remove_duplicate=False)
    ):
        aliases.setdefault(id(t), []).append(name)
    touched: set[nn.Module] = set()
    done: set[str] = set()
    state = {**graph.params, **graph.buffers}
    with torch.no_grad():
        for placeholder, fqn in state.items():
            atoms = info.values.get((placeholder, -1))
            if not atoms or fqn in done:
                continue
            masks = [info.table.keep_mask(a, keep) for a in atoms]
            if all(m.all() for m in masks):
                continue
            owner, leaf = _owner(model, fqn)
            old = owner._parameters.get(leaf) if leaf in owner._parameters else owner._buffers.get(leaf)
            if old is None:
                continue
            new = old.detach()
            for d, m in enumerate(masks):
                if not m.all():
                    new = new.index_select(d, torch.from_numpy(np.flatnonzero(m)).to(new.device))
            names = aliases.get(id(old), [fqn])
            done.update(names)
            touched.update(_replace_tensor(model, names, old, new, snap))
        memo: dict[int, int] = {}
        kept = {g: int(m.sum()) for g, m in keep.items()}
        for placeholder, attr, atom in info.module_attrs:
            weight_name = state.get(placeholder)
            if weight_name is None:
                continue
            mod, _ = _owner(model, weight_name)
            _set_attr(snap, mod, attr, info.table.sized(atom, kept, memo))
            touched.add(mod)
        _follow_tensors(model, touched, snap)
    return snap


def slice_dims(
    model: nn.Module,
    cuts: Sequence[tuple[str, int, np.ndarray]],
    attrs: Sequence[tuple[str, str, int]] = (),
    snap: Snapshot | None = None,
) -> Snapshot:
    """Keep the flat indices ``idx`` of dim ``dim`` of every named tensor ``(name, dim, idx)`` of ``model``.

    The piecewise form of :func:`apply_keep`, for a model whose tensors are not all in memory at once (streamed
    blocks): the plan comes from an analysis of the whole model, the cuts are applied to the part present.
    Tied aliases of a tensor are replaced together; ``attrs`` ``(module, attribute, value)`` are set, known
    modules' size attributes follow their tensors and Hugging Face attention attributes are re-synced.

    Raises:
        KeyError: A named tensor or module does not exist.

    """
    snap = snap if snap is not None else Snapshot()
    aliases: dict[int, list[str]] = {}
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(
            model.named_buffers(remove_duplicate=False)):
        aliases.setdefault(id(t), []).append(name)
    touched: set[nn.Module] = set()
    with torch.no_grad():
        for fqn, dim, idx in cuts:
            owner, leaf = _owner(model, fqn)
            old = owner._parameters[leaf] if leaf in owner._parameters else owner._buffers[leaf]
            if old is None:
                raise KeyError(fqn)
            new = old.detach().index_select(dim, torch.from_numpy(np.asarray(idx, dtype=np.int64)).to(old.device))
            touched.update(_replace_tensor(model, aliases.get(id(old), [fqn]), old, new, snap))
        for module_name, attr, value in attrs:
            mod = model.get_submodule(module_name)
            _set_attr(snap, mod, attr, value)
            touched.add(mod)
        _follow_tensors(model, touched, snap)
    return snap


def _follow_tensors(model: nn.Module, touched: set[nn.Module], snap: Snapshot) -> None:
    """Size attributes of the touched modules follow their tensors; their parents' HF attributes are re-synced."""
    for mod in touched:
        _update_attributes(snap, mod)
    parents = {name.rpartition(".")[0] for name, mod in model.named_modules() if mod in touched}
    # fused experts and MoE routers hold their tensors themselves: their size attributes follow them too
    parents |= {name for name, mod in model.named_modules() if mod in touched and (getattr(
        mod._parameters.get("down_proj"), "ndim", 0) == 3 or isinstance(getattr(mod, "hidden_dim", None), int))}
    dense = {id(owner): old for owner, kind, name, old in snap.entries if kind == "param" and name == "weight"}

    def dense_in(linear: nn.Module) -> int | None:
        weight = dense.get(id(linear), linear._parameters.get("weight"))
        return int(weight.shape[1]) if isinstance(weight, torch.Tensor) and weight.dim() == 2 else None

    for name in sorted(parents):
        block = model.get_submodule(name)
        sync_module(block, lambda m, a, v: _set_attr(snap, m, a, v), dense_head_dim(block, dense_in))


def _replace_tensor(model: nn.Module, names: list[str], old: torch.Tensor, new: torch.Tensor,
                    snap: Snapshot) -> list[nn.Module]:
    """Put ``new`` (a parameter if ``old`` was one) under every name of ``old``; the modules touched."""
    new = new.contiguous()
    replacement: torch.Tensor = nn.Parameter(new, requires_grad=old.requires_grad) \
        if isinstance(old, nn.Parameter) else new
    owners = []
    for alias in names:
        mod, name = _owner(model, alias)
        kind = "param" if name in mod._parameters else "buffer"
        snap.record(mod, kind, name, getattr(mod, name))
        if kind == "param":
            mod._parameters[name] = replacement  # type: ignore[assignment]
        else:
            mod._buffers[name] = replacement
        owners.append(mod)
    return owners


def _update_attributes(snap: Snapshot, mod: nn.Module) -> None:
    """Make a known module's size attributes agree with its (sliced) tensors."""
    w = getattr(mod, "weight", None)
    if isinstance(mod, nn.Linear):
        _set_attr(snap, mod, "in_features", mod.weight.shape[1])
        _set_attr(snap, mod, "out_features", mod.weight.shape[0])
    elif isinstance(mod, nn.modules.conv._ConvNd):
        g = mod.groups
        if mod.transposed:
            _set_attr(snap, mod, "in_channels", mod.weight.shape[0])
            _set_attr(snap, mod, "out_channels", mod.weight.shape[1] * g)
        else:
            _set_attr(snap, mod, "out_channels", mod.weight.shape[0])
            _set_attr(snap, mod, "in_channels", mod.weight.shape[1] * g)
    elif isinstance(mod, (nn.modules.batchnorm._NormBase,)):
        ref = w if isinstance(w, torch.Tensor) else getattr(mod, "running_mean", None)
        if isinstance(ref, torch.Tensor):
            _set_attr(snap, mod, "num_features", ref.shape[0])
    elif isinstance(mod, (nn.LayerNorm, nn.RMSNorm)):
        if isinstance(w, torch.Tensor):
            _set_attr(snap, mod, "normalized_shape", tuple(w.shape))
    elif isinstance(mod, nn.GroupNorm):
        if isinstance(w, torch.Tensor):
            _set_attr(snap, mod, "num_channels", w.shape[0])
    elif isinstance(mod, nn.Embedding):
        _follow_embed_scale(snap, mod)
        _set_attr(snap, mod, "num_embeddings", mod.weight.shape[0])
        _set_attr(snap, mod, "embedding_dim", mod.weight.shape[1])
    elif isinstance(mod, nn.PReLU):
        _set_attr(snap, mod, "num_parameters", mod.weight.shape[0])
    elif isinstance(mod, nn.MultiheadAttention):
        sync_multihead(mod, lambda m, a, v: _set_attr(snap, m, a, v))
    elif type(mod).__name__ == "Conv1D" and hasattr(mod, "nf") and isinstance(w, torch.Tensor):
        # Hugging Face's GPT-2 Conv1D stores weight as [in, out].
        _set_attr(snap, mod, "nf", w.shape[1])
        if hasattr(mod, "nx"):
            _set_attr(snap, mod, "nx", w.shape[0])


def _follow_embed_scale(snap: Snapshot, mod: nn.Module) -> None:
    """A scaled embedding's ``sqrt(hidden_size)`` (Gemma) follows a pruned width, as every loader rebuilds it.

    Loaders compute the scale from the config's ``hidden_size``; keeping the dense one would make the model that
    was verified differ from every reload of the checkpoint.
    """
    old_dim = getattr(mod, "embedding_dim", None)
    new_scale = embed_scale_for(mod, old_dim)
    if new_scale is None:
        return
    snap.record(mod, "buffer", "embed_scale", mod._buffers["embed_scale"])
    set_embed_scale(mod, new_scale, lambda m, a, v: _set_attr(snap, m, a, v))


def embed_scale_for(mod: nn.Module, old_dim: Any) -> float | None:
    """The ``sqrt(width)`` scale a scaled embedding needs at its present width, or None when nothing changes.

    ``old_dim`` is the width its scale was computed for; a scale that is not ``sqrt(old_dim)`` is not this
    convention and is left alone (the masked check and drift judge it).
    """
    weight, scale = getattr(mod, "weight", None), getattr(mod, "scalar_embed_scale", None)
    buf = mod._buffers.get("embed_scale")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not isinstance(old_dim, int) \
            or not isinstance(scale, float) or not isinstance(buf, torch.Tensor) or buf.numel() != 1:
        return None
    new_dim = int(weight.shape[1])
    if old_dim == new_dim or not math.isclose(scale, float(old_dim) ** 0.5, rel_tol=1e-6):
        return None
    return float(new_dim) ** 0.5


def set_embed_scale(mod: nn.Module, scale: float, set_attr: Callable[[nn.Module, str, Any], None]) -> None:
    """Give a scaled embedding the scale ``scale`` (its buffer and its float copy)."""
    buf = mod._buffers["embed_scale"]
    assert buf is not None
    mod._buffers["embed_scale"] = torch.tensor(scale, dtype=buf.dtype, device=buf.device)
    set_attr(mod, "scalar_embed_scale", scale)


def check_module_attributes(model: nn.Module) -> list[str]:
    """Return one message per known module whose size attributes disagree with its tensors."""
    problems: list[str] = []
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        checks: list[tuple[str, Any, Any]] = []
        if isinstance(mod, nn.Linear):
            checks = [("in_features", mod.in_features, mod.weight.shape[1]),
                      ("out_features", mod.out_features, mod.weight.shape[0])]
        elif isinstance(mod, nn.modules.conv._ConvNd) and not mod.transposed:
            checks = [("out_channels", mod.out_channels, mod.weight.shape[0]),
                      ("in_channels", mod.in_channels, mod.weight.shape[1] * mod.groups)]
        elif isinstance(mod, nn.modules.batchnorm._NormBase) and isinstance(w, torch.Tensor):
            checks = [("num_features", mod.num_features, w.shape[0])]
        elif isinstance(mod, nn.LayerNorm) and isinstance(w, torch.Tensor):
            checks = [("normalized_shape", tuple(mod.normalized_shape), tuple(w.shape))]
        elif isinstance(mod, nn.GroupNorm) and isinstance(w, torch.Tensor):
            checks = [("num_channels", mod.num_channels, w.shape[0])]
        elif isinstance(mod, nn.Embedding):
            checks = [("embedding_dim", mod.embedding_dim, mod.weight.shape[1])]
        for attr, have, want in checks:
            if have != want:
                problems.append(f"module '{name}' ({type(mod).__name__}): {attr}={have} but tensors say {want}")
    return problems
