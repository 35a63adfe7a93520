"""PruneChannels: ratio-0 identity, exactness on dead channels, targets, scopes, rounding, refusal."""

import copy

import numpy as np
import pytest
import torch

import secateurs as sc
from secateurs.errors import BudgetError, VerificationError
from secateurs.ir import analyze
from secateurs.passes import AnalyzeDependencies, ChannelOptions, PassManager, PruneChannels, ScoreChannels

import models
from helpers import call, dead_importance, first_tensor, make_dead

CASES = [
    ("ConvBN", (2, 3, 6, 6)),
    ("Grouped", (2, 3, 6, 6)),
    ("FlattenHead", (2, 3, 4, 4)),
    ("CatSplit", (2, 3, 5, 5)),
    ("Attention", (2, 7, 24)),
    ("UNetish", (2, 3, 8, 8)),
    ("FusedQKV", (2, 5, 24)),
    ("FusedQKVTimm", (2, 5, 24)),
    ("MHA", (2, 5, 24)),
    ("MHACross", (2, 5, 24)),
    ("TimmAttention", (2, 5, 24)),
    ("WindowAttention", (2, 9, 24)),
    ("InterleavedGLU", (2, 5, 24)),
    ("PositionOps", (2, 5, 6)),
    ("IndexOps", (2, 5, 6)),
    ("ScanState", (2, 4, 24)),
    ("Seq1d", None),
]


def _inputs(name, shape):
    if name == "Seq1d":
        return (torch.randint(0, 20, (2, 9)),)
    return (torch.randn(*shape),)


def _randomise_bn(model):
    for mod in model.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-1, 1)
            mod.running_var.uniform_(0.5, 2)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.uniform_(-0.5, 0.5)


@pytest.mark.parametrize("name,shape", CASES)
def test_ratio_zero_is_bit_identical(name, shape):
    model = getattr(models, name)().eval()
    _randomise_bn(model)
    x = _inputs(name, shape)
    ref = call(model, x)
    state = copy.deepcopy(model.state_dict())
    report = sc.prune(model, x, ratio=0.0)
    assert torch.equal(call(model, x), ref)
    assert report.params_after == report.params_before and report.changes == []
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])


@pytest.mark.parametrize("name,shape", CASES)
@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_dead_channels_prune_exactly(name, shape, ratio):
    model = getattr(models, name)().eval()
    _randomise_bn(model)
    x = _inputs(name, shape)
    dead, _ = make_dead(model, x, ratio)
    assert dead, "the model has prunable groups"
    ref = call(model, x)
    report = sc.prune(model, x, ratio=ratio, importance=dead_importance(dead), round_to=1, min_keep=0.0)
    out = call(model, x)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert report.params_after < report.params_before
    assert report.flops_after < report.flops_before
    removed = sum(c.before - c.after for c in report.changes)
    if name == "CatSplit":
        # torch.split([5, 7]) is a literal in forward(): verification freezes the groups it couples.
        assert report.retries >= 1 and any("hard-coded" in f.reason for f in report.frozen)
        assert 0 < removed < sum(len(v) for v in dead.values())
    else:
        assert report.retries == 0
        assert removed == sum(len(v) for v in dead.values())


def test_group_norm_loses_whole_groups_and_transposed_conv_shrinks():
    model = models.UNetish().eval()
    x = (torch.randn(1, 3, 8, 8),)
    sc.prune(model, x, ratio=0.5, round_to=1, min_keep=0.0)
    assert model.gn.num_groups == 2 and model.gn.num_channels == 4 == model.inc.out_channels
    assert model.up.in_channels == model.down.out_channels == 8 and model.up.out_channels == 3
    assert model.outc.in_channels == 4 + 3
    assert call(model, x).shape == (1, 4, 8, 8)


def test_layer_norm_width_is_hidden_and_left_alone_by_default():
    model = models.Seq1d().eval()
    ids = (torch.randint(0, 20, (2, 9)),)
    report = sc.prune(model, ids, ratio=0.5, round_to=1)
    assert model.norm.normalized_shape == (12,) and model.c1.out_channels == 5
    assert any("hidden size" in f.reason for f in report.frozen)


def test_grouped_conv_groups_attribute_follows_whole_group_pruning():
    model = models.Grouped().eval()
    x = (torch.randn(1, 3, 6, 6),)
    info = analyze(sc.capture(model, x))
    whole = [g for g in info.iter_groups() if any(m.name == "gconv.bias" and m.stride == 6 for m in g.members)][0]

    def crit(graph, info, group):
        s = np.ones(group.size)
        if group.size == whole.size and any(m.name == "gconv.bias" and m.stride == 6 for m in group.members):
            s[1] = 0
        return s

    ref_shape = call(model, x).shape
    sc.prune(model, x, ratio=0.25, importance=crit, round_to=1, min_keep=0.0)
    assert model.gconv.groups == 3
    assert model.gconv.in_channels == model.conv1.out_channels
    assert model.dw.groups == model.dw.in_channels == model.gconv.out_channels
    assert call(model, x).shape == ref_shape


def test_output_shapes_and_reexport_after_pruning():
    model = models.Attention().eval()
    x = (torch.randn(2, 7, 24),)
    sc.prune(model, x, ratio=0.5, round_to=1)
    assert model.q.out_features < 30 and model.k.out_features in (5, 10)
    assert call(model, x).shape == (2, 7, 24)
    torch.export.export(model, x, strict=False)  # exports again
    state = model.state_dict()
    fresh = copy.deepcopy(model)
    fresh.load_state_dict(state)
    torch.testing.assert_close(call(fresh, x), call(model, x), atol=0, rtol=0)


def test_gqa_groups_stay_equal_size():
    model = models.Attention().eval()
    x = (torch.randn(2, 7, 24),)
    sc.prune(model, x, ratio=0.5, round_to=1)
    kv_heads = model.k.out_features // 5
    q_heads = model.q.out_features // 5
    assert q_heads % kv_heads == 0


def test_hard_coded_size_is_caught_frozen_and_model_still_correct():
    model = models.HardCodedView().eval()
    x = (torch.randn(2, 3, 4, 4),)
    ref = call(model, x)
    report = sc.prune(model, x, ratio=0.5, round_to=1)
    assert report.retries >= 1
    assert any("hard-coded" in f.reason for f in report.frozen)
    assert model.conv2.out_channels == 16  # the literal-coupled group stayed whole
    assert model.conv1.out_channels == 8  # the other group was still pruned
    assert call(model, x).shape == ref.shape


@pytest.mark.parametrize("target", ["params", "flops"])
@pytest.mark.parametrize("scope", ["local", "global"])
def test_budget_targets_are_reached(target, scope):
    model = models.Grouped().eval()
    x = (torch.randn(1, 3, 8, 8),)
    report = sc.prune(model, x, ratio=0.3, target=target, scope=scope, round_to=1, min_keep=0.0)
    if target == "params":
        assert report.params_after <= 0.7 * report.params_before + 1
    else:
        assert report.flops_after <= 0.7 * report.flops_before + 1


def test_global_scope_prunes_unevenly_and_keeps_floor():
    model = models.CatSplit().eval()
    with torch.no_grad():
        model.b.weight.mul_(100)  # b's channels look far more important
    x = (torch.randn(1, 3, 5, 5),)
    sc.prune(model, x, ratio=0.4, scope="global", round_to=1, min_keep=0.2)
    assert model.a.out_channels < 6 or model.b.out_channels < 10
    for conv, n in ((model.a, 6), (model.b, 10)):
        assert conv.out_channels >= int(np.ceil(0.2 * n))


def test_round_to_keeps_multiples():
    model = models.ConvBN()
    model.conv1 = torch.nn.Conv2d(3, 64, 3, padding=1)
    model.bn1 = torch.nn.BatchNorm2d(64)
    model.conv2 = torch.nn.Conv2d(64, 4, 1)
    model.eval()
    x = (torch.randn(1, 3, 6, 6),)
    sc.prune(model, x, ratio=0.3, round_to=8)
    assert model.conv1.out_channels % 8 == 0 and model.conv1.out_channels < 64


def test_ignore_leaves_named_modules_alone():
    model = models.CatSplit().eval()
    x = (torch.randn(1, 3, 5, 5),)
    report = sc.prune(model, x, ratio=0.5, round_to=1, ignore=["a"])
    assert model.a.out_channels == 6 and model.b.out_channels == 5
    assert any(f.reason == "ignored by the user" for f in report.frozen)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan")])
def test_bad_ratio_is_refused(bad):
    with pytest.raises(BudgetError, match="ratio"):
        sc.prune(models.ConvBN(), (torch.randn(1, 3, 4, 4),), ratio=bad)


def test_bad_options_are_refused():
    with pytest.raises(BudgetError, match="scope"):
        ChannelOptions(scope="everywhere")
    with pytest.raises(BudgetError, match="target"):
        ChannelOptions(target="bytes")
    with pytest.raises(BudgetError, match="criterion"):
        ScoreChannels("entropy")


def test_pass_manager_pipeline_and_noop_result():
    model = models.ConvBN().eval()
    graph = sc.capture(model, (torch.randn(1, 3, 4, 4),))
    result = PassManager([AnalyzeDependencies(), ScoreChannels("l1"), PruneChannels(ratio=0.0)])(graph)
    assert result.modified is False
    graph = sc.capture(model, (torch.randn(1, 3, 4, 4),))
    result = PassManager([AnalyzeDependencies(), ScoreChannels("l1"), PruneChannels(ratio=0.5, round_to=1)])(graph)
    assert result.modified is True and model.conv1.out_channels == 4
    assert result.graph is not graph  # a fresh capture of the rewritten module
    assert first_tensor(call(model, (torch.randn(1, 3, 4, 4),))).shape == (1, 4, 4, 4)


class _FusedGateUp(torch.nn.Module):
    """Phi-3's MLP: one gate_up projection chunked in two, then down (a GLU through a fused weight)."""

    def __init__(self):
        super().__init__()
        self.gate_up, self.down = torch.nn.Linear(16, 128), torch.nn.Linear(64, 16)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(torch.nn.functional.silu(gate) * up)


def test_a_fused_gate_up_is_an_ffn_rounded_on_every_sliced_dim():
    """gate_up holds two rows per neuron (stride 2), down one column: the group is an FFN (not heads) and the
    kept count keeps down's dim a multiple of round_to too (64 x 0.7 = 44.8 -> 48, not 44)."""
    torch.manual_seed(0)
    model, x = _FusedGateUp().eval(), torch.randn(2, 16)
    with torch.no_grad():  # neurons 48..63 are dead: their gate and up rows and down columns are zero
        for rows in (slice(48, 64), slice(112, 128)):
            model.gate_up.weight[rows] = 0
            model.gate_up.bias[rows] = 0
        model.down.weight[:, 48:] = 0
    ref = model(x)
    report = sc.prune(model, (x,), ffn=0.3)
    assert [(c.kind, c.before, c.after) for c in report.changes] == [("ffn", 64, 48)]
    assert model.gate_up.out_features == 96 and model.down.in_features == 48
    torch.testing.assert_close(model(x), ref, rtol=0, atol=1e-6)  # exactly the dead ones left


def test_a_contradiction_in_one_block_freezes_every_block_running_the_same_code_in_one_retry():
    model = models.LiteralHeadsStack(depth=4).eval()
    x = (torch.randn(2, 5, 24),)
    with pytest.raises(VerificationError, match="heads=0.5 .* removes nothing: the model's code contradicts"):
        sc.prune(model, x, heads=0.5, round_to=1)
    report = sc.prune(model, x, ratio=0.5, round_to=1)
    assert report.retries == 1
    heads = [f for f in report.frozen if any(m.endswith(".q.weight") for m in f.members) and f.size == 4]
    assert len(heads) == 4 and sum("same code as blocks.0" in f.reason for f in heads) == 3
    assert sorted(c.kind for c in report.changes) == ["ffn"] * 4
    assert all(b.up.out_features == 24 for b in model.blocks)


def test_interleaved_gate_and_up_neurons_leave_in_pairs():
    model = models.InterleavedGLU().eval()
    x = (torch.randn(2, 5, 24),)
    dense = copy.deepcopy(model)
    report = sc.prune(model, x, ffn=0.5, round_to=1)
    assert model.gate_up.out_features == 16 and model.down.in_features == 8 and report.retries == 0
    rows = [next(i for i, r in enumerate(dense.gate_up.weight) if torch.equal(r, row)) for row in model.gate_up.weight]
    assert all(rows[2 * k] % 2 == 0 and rows[2 * k + 1] == rows[2 * k] + 1 for k in range(8))  # (gate, up) pairs
    assert any("interleaved run" in f.reason for f in report.frozen)


def test_a_state_allocated_at_a_synced_size_follows_the_pruned_width():
    model = models.ScanState().eval()
    x = (torch.randn(2, 4, 24),)
    report = sc.prune(model, x, ratio=0.5, round_to=1)
    assert model.in_proj.out_features == 16 == model.intermediate_size and report.retries == 0
    assert not any("tensor factory" in f.reason for f in report.frozen)
