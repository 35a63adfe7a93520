"""``nn.MultiheadAttention`` loses heads through its packed ``in_proj_weight`` (torchvision's ViT, nn.Transformer)."""

import itertools
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import secateurs as sc
from secateurs.backends.onnx import export_onnx
from secateurs.ir.depgraph import analyze
from secateurs.modeling.layers import PrunedMultiheadAttention
from secateurs.modeling.rewrite import apply_keep

import models

# batch_first, bias, add_bias_kv, add_zero_attn, separate kdim / vdim, self-attention, attn_mask,
# key_padding_mask, need_weights, average_attn_weights, unbatched
CONFIGS = [c for c in itertools.product(*[[False, True]] * 11) if not (c[4] and c[5])]


@pytest.mark.parametrize("chunk", range(4))
def test_the_pruned_forward_computes_torch_s_function_at_the_dense_sizes(chunk):
    torch.manual_seed(chunk)
    for bf, bias, bias_kv, zero, separate, self_attn, mask, padding, weights, average, unbatched in CONFIGS[chunk::4]:
        kdim = 20 if separate else None
        dense = nn.MultiheadAttention(24, 4, bias=bias, add_bias_kv=bias_kv, add_zero_attn=zero, kdim=kdim,
                                      vdim=kdim, batch_first=bf).eval()
        pruned = nn.MultiheadAttention(24, 4, bias=bias, add_bias_kv=bias_kv, add_zero_attn=zero, kdim=kdim,
                                       vdim=kdim, batch_first=bf).eval()
        pruned.load_state_dict(dense.state_dict())
        pruned.__class__ = PrunedMultiheadAttention

        def tensor(length, dim):
            return torch.randn(length, dim) if unbatched else torch.randn(3, length, dim) if bf else \
                torch.randn(length, 3, dim)

        q = tensor(5, 24)
        k = v = q if self_attn else tensor(7, kdim or 24)
        if not self_attn and not separate and bias:  # the key-is-value half of the packed projection
            v = k
        elif not self_attn:
            v = tensor(7, kdim or 24)
        src = 5 if self_attn else 7
        kw = dict(need_weights=weights, average_attn_weights=average,
                  attn_mask=torch.randn(5, src) if mask else None,
                  key_padding_mask=(torch.arange(src) >= src - 2).expand(*(() if unbatched else (3,)), src)
                  if padding else None)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's deprecation note on mixing bool and float masks
            want, got = dense(q, k, v, **kw), pruned(q, k, v, **kw)
        torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
        assert (got[1] is None) == (want[1] is None) == (not weights)
        if weights:
            torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_loses_heads_and_exports_to_onnx(batch_first, tmp_path):
    torch.manual_seed(0)
    model = models.MHA(dim=32, heads=8, batch_first=batch_first).eval()
    x = (torch.randn(2, 6, 32),)
    ref = model(*x)
    report = sc.prune(model, x, heads=0.5, round_to=1)
    attn = model.attn
    assert type(attn) is PrunedMultiheadAttention and attn.num_heads == 4 and attn.head_dim == 4
    assert attn.in_proj_weight.shape == (48, 32) and attn.out_proj.weight.shape == (32, 16)
    assert attn.embed_dim == 32 and report.retries == 0
    assert [c.kind for c in report.changes] == ["heads"] and report.changes[0].after == 4
    assert model(*x).shape == ref.shape
    result = export_onnx(model, x, tmp_path / "mha.onnx")
    assert result.max_abs_error < 1e-4


def test_per_head_attention_weights_returned_by_the_model_freeze_the_heads():
    class Weights(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 4, batch_first=True)

        def forward(self, x):
            return self.attn(x, x, x, need_weights=True, average_attn_weights=False)

    model = Weights().eval()
    x = (torch.randn(2, 5, 16),)
    with pytest.raises(sc.errors.BudgetError, match="heads=0.5 .* selects no group"):
        sc.prune(model, x, heads=0.5, round_to=1)
    info = analyze(sc.capture(model, x))
    assert any(f.size == 4 and "graph output #1" in f.reason and "attn.out_proj.weight[1]" in f.members
               for f in info.frozen)
    assert type(model.attn) is nn.MultiheadAttention and model.attn.num_heads == 4


def test_a_rolled_back_rewrite_restores_the_torch_class_and_sizes():
    model = models.MHA(dim=24, heads=4).eval()
    x = (torch.randn(2, 5, 24),)
    graph = sc.capture(model, x)
    info = analyze(graph)
    heads = next(g for g in info.iter_groups() if g.kind == "heads")
    snap = apply_keep(graph, info, {heads.id: np.array([True, False, True, False])})
    assert type(model.attn) is PrunedMultiheadAttention and model.attn.num_heads == 2
    snap.restore()
    assert type(model.attn) is nn.MultiheadAttention and model.attn.num_heads == 4
    assert model.attn.in_proj_weight.shape == (72, 24)


def test_a_per_head_bias_table_loses_the_columns_of_the_removed_heads():
    torch.manual_seed(0)
    model = models.WindowAttention(dim=32, heads=8).eval()
    x = (torch.randn(2, 9, 32),)
    table = model.relative_position_bias_table.detach().clone()
    report = sc.prune(model, x, heads=0.5, round_to=1)
    assert report.retries == 0 and model.num_heads == 4
    assert model.qkv.weight.shape == (48, 32) and model.relative_position_bias_table.shape == (25, 4)
    kept = [h for h in range(8) if any(torch.equal(model.relative_position_bias_table[:, j], table[:, h])
                                       for j in range(4))]
    assert len(kept) == 4
    # the head size is frozen on the manual path too (a product of two activations), with its reason
    assert any("attention head_dim" in f.reason and "qkv.weight[0]" in " ".join(f.members) for f in report.frozen)


def test_a_pruned_transformer_encoder_keeps_off_torch_s_fused_fast_path():
    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0)
            self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.out = nn.Linear(32, 3)

        def forward(self, x):
            return self.out(self.enc(x))

    torch.manual_seed(0)
    model = Encoder().eval()
    x = torch.randn(2, 6, 32)
    report = sc.prune(model, (x,), heads=0.5, round_to=1)
    assert [c.after for c in report.changes if c.kind == "heads"] == [2, 2]
    assert all(type(layer.self_attn) is PrunedMultiheadAttention for layer in model.enc.layers)
    slow = model(x)  # autograd on: torch's regular path
    with torch.no_grad():  # eval + no_grad: where torch would take its fused path
        torch.testing.assert_close(model(x), slow, atol=1e-5, rtol=1e-5)
