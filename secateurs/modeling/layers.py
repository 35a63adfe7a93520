"""The modules pruning puts into a model and checkpoints store: a removed sublayer's stand-in and factorised linears.

They live below the passes that create them, so checkpoint code can rebuild them without importing any pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ArmorLinear", "LowRankLinear", "PrunedMultiheadAttention", "ZeroSublayer", "hidden_input",
           "sync_multihead"]


def hidden_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    """A module call's hidden states: the ``hidden_states`` keyword, else the first tensor argument."""
    hidden = kwargs.get("hidden_states")
    if isinstance(hidden, torch.Tensor):
        return hidden
    return next(a for a in args if isinstance(a, torch.Tensor))


class ZeroSublayer(nn.Module):
    """Stands in for a removed sublayer: returns zeros shaped like its input (and ``None`` extras).

    Args:
        extras: How many extra outputs the replaced module returned after the hidden states (Hugging Face
            attention returns ``(hidden, weights)``); 0 means it returned a bare tensor.

    """

    def __init__(self, extras: int = 0) -> None:
        super().__init__()
        self.extras = extras

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Zeros like the first tensor argument (``hidden_states``)."""
        out = torch.zeros_like(hidden_input(args, kwargs))
        return (out, *([None] * self.extras)) if self.extras else out

    def extra_repr(self) -> str:
        """Show the output arity."""
        return f"extras={self.extras}"


class LowRankLinear(nn.Module):
    """``up(down(x))``: a rank-``r`` stand-in for an ``nn.Linear`` (``in_features`` / ``out_features`` kept)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the two factors."""
        return self.up(self.down(x))


class ArmorLinear(nn.Module):
    """``A (S (B x)) + bias`` with block-diagonal ``A`` ``[out, out]``, ``B`` ``[in, in]`` and N:M ``S``."""

    def __init__(self, a_blocks: torch.Tensor, s: torch.Tensor, b_blocks: torch.Tensor,
                 bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = int(s.shape[1]), int(s.shape[0])
        self.a_blocks = nn.Parameter(a_blocks)
        self.sparse = nn.Parameter(s)
        self.b_blocks = nn.Parameter(b_blocks)
        self.bias = nn.Parameter(bias) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply ``B``, the sparse core, then ``A``."""
        nb, bs, _ = self.b_blocks.shape
        h = torch.einsum("...nj,nij->...ni", x.reshape(*x.shape[:-1], nb, bs), self.b_blocks).reshape(x.shape)
        h = torch.nn.functional.linear(h, self.sparse)
        na, ba, _ = self.a_blocks.shape
        out = torch.einsum("...nj,nij->...ni", h.reshape(*h.shape[:-1], na, ba), self.a_blocks).reshape(h.shape)
        return out + self.bias if self.bias is not None else out


class PrunedMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose heads were pruned: ``num_heads * head_dim`` is not ``embed_dim`` any more.

    torch's forward derives ``head_dim`` as ``embed_dim // num_heads`` and unflattens the packed projection at
    ``embed_dim``, so it cannot run a pruned module. This forward computes the same function (masks, dropout,
    ``bias_k`` / ``add_zero_attn``, attention weights) from the module's ``num_heads`` and ``head_dim``. The
    parameters keep their names: a state dict loads into it as into the original, at the pruned shapes.
    A 3-d ``attn_mask`` holds one mask per remaining head (``batch * num_heads``), as for torch's module.
    ``_qkv_same_embed_dim`` is False on a pruned module, which keeps torch's fused encoder fast paths (they assume
    one width for q, k, v and the output) away from it.
    """

    def forward(  # type: ignore[override]
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention over the remaining heads; the same signature and outputs as ``nn.MultiheadAttention``.

        The steps and their order are torch's (so a re-capture lines up with the dense model's graph op by op);
        only the sizes come from ``num_heads`` / ``head_dim``.
        """
        batched = query.dim() == 3
        if self.batch_first and batched:  # keep query / key / value identity: it selects the packed projection
            same_kv, same_qk = key is value, query is key
            query = query.transpose(1, 0)
            key = query if same_kv and same_qk else key.transpose(1, 0)
            value = key if same_kv else value.transpose(1, 0)
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        tgt_len, bsz, _ = query.shape
        heads, head_dim = self.num_heads, self.head_dim
        key_padding_mask = F._canonical_mask(
            mask=key_padding_mask, mask_name="key_padding_mask", other_type=F._none_or_dtype(attn_mask),
            other_name="attn_mask", target_type=query.dtype)
        if is_causal and attn_mask is None:
            raise RuntimeError("is_causal needs attn_mask (as for nn.MultiheadAttention)")
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None
        else:
            attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                          target_type=query.dtype, check_other=False)
            if key_padding_mask is not None:
                is_causal = False
        q, k, v = self._project(query, key, value)
        if attn_mask is not None and attn_mask.dim() == 2:
            attn_mask = attn_mask.unsqueeze(0)
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.repeat(1, bsz, 1)])
            v = torch.cat([v, self.bias_v.repeat(1, bsz, 1)])
            attn_mask = F.pad(attn_mask, (0, 1)) if attn_mask is not None else None
            key_padding_mask = F.pad(key_padding_mask, (0, 1)) if key_padding_mask is not None else None
        q = q.view(tgt_len, bsz * heads, head_dim).transpose(0, 1)
        k = k.view(k.shape[0], bsz * heads, head_dim).transpose(0, 1)
        v = v.view(v.shape[0], bsz * heads, head_dim).transpose(0, 1)
        if self.add_zero_attn:
            zeros = (bsz * heads, 1, head_dim)
            k = torch.cat([k, torch.zeros(zeros, dtype=k.dtype, device=k.device)], dim=1)
            v = torch.cat([v, torch.zeros(zeros, dtype=v.dtype, device=v.device)], dim=1)
            attn_mask = F.pad(attn_mask, (0, 1)) if attn_mask is not None else None
            key_padding_mask = F.pad(key_padding_mask, (0, 1)) if key_padding_mask is not None else None
        src_len = k.size(1)
        if key_padding_mask is not None:
            padding = key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, heads, -1, -1).reshape(
                bsz * heads, 1, src_len)
            attn_mask = padding if attn_mask is None else attn_mask + padding
        dropout_p = self.dropout if self.training else 0.0
        attn_weights: torch.Tensor | None = None
        if need_weights:
            scaled = q * math.sqrt(1.0 / float(head_dim))
            scores = torch.baddbmm(attn_mask, scaled, k.transpose(-2, -1)) if attn_mask is not None else \
                torch.bmm(scaled, k.transpose(-2, -1))
            weights = F.softmax(scores, dim=-1)
            if dropout_p > 0.0:
                weights = F.dropout(weights, p=dropout_p)
            out = torch.bmm(weights, v).transpose(0, 1).reshape(tgt_len * bsz, heads * head_dim)
            out = F.linear(out, self.out_proj.weight, self.out_proj.bias).view(tgt_len, bsz, -1)
            weights = weights.view(bsz, heads, tgt_len, src_len)
            attn_weights = weights.mean(dim=1) if average_attn_weights else weights
        else:
            if attn_mask is not None:
                attn_mask = attn_mask.unsqueeze(0) if attn_mask.size(0) == 1 and attn_mask.dim() == 3 else \
                    attn_mask.view(bsz, heads, -1, src_len)
            out = F.scaled_dot_product_attention(
                q.view(bsz, heads, tgt_len, head_dim), k.view(bsz, heads, src_len, head_dim),
                v.view(bsz, heads, src_len, head_dim), attn_mask, dropout_p, is_causal)
            out = out.permute(2, 0, 1, 3).reshape(bsz * tgt_len, heads * head_dim)
            out = F.linear(out, self.out_proj.weight, self.out_proj.bias).view(tgt_len, bsz, -1)
        if not batched:
            return out.squeeze(1), attn_weights.squeeze(0) if attn_weights is not None else None
        return (out.transpose(1, 0) if self.batch_first else out), attn_weights

    def _project(self, query: torch.Tensor, key: torch.Tensor,
                 value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Query, key and value projections, packed as torch packs them (one matmul for self-attention)."""
        inner = self.num_heads * self.head_dim
        w, b = self.in_proj_weight, self.in_proj_bias
        if w is None:  # separate q / k / v projections (kdim / vdim given)
            b_q, b_k, b_v = b.chunk(3) if b is not None else (None, None, None)
            return (F.linear(query, self.q_proj_weight, b_q), F.linear(key, self.k_proj_weight, b_k),
                    F.linear(value, self.v_proj_weight, b_v))
        if key is value and query is key:
            proj = F.linear(query, w, b).unflatten(-1, (3, inner)).unsqueeze(0).transpose(0, -2)
            proj = proj.squeeze(-2).contiguous()
            return proj[0], proj[1], proj[2]
        if key is value:
            w_q, w_kv = w.split([inner, 2 * inner])
            b_q, b_kv = b.split([inner, 2 * inner]) if b is not None else (None, None)
            q = F.linear(query, w_q, b_q)
            kv = F.linear(key, w_kv, b_kv).unflatten(-1, (2, inner)).unsqueeze(0).transpose(0, -2)
            kv = kv.squeeze(-2).contiguous()
            return q, kv[0], kv[1]
        w_q, w_k, w_v = w.chunk(3)
        b_q, b_k, b_v = b.chunk(3) if b is not None else (None, None, None)
        return F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)


def sync_multihead(module: nn.MultiheadAttention, set_attr: Callable[[nn.Module, str, Any], None]) -> None:
    """Make ``module``'s sizes agree with its (sliced) weights; a pruned one runs :class:`PrunedMultiheadAttention`.

    ``head_dim`` never changes: the head count follows the projection rows, ``embed_dim`` the output projection,
    ``kdim`` / ``vdim`` the key and value projections' inputs.
    """
    packed = module.in_proj_weight is not None
    rows = module.in_proj_weight.shape[0] // 3 if packed else module.q_proj_weight.shape[0]
    set_attr(module, "num_heads", int(rows // module.head_dim))
    embed = int(module.out_proj.weight.shape[0])
    set_attr(module, "embed_dim", embed)
    set_attr(module, "kdim", embed if packed else int(module.k_proj_weight.shape[1]))
    set_attr(module, "vdim", embed if packed else int(module.v_proj_weight.shape[1]))
    pruned = rows != embed or (packed and module.in_proj_weight.shape[1] != embed)
    if type(module) in (nn.MultiheadAttention, PrunedMultiheadAttention):
        set_attr(module, "__class__", PrunedMultiheadAttention if pruned else nn.MultiheadAttention)
        # torch's fused fast paths (nn.TransformerEncoderLayer in eval under no_grad) assume one embed_dim for
        # q, k, v and the output; they check this flag, so a pruned module takes the regular path
        set_attr(module, "_qkv_same_embed_dim", packed and not pruned)
