"""Small hand-written modules used across tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    """Linear(16, width) -> ReLU -> Linear(width, 4): one FFN group of ``width`` channels."""

    def __init__(self, width: int = 64):
        super().__init__()
        self.a, self.b = nn.Linear(16, width), nn.Linear(width, 4)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.conv2(F.relu(self.bn1(self.conv1(x))))


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 1)
        self.gconv = nn.Conv2d(16, 24, 3, padding=1, groups=4)
        self.dw = nn.Conv2d(24, 24, 3, padding=1, groups=24)
        self.out = nn.Conv2d(24, 5, 1)

    def forward(self, x):
        return self.out(F.relu(self.dw(F.relu(self.gconv(F.relu(self.conv1(x)))))))


class FlattenHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 4 * 4, 7)

    def forward(self, x):
        return self.fc(F.relu(self.conv(x)).flatten(1))


class CatSplit(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 1)
        self.b = nn.Conv2d(3, 10, 1)
        self.mix = nn.Conv2d(16, 12, 1)
        self.left = nn.Conv2d(5, 3, 1)
        self.right = nn.Conv2d(7, 3, 1)

    def forward(self, x):
        y = self.mix(torch.cat([self.a(x), self.b(x)], 1))
        left, right = torch.split(y, [5, 7], dim=1)
        return self.left(left) + self.right(right)


class Attention(nn.Module):
    """Multi-head / grouped-query self-attention written the Llama way (view with -1, sdpa with GQA)."""

    def __init__(self, dim=24, heads=6, kv_heads=2, head_dim=5):
        super().__init__()
        self.head_dim = head_dim
        self.q = nn.Linear(dim, heads * head_dim)
        self.k = nn.Linear(dim, kv_heads * head_dim)
        self.v = nn.Linear(dim, kv_heads * head_dim)
        self.o = nn.Linear(heads * head_dim, dim)
        self.up = nn.Linear(dim, 40)
        self.gate = nn.Linear(dim, 40)
        self.down = nn.Linear(40, dim)

    def forward(self, x):
        b, s, _ = x.shape
        q = self.q(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, s, -1))
        return x + self.down(F.silu(self.gate(x)) * self.up(x))


class HardCodedView(nn.Module):
    """Reshapes with a literal channel count: pruning conv1 must be refused by verification."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 1)
        self.conv2 = nn.Conv2d(16, 16, 1)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        y = self.conv2(F.relu(self.conv1(x)))
        y = y.reshape(x.shape[0], 16, -1).mean(-1)  # literal 16
        return self.fc(y)


class UNetish(nn.Module):
    """GroupNorm (whole groups prune exactly), strided conv, transposed conv, skip concatenation."""

    def __init__(self):
        super().__init__()
        self.inc = nn.Conv2d(3, 8, 3, padding=1)
        self.gn = nn.GroupNorm(4, 8)
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(16, 6, 2, stride=2)
        self.outc = nn.Conv2d(14, 4, 1)

    def forward(self, x):
        skip = F.relu(self.gn(self.inc(x)))
        y = F.relu(self.up(F.relu(self.down(skip))))
        return self.outc(torch.cat([skip, y], 1))


class Seq1d(nn.Module):
    """Embedding, Conv1d over the sequence, residual and LayerNorm over the (frozen) model width."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 12)
        self.c1 = nn.Conv1d(12, 10, 3, padding=1)
        self.c2 = nn.Conv1d(10, 12, 3, padding=1)
        self.norm = nn.LayerNorm(12)
        self.head = nn.Linear(12, 5)

    def forward(self, ids):
        h = self.emb(ids)
        y = self.c2(F.gelu(self.c1(h.transpose(1, 2)))).transpose(1, 2)
        return self.head(self.norm(h + y))


class FusedQKV(nn.Module):
    """One linear makes q, k and v; heads come from chunk or from a (3, heads, head_dim) reshape."""

    def __init__(self, dim=24, heads=4, head_dim=6, style="chunk"):
        super().__init__()
        self.heads, self.head_dim, self.style = heads, head_dim, style
        self.qkv = nn.Linear(dim, 3 * heads * head_dim)
        self.proj = nn.Linear(heads * head_dim, dim)
        self.out = nn.Linear(dim, 3)

    def forward(self, x):
        b, n, _ = x.shape
        if self.style == "chunk":
            q, k, v = (t.view(b, n, -1, self.head_dim).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        else:  # timm ViT
            q, k, v = self.qkv(x).reshape(b, n, 3, -1, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v)
        return self.out(x + self.proj(a.transpose(1, 2).reshape(b, n, -1)))


class FusedQKVTimm(FusedQKV):
    def __init__(self):
        super().__init__(style="timm")


class MHA(nn.Module):
    """A ViT-style block around ``nn.MultiheadAttention``: self-attention (one packed projection) or, with
    ``cross``, attention over a memory computed from the input (the key/value half of the packed weight)."""

    def __init__(self, dim=24, heads=4, batch_first=True, cross=False):
        super().__init__()
        self.cross, self.batch_first = cross, batch_first
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=batch_first)
        self.mem = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.out = nn.Linear(dim, 3)

    def forward(self, x):
        if not self.batch_first:
            x = x.transpose(0, 1)
        kv = self.mem(x) if self.cross else x
        x = x + self.attn(x, kv, kv, need_weights=False)[0]
        x = x + self.mlp(x)
        return self.out(x if self.batch_first else x.transpose(0, 1))


class MHACross(MHA):
    def __init__(self):
        super().__init__(batch_first=False, cross=True)


class TimmAttention(nn.Module):
    """timm's ``Attention``: sizes read from ``num_heads`` / ``head_dim`` / ``attn_dim`` at run time."""

    def __init__(self, dim=24, heads=4, head_dim=6):
        super().__init__()
        self.num_heads, self.head_dim, self.attn_dim = heads, head_dim, heads * head_dim
        self.qkv = nn.Linear(dim, 3 * self.attn_dim)
        self.proj = nn.Linear(self.attn_dim, dim)
        self.out = nn.Linear(dim, 3)

    def forward(self, x):
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, self.attn_dim)
        return self.out(x + self.proj(a))


class WindowAttention(nn.Module):
    """timm's Swin ``WindowAttention``: a per-head relative position bias table, no head-size attribute, the
    manual ``softmax(q k^T * scale + bias) v`` path."""

    def __init__(self, dim=24, heads=4, window=3):
        super().__init__()
        self.num_heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.randn((2 * window - 1) ** 2, heads))
        coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + window - 1
        self.register_buffer("relative_position_index", rel[..., 0] * (2 * window - 1) + rel[..., 1],
                             persistent=False)
        self.out = nn.Linear(dim, 3)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        attn = (q * self.scale) @ k.transpose(-2, -1) + bias.permute(2, 0, 1).unsqueeze(0)
        a = (attn.softmax(-1) @ v).transpose(1, 2).reshape(b, n, -1)
        return self.out(x + self.proj(a))


class LiteralHeads(nn.Module):
    """Attention whose code hard-codes its head count (``view(b, n, 4, -1)``): its heads cannot be pruned."""

    def __init__(self, dim=24):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.up, self.down = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, 4, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        x = x + self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1))
        return x + self.down(F.gelu(self.up(x)))


class LiteralHeadsStack(nn.Module):
    def __init__(self, depth=4):
        super().__init__()
        self.blocks = nn.Sequential(*(LiteralHeads() for _ in range(depth)))
        self.out = nn.Linear(24, 3)

    def forward(self, x):
        return self.out(self.blocks(x))


class InterleavedGLU(nn.Module):
    """GPT-OSS's fused experts layout: gate and up neurons interleaved in one projection (``y[..., ::2]``,
    ``y[..., 1::2]``)."""

    def __init__(self, dim=24, hidden=16):
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * hidden)
        self.down = nn.Linear(hidden, dim)
        self.out = nn.Linear(dim, 3)

    def forward(self, x):
        y = self.gate_up(x)
        return self.out(x + self.down(F.silu(y[..., ::2]) * y[..., 1::2]))


class PositionOps(nn.Module):
    """Ops that reorder, select or accumulate positions (top-k, cumsum, flip, a lower triangle over a position x
    position map): positions are frozen, the channels between ``a`` and ``b`` pass through them."""

    def __init__(self, dim=6, hidden=8):
        super().__init__()
        self.a = nn.Linear(dim, hidden)
        self.b = nn.Linear(hidden, 4)

    def forward(self, x):
        h = self.a(x)  # [B, P, C]
        c = h.transpose(1, 2)  # [B, C, P]
        tri = torch.tril(c.unsqueeze(-1) * c.unsqueeze(-2)).sum((-1, -2))  # [B, C, P, P] -> [B, C]
        top = h.topk(3, dim=1).values.sum(1)
        return self.b(top + h.cumsum(1).sum(1) + h.flip(1)[:, 0] + tri)


class IndexOps(nn.Module):
    """Lookups along positions (index_select, gather, select, unbind, narrow, a slice), a BatchNorm1d over the
    channels and a linear layer on a matrix (ONNX's Gemm): positions are frozen, the channels between ``a`` and
    ``b`` pass through them."""

    def __init__(self, dim=6, hidden=8):
        super().__init__()
        self.a = nn.Linear(dim, hidden)
        self.norm = nn.BatchNorm1d(hidden)
        self.mid = nn.Linear(hidden, hidden)
        self.b = nn.Linear(hidden, 4)
        self.register_buffer("order", torch.tensor([2, 0, 1]))
        self.register_buffer("pick", torch.tensor([[[2], [0], [3]]]).repeat(1, 1, hidden))  # [1, 3, C]

    def forward(self, x):
        h = self.norm(self.a(x).transpose(1, 2)).transpose(1, 2)  # [B, P, C]
        y = h.index_select(1, self.order).sum(1) + torch.gather(h, 1, self.pick).sum(1) + h.select(1, 0)
        y = y + sum(h.unbind(1)) + h.narrow(1, 1, 2).sum(1) + h[:, 3:].sum(1)
        return self.b(self.mid(y))  # y is [B, C]: a Gemm in ONNX


class ShapeIndexGather(nn.Module):
    """A gather whose index is built from the input's sizes (``expand(B, 3, C)`` of a constant): in ONNX that
    index is a constant of the analysis with a literal C, so the channels of ``a`` are frozen and reported."""

    def __init__(self, dim=6, hidden=8):
        super().__init__()
        self.a = nn.Linear(dim, hidden)
        self.b = nn.Linear(hidden, 4)
        self.register_buffer("order", torch.tensor([2, 0, 1]))

    def forward(self, x):
        h = self.a(x)  # [B, P, C]
        idx = self.order.view(1, 3, 1).expand(h.shape[0], 3, h.shape[2])
        return self.b(torch.gather(h, 1, idx).sum(1))


class ScanState(nn.Module):
    """Mamba's slow path in small: a recurrent state allocated at ``self.intermediate_size`` (a factory literal
    the rewrite re-syncs), and a cache the export leaves behind unused."""

    def __init__(self, dim=24, inner=32):
        super().__init__()
        self.intermediate_size = inner
        self.in_proj = nn.Linear(dim, inner)
        self.out_proj = nn.Linear(inner, dim)
        self.out = nn.Linear(dim, 3)

    def forward(self, x):
        u = self.in_proj(x)
        x.new_zeros((x.shape[0], self.intermediate_size))  # unused (a cache)
        state = torch.zeros(x.shape[0], self.intermediate_size)
        for t in range(x.shape[1]):
            state = 0.5 * state + u[:, t]
        return self.out(self.out_proj(state))
