"""MoE checkpoints whose experts are stored one by one, read and written block by block (``--stream``).

transformers keeps a Mixtral / Qwen2-MoE layer's experts fused (``mlp.experts.gate_up_proj``: one tensor for
all experts) and converts the per-expert layout (``experts.N.w1.weight``, what its ``save_pretrained`` writes and
published checkpoints use) while loading, with the conversion rules it registers per architecture.
:class:`PerExpertSource` applies those same rules to a :class:`~secateurs.backends.sharded.ShardedSource`: it
presents the fused names and converts a fused tensor from its per-expert parts when it is loaded, so a streamed
run reads one block's experts at a time. :func:`per_expert_state` is the reverse (transformers' own
``revert_weight_conversion``) for one block's state when writing.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
from torch import nn

from secateurs.backends.sharded import ShardedSource, TensorInfo
from secateurs.errors import CheckpointError

__all__ = ["PerExpertSource", "fused_state", "per_expert_state", "stores_experts_one_by_one"]


def stores_experts_one_by_one(names: Any) -> bool:
    """Whether tensor ``names`` hold experts one by one (``...experts.0.w1.weight``)."""
    return any(".experts.0." in n for n in names)


class _Group:
    """One conversion: the stored parts (name, pattern) and the fused tensors they make."""

    def __init__(self, converter: Any) -> None:
        self.converter = converter
        self.parts: list[tuple[str, str]] = []
        self.targets: dict[str, TensorInfo] = {}


def _grouping(model: nn.Module, names: Any) -> tuple[dict[str, _Group], dict[str, str]]:
    """The loading rules transformers registers for ``model``, applied to the stored ``names``.

    Returns the conversions (by their first fused name) and the model's name of every other stored tensor
    (renamings such as Mixtral's ``block_sparse_moe`` -> ``mlp``).
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

    conversions = get_model_conversion_mapping(model)  # type: ignore[arg-type]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    groups: dict[str, _Group] = {}
    plain: dict[str, str] = {}
    for name in sorted(names, key=dot_natural_key):
        target, pattern = rename_source_key(name, renamings, converters)
        if pattern is None:
            plain[target] = name
        else:
            groups.setdefault(target, _Group(copy.deepcopy(by_pattern[pattern]))).parts.append((name, pattern))
    return groups, plain


def _convert(model: nn.Module, first: str, group: _Group, parts: dict[str, torch.Tensor],
             where: str) -> dict[str, torch.Tensor]:
    converter = copy.deepcopy(group.converter)
    for name, pattern in group.parts:
        converter.add_tensor(first, name, pattern, parts[name])
    try:
        out = converter.convert(first, model=model, config=getattr(model, "config", None))
    except Exception as exc:  # the conversion ops raise what torch raises for shapes that do not fit
        raise CheckpointError(f"the per-expert tensors of '{first}' in '{where}' do not convert into the fused "
                              f"layout: {exc}") from exc
    return {k: (v[0] if isinstance(v, list) else v) for k, v in out.items()}


def fused_state(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """``state`` (per-expert names, any whole blocks) under ``model``'s fused names, as transformers loads it."""
    groups, plain = _grouping(model, state)
    out = {target: state[name] for target, name in plain.items()}
    for first, group in groups.items():
        out.update(_convert(model, first, group, {n: state[n] for n, _ in group.parts}, where))
    return out


class PerExpertSource(ShardedSource):
    """A checkpoint folder whose per-expert tensors appear under the model's fused names (converted on load)."""

    def __init__(self, folder: str | os.PathLike[str], model: nn.Module) -> None:
        """Index ``folder`` and group its per-expert tensors by the fused tensor of ``model`` they make.

        Raises:
            CheckpointError: No conversion rule of transformers covers the stored experts, or the parts do not
                convert (their shapes disagree).

        """
        super().__init__(folder)
        self.model = model
        self.stored = dict(self.tensors)
        groups, self.names = _grouping(model, self.stored)
        plain = {target: self.stored[name] for target, name in self.names.items()}
        if not groups or stores_experts_one_by_one(plain):
            left = next((n for n in plain if ".experts.0." in n), "")
            raise CheckpointError(f"the experts in '{self.folder}' are stored one by one, and transformers has no "
                                  f"conversion of {type(model).__name__} for them (e.g. '{left}')")
        self.groups: dict[str, _Group] = {}
        self.tensors = dict(plain)
        for first, group in groups.items():
            shapes = self._convert(first, group, meta=True)
            for target, tensor in shapes.items():
                group.targets[target] = TensorInfo(self.stored[group.parts[0][0]].file, tensor.dtype,
                                                   tuple(tensor.shape))
                self.groups[target] = group
                self.tensors[target] = group.targets[target]
        self._firsts = {id(g): f for f, g in groups.items()}

    def _convert(self, first: str, group: _Group, *, meta: bool) -> dict[str, torch.Tensor]:
        if meta:
            parts = {n: torch.empty(self.stored[n].shape, dtype=self.stored[n].dtype, device="meta")
                     for n, _ in group.parts}
        else:
            parts = self._read({n: self.stored[n] for n, _ in group.parts})
        return _convert(self.model, first, group, parts, str(self.folder))

    def load(self, names: Any) -> dict[str, torch.Tensor]:
        """Tensors ``names``; a fused one is converted from its stored parts (one group at a time)."""
        names = list(names)
        plain = [n for n in names if n not in self.groups]
        for n in plain:
            self.info(n)  # a name the checkpoint does not hold is an error, as in ShardedSource
        stored = self._read({self.names[n]: self.stored[self.names[n]] for n in plain})
        out = {n: stored[self.names[n]] for n in plain}
        done: set[int] = set()
        for name in names:
            group = self.groups.get(name)
            if group is None or id(group) in done:
                continue
            done.add(id(group))
            converted = self._convert(self._firsts[id(group)], group, meta=False)
            out.update({k: v for k, v in converted.items() if k in names})
        return out

    def _as_stored(self, name: str) -> None:
        if self.names.get(name, name) != name or name in self.groups:
            raise CheckpointError(f"'{name}' of '{self.folder}' is renamed or converted when loaded; it cannot be "
                                  "read in pieces")

    def rows(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        """Rows of a stored (not converted) 2-D tensor."""
        self._as_stored(name)
        return super().rows(name, ids)

    def chunks(self, name: str, max_bytes: int) -> Any:
        """A stored (not converted) tensor in slices."""
        self._as_stored(name)
        return super().chunks(name, max_bytes)


def per_expert_state(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` (fused names of ``model``, any subset) in the per-expert layout transformers writes.

    Raises:
        CheckpointError: ``model`` has no per-expert layout to write.

    """
    from transformers.core_model_loading import revert_weight_conversion

    reverted = revert_weight_conversion(model, state)  # type: ignore[arg-type]
    if any("experts" in k for k in state) and not stores_experts_one_by_one(reverted):
        raise CheckpointError(f"{type(model).__name__} has no per-expert key layout to write")
    return {k: v.detach().contiguous() for k, v in reverted.items()}
