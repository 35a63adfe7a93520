"""A zoo of real architectures: each prunes at 30%, still runs, loses parameters; frozen parts asserted."""

import pytest
import torch

import secateurs as sc

from helpers import call, dead_importance, first_tensor, make_dead
from zoo import ZOO, build

# Reasons (substrings) that must appear among the frozen groups, and reasons allowed beyond the boundaries.
EXPECT = {
    "bert": ({"graph output", "head_dim", "embedding rows"}, set()),
    "distilbert": ({"graph output", "head_dim", "embedding rows"}, set()),
    "roberta": ({"graph output", "head_dim", "embedding rows"}, set()),
    "gpt2": ({"hidden size", "head_dim"}, set()),  # split_size is re-synced after head pruning
    "llama": ({"hidden size", "head_dim", "graph output"}, set()),
    "qwen2": ({"hidden size", "head_dim", "graph output"}, set()),
    "mistral": ({"hidden size", "head_dim", "graph output"}, set()),
    "vit": ({"hidden size", "head_dim", "graph output"}, {"tensor factory"}),
    "swin": ({"hidden size", "head_dim", "indexed by tensor indices"}, set()),
    "resnet": ({"graph input", "graph output"}, set()),
    "convnext": ({"hidden size", "graph output"}, set()),
    "mobilenet_v2": ({"graph input", "graph output"}, set()),
}
BOUNDARY = ("graph input", "graph output", "head_dim", "embedding rows", "hidden size", "indexed by tensor indices")


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_prunes_at_30_percent(name):
    model, inputs = build(name)
    ref = first_tensor(call(model, inputs))
    report = sc.prune(model, inputs, ratio=0.3)
    out = first_tensor(call(model, inputs))
    assert out.shape == ref.shape
    assert torch.isfinite(out).all()
    assert report.params_after < report.params_before
    assert report.flops_after < report.flops_before
    assert report.unsupported_ops == []
    reasons = [f.reason for f in report.frozen]
    must, allowed = EXPECT[name]
    for needle in must:
        assert any(needle in r for r in reasons), (needle, reasons)
    for r in reasons:
        assert any(b in r for b in BOUNDARY) or any(a in r for a in allowed), r
    sc.capture(model, inputs)  # the rewritten model exports again


@pytest.mark.parametrize("name", ["bert", "llama", "vit", "resnet", "mobilenet_v2", "gpt2", "swin"])
def test_zoo_dead_channels_prune_exactly(name):
    model, inputs = build(name)
    dead, _ = make_dead(model, inputs, 0.3)
    ref = first_tensor(call(model, inputs))
    report = sc.prune(model, inputs, ratio=0.3, importance=dead_importance(dead), round_to=1, min_keep=0.0)
    torch.testing.assert_close(first_tensor(call(model, inputs)), ref, atol=1e-5, rtol=1e-4)
    assert report.params_after < report.params_before


def test_llama_gqa_keeps_groups_equal_and_prunes_kv_groups():
    model, inputs = build("llama")
    sc.prune(model, inputs, ratio=0.5, round_to=1)
    for layer in model.model.layers:
        attn = layer.self_attn
        kv = attn.k_proj.out_features // attn.head_dim
        q = attn.q_proj.out_features // attn.head_dim
        assert attn.v_proj.out_features == attn.k_proj.out_features
        assert q % kv == 0 and q < 8
        assert attn.o_proj.in_features == attn.q_proj.out_features
    assert first_tensor(call(model, inputs)).shape == (2, 12, 120)
