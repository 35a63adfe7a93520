"""The modules pruning puts into a model and checkpoints store: a removed sublayer's stand-in and factorised linears.

They live below the passes that create them, so checkpoint code can rebuild them without importing any pass.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["ArmorLinear", "LowRankLinear", "ZeroSublayer", "hidden_input"]


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
