"""Keep Hugging Face attention modules' size attributes in step with their (pruned) projections.

Hugging Face attention code reads head counts from module attributes at run time (``num_key_value_groups``
for ``repeat_kv``, GPT-2's ``split_size`` for splitting the fused ``c_attn`` output). After heads are
removed these attributes are recomputed from the projection shapes; the head dimension never changes.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from torch import nn

__all__ = ["HEAD_DIM_ATTRS", "UP_PROJECTIONS", "attention_sizes", "dense_head_dim", "sync_attention",
           "sync_module"]

HEAD_DIM_ATTRS = ("head_dim", "attention_head_size", "head_size", "attn_head_size")
_Q = ("q_proj", "query", "q_lin", "q", "query_proj")
_K = ("k_proj", "key", "k_lin", "k", "key_proj")
_HEAD_COUNT_ATTRS = ("num_heads", "num_attention_heads", "n_heads", "n_head")
_KV_COUNT_ATTRS = ("num_key_value_heads", "num_kv_heads")
_WIDTH_ATTRS = ("all_head_size", "attn_dim")  # heads x head_dim
_FUSED_QKV = (("qkv_proj", "o_proj"), ("qkv", "proj"), ("query_key_value", "dense"))  # (fused q/k/v projection, output projection)


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


def attention_sizes(module: nn.Module, head_dim: int | None = None) -> tuple[int, int | None, int] | None:
    """(query heads, KV heads or None, head_dim) of a recognisable attention block, from its projections.

    ``head_dim`` is used when the module keeps no head-size attribute (timm's Swin ``WindowAttention``).
    """
    head_dim = next((getattr(module, a) for a in HEAD_DIM_ATTRS if isinstance(getattr(module, a, None), int)),
                    head_dim)
    if not head_dim:
        return None
    q_out = _child(module, _Q)
    for fused_name, out_name in _FUSED_QKV:
        if q_out is None and fused_name in module._modules and out_name in module._modules:
            return _fused_qkv_sizes(module, head_dim, fused_name, out_name)
    fused = module._modules.get("c_attn")
    if q_out is None and fused is not None and not getattr(module, "is_cross_attention", False):
        total = _out_features(fused)
        if total is None or total % 3:
            return None
        q_out = total // 3
    if q_out is None or q_out % head_dim:
        return None
    k_out = _child(module, _K)
    kv = k_out // head_dim if k_out and k_out % head_dim == 0 else None
    return q_out // head_dim, kv, head_dim


def dense_head_dim(module: nn.Module, dense_in: Callable[[nn.Module], int | None]) -> int | None:
    """The head size of a fused-projection block without a head-size attribute, from its dense sizes.

    ``dense_in(linear)`` is a linear's input width before the rewrite; ``num_heads`` has not been re-synced yet.
    """
    heads = getattr(module, "num_heads", None)
    if not isinstance(heads, int) or heads <= 0 or any(isinstance(getattr(module, a, None), int)
                                                      for a in HEAD_DIM_ATTRS):
        return None
    for fused_name, out_name in _FUSED_QKV:
        out = module._modules.get(out_name)
        if fused_name in module._modules and isinstance(out, nn.Linear):
            width = dense_in(out)
            return width // heads if width is not None and width % heads == 0 else None
    return None


def _fused_qkv_sizes(module: nn.Module, head_dim: int, fused: str,
                     out_name: str) -> tuple[int, int | None, int] | None:
    """Head counts of a fused ``[q; k; v]`` projection (Phi-3's ``qkv_proj``, timm's ``qkv``).

    The query heads come from the output projection's input, the KV heads from the rest of the rows.
    """
    qkv, out = module._modules.get(fused), module._modules.get(out_name)
    total = _out_features(qkv) if qkv is not None else None
    o_in = int(out.in_features) if isinstance(out, nn.Linear) else None
    if total is None or o_in is None or o_in % head_dim or (total - o_in) % (2 * head_dim):
        return None
    return o_in // head_dim, (total - o_in) // (2 * head_dim), head_dim


def sync_attention(module: nn.Module, set_attr: Callable[[nn.Module, str, Any], None],
                   head_dim: int | None = None) -> None:
    """Recompute head-count attributes of an attention ``module`` from its projections.

    ``set_attr(module, name, value)`` performs (and records) each change; ``head_dim`` stands in for a missing
    head-size attribute. Modules that are not recognisable attention blocks are left alone.
    """
    sizes = attention_sizes(module, head_dim)
    if sizes is None:
        return
    heads, kv_heads, head_dim = sizes
    if "c_attn" in module._modules and _child(module, _Q) is None and hasattr(module, "split_size"):
        set_attr(module, "split_size", heads * head_dim)
    for name in _HEAD_COUNT_ATTRS:
        if isinstance(getattr(module, name, None), int):
            set_attr(module, name, heads)
    for name in _WIDTH_ATTRS:
        if isinstance(getattr(module, name, None), int):
            set_attr(module, name, heads * head_dim)
    if kv_heads:
        for name in _KV_COUNT_ATTRS:
            if isinstance(getattr(module, name, None), int):
                set_attr(module, name, kv_heads)
        if isinstance(getattr(module, "num_key_value_groups", None), int) and heads % kv_heads == 0:
            set_attr(module, "num_key_value_groups", heads // kv_heads)
    config = getattr(module, "config", None)
    counts = {"num_attention_heads": heads, "num_key_value_heads": kv_heads}
    if config is not None and any(isinstance(getattr(config, k, None), int) and v and getattr(config, k) != v
                                  for k, v in counts.items()):
        # code that reads the head counts from the config (Phi-3 slices its fused qkv at
        # config.num_attention_heads x head_dim) gets a config of its own with this layer's counts
        own = copy.copy(config)
        for k, v in counts.items():
            if v and isinstance(getattr(config, k, None), int):
                setattr(own, k, v)
        set_attr(module, "config", own)


UP_PROJECTIONS = ("up_proj", "gate_proj", "fc1", "c_fc", "w1", "dense_h_to_4h")


def sync_module(module: nn.Module, set_attr: Callable[[nn.Module, str, Any], None],
                head_dim: int | None = None) -> None:
    """Re-sync an attention block's head counts, an MLP block's ``intermediate_size`` and fused experts' width."""
    sync_attention(module, set_attr, head_dim)
    weight = module._parameters.get("weight")
    if weight is not None and weight.dim() == 2 and isinstance(getattr(module, "hidden_dim", None), int) and \
            hasattr(module, "top_k"):  # an MoE router [experts, hidden] that reshapes its input to hidden_dim
        set_attr(module, "hidden_dim", int(weight.shape[1]))
        return
    down = module._parameters.get("down_proj")
    if down is not None and down.dim() == 3:  # fused experts [E, out, in] (or [E, in, out] when is_transposed)
        transposed = bool(getattr(module, "is_transposed", False))
        inner, hidden = (int(down.shape[1]), int(down.shape[2])) if transposed else (int(down.shape[2]),
                                                                                   int(down.shape[1]))
        for attr in ("intermediate_dim", "intermediate_size", "moe_intermediate_size"):
            if isinstance(getattr(module, attr, None), int):
                set_attr(module, attr, inner)
        if isinstance(getattr(module, "hidden_dim", None), int):
            set_attr(module, "hidden_dim", hidden)
        return
    if isinstance(getattr(module, "intermediate_size", None), int):
        width = _child(module, UP_PROJECTIONS)
        if width is None and "in_proj" in module._modules:  # Mamba's mixer: in_proj -> (x, z), out_proj
            out = module._modules.get("out_proj")
            width = int(out.in_features) if isinstance(out, nn.Linear) else None
        if width is not None:
            set_attr(module, "intermediate_size", width)
