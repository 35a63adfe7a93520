"""Keep Hugging Face attention modules' size attributes in step with their (pruned) projections.

Hugging Face attention code reads head counts from module attributes at run time (``num_key_value_groups``
for ``repeat_kv``, GPT-2's ``split_size`` for splitting the fused ``c_attn`` output). After heads are
removed these attributes are recomputed from the projection shapes; the head dimension never changes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

__all__ = ["HEAD_DIM_ATTRS", "sync_attention"]

HEAD_DIM_ATTRS = ("head_dim", "attention_head_size", "head_size", "attn_head_size")
_Q = ("q_proj", "query", "q_lin", "q")
_K = ("k_proj", "key", "k_lin", "k")
_HEAD_COUNT_ATTRS = ("num_heads", "num_attention_heads", "n_heads", "n_head")


def _out_features(module: Any) -> int | None:
    if isinstance(module, nn.Linear):
        return int(module.out_features)
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return int(module.nf)
    return None


def _child(module: nn.Module, names: tuple[str, ...]) -> int | None:
    for name in names:
        sub = module._modules.get(name)
        if sub is not None:
            out = _out_features(sub)
            if out is not None:
                return out
    return None


def sync_attention(module: nn.Module, set_attr: Callable[[nn.Module, str, Any], None]) -> None:
    """Recompute head-count attributes of an attention ``module`` from its projections.

    ``set_attr(module, name, value)`` performs (and records) each change. Modules that are not recognisable
    attention blocks are left alone.
    """
    head_dim = next((getattr(module, a) for a in HEAD_DIM_ATTRS if isinstance(getattr(module, a, None), int)), None)
    if not head_dim:
        return
    q_out = _child(module, _Q)
    fused = module._modules.get("c_attn")
    if q_out is None and fused is not None and not getattr(module, "is_cross_attention", False):
        total = _out_features(fused)
        if total is None or total % 3:
            return
        q_out = total // 3
        if hasattr(module, "split_size"):
            set_attr(module, "split_size", q_out)
    if q_out is None or q_out % head_dim:
        return
    heads = q_out // head_dim
    for name in _HEAD_COUNT_ATTRS:
        if isinstance(getattr(module, name, None), int):
            set_attr(module, name, heads)
    if isinstance(getattr(module, "all_head_size", None), int):
        set_attr(module, "all_head_size", q_out)
    k_out = _child(module, _K)
    if k_out is not None and k_out % head_dim == 0 and k_out:
        kv_heads = k_out // head_dim
        if isinstance(getattr(module, "num_key_value_heads", None), int):
            set_attr(module, "num_key_value_heads", kv_heads)
        if isinstance(getattr(module, "num_key_value_groups", None), int) and heads % kv_heads == 0:
            set_attr(module, "num_key_value_groups", heads // kv_heads)
