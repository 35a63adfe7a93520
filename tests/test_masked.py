"""The masked-model check: code that keeps every shape but changes its meaning after pruning is caught.

Oracles: channels outside a literal range are provably dead, so what is pruned must leave the output
equal; a size traced as a constant must freeze the group it belongs to; the check itself passes a
correct rewrite (bias compensation included) and fails a tampered one.
"""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import secateurs as sc
from secateurs.errors import VerificationError
from secateurs.ir import analyze
from secateurs.modeling.rewrite import apply_keep
from secateurs.passes.channels import _shape_problem
from secateurs.passes.masked import masked_mismatch


class PrefixSlice(nn.Module):
    """Reads a literal channel range: channels 0:32 and 96:128 of ``a`` are dead."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.o = nn.Linear(32, 128), nn.Linear(64, 10)

    def forward(self, x):
        return self.o(F.relu(self.a(x))[:, 32:96])


class HalfSlices(nn.Module):
    """Splits a hidden layer with literal slices: pruning the first half shifts what the second reads."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.o1, self.o2 = nn.Linear(16, 64), nn.Linear(32, 8), nn.Linear(32, 8)

    def forward(self, x):
        h = F.relu(self.a(x))
        return self.o1(h[:, :32]) + self.o2(h[:, 32:])


class ParamSlice(nn.Module):
    """Scales a hidden layer by a literal slice of a longer parameter (its entries 0:8 and 56:64 are unused)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.o = nn.Linear(16, 48), nn.Linear(48, 8)
        self.gain = nn.Parameter(torch.rand(64) + 0.5)

    def forward(self, x):
        return self.o(F.relu(self.a(x)) * self.gain[8:56])


class SizeScale(nn.Module):
    """Single-head attention scaled by ``sqrt(q.size(-1))``, which torch.export bakes in; then an MLP.

    Run unbatched: a batched product of two activations is attention to the analysis, whose q/k width it freezes
    before any check; a 2-d one is left to the masked check, which these tests exercise.
    """

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(32, 64), nn.Linear(32, 64), nn.Linear(32, 32)
        self.up, self.down = nn.Linear(32, 64), nn.Linear(64, 32)

    def forward(self, x):
        q, k = self.q(x), self.k(x)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.size(-1)), -1) @ self.v(x)
        return self.down(F.relu(self.up(att)))


def _frozen(report, needle):
    return [f for f in report.frozen if needle in f.reason]


def test_literal_range_freezes_the_channels_before_it_and_prunes_the_dead_ones_after_it_exactly():
    torch.manual_seed(0)
    model, x = PrefixSlice(), torch.randn(4, 32)
    ref = model(x)
    report = sc.prune(model, (x,), ratio=0.3, round_to=1)
    hits = _frozen(report, "fixed channel range")
    assert hits and "slice" in hits[0].reason, [f.reason for f in report.frozen]
    assert model.a.out_features < 128  # the channels after the range went
    # What was removed is dead under the literal range: the output is unchanged (up to the matmul's rounding).
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-6)


def test_literal_slice_of_a_parameter_freezes_what_would_shift_it():
    torch.manual_seed(0)
    model, x = ParamSlice(), torch.randn(6, 16)
    ref = model(x)
    report = sc.prune(model, (x,), ratio=0.3, round_to=1)
    hits = _frozen(report, "fixed channel range")
    assert hits and any(m.startswith("gain") for m in hits[0].members)
    assert 56 <= model.gain.numel() < 64  # only the unused tail went
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-6)


class ScaledAttention(nn.Module):
    """Only the q/k width is prunable, and ``sqrt(q.size(-1))`` is traced as a constant."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(32, 64), nn.Linear(32, 64), nn.Linear(32, 32)

    def forward(self, x):
        q, k = self.q(x), self.k(x)
        return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.size(-1)), -1) @ self.v(x)


def test_a_model_whose_only_group_contradicts_the_masked_model_is_refused_and_restored():
    torch.manual_seed(0)
    model, x = ScaledAttention(), torch.randn(5, 32)  # unbatched: 2-d products are left to the masked check
    ref = model(x)
    with pytest.raises(VerificationError, match="size traced as a constant"):
        sc.prune(model, (x,), ratio=0.3, round_to=1)
    assert model.q.out_features == 64 and torch.equal(model(x), ref)


def test_open_ended_slice_stays_prunable_and_the_model_computes_what_the_masked_dense_model_does():
    """``h[:, :32]`` is a fixed range (its group freezes); ``h[:, 32:]`` follows the pruned size (it prunes)."""
    torch.manual_seed(0)
    model, x = HalfSlices(), torch.randn(6, 16)
    dense = copy.deepcopy(model)
    report = sc.prune(model, (x,), ratio=0.3, round_to=1)
    assert _frozen(report, "the model's code")
    assert 32 < model.a.out_features < 64
    kept = _kept_and_zeroed(dense, model)
    assert all(kept[:32]) and not all(kept[32:])
    torch.testing.assert_close(model(x), dense(x), rtol=1e-5, atol=1e-6)


def _kept_and_zeroed(dense, model):
    """Which rows of ``dense.a`` the pruned ``model.a`` kept; the others are zeroed in ``dense`` (the plan's
    meaning: the removed channels are zero)."""
    kept = [bool((model.a.weight == row).all(1).any()) for row in dense.a.weight]
    with torch.no_grad():
        gone = torch.tensor([not k for k in kept])
        dense.a.weight[gone] = 0
        dense.a.bias[gone] = 0
    return kept


def test_size_traced_as_a_constant_freezes_its_group_and_the_rest_is_pruned():
    torch.manual_seed(0)
    model, x = SizeScale(), torch.randn(5, 32)  # unbatched: 2-d products are left to the masked check
    report = sc.prune(model, (x,), ratio=0.25, round_to=1)
    hits = _frozen(report, "size traced as a constant")
    assert hits and "8.0 became" in hits[0].reason and any("q.weight" in m for m in hits[0].members)
    assert model.q.out_features == model.k.out_features == 64
    assert model.up.out_features == 48  # the MLP still shrinks


class InPlaceWrite(nn.Module):
    """Writes a literal channel range in place (``slice`` + ``fill_`` in the capture: a write through a view)."""

    def __init__(self, lo, hi, fill) -> None:
        super().__init__()
        self.a, self.o = nn.Linear(16, 64), nn.Linear(64, 8)
        self.lo, self.hi, self.fill = lo, hi, fill

    def forward(self, x):
        g = F.relu(self.a(x))
        g[:, self.lo:self.hi] = self.fill
        return self.o(g)


@pytest.mark.parametrize("lo,hi,fill", [(0, 2, 0.0), (10, 12, 5.0)])
def test_writes_through_a_view_are_followed_and_the_range_they_write_is_kept(lo, hi, fill):
    """Oracle: the pruned model computes the dense model with the removed channels zeroed. The written range
    and every channel before it keep their positions; a range at the start leaves the rest prunable (this was
    a false alarm: the masked run lost the write when it replaced the view by a copy)."""
    torch.manual_seed(0)
    dense, x = InPlaceWrite(lo, hi, fill), torch.randn(4, 16)
    model = copy.deepcopy(dense)
    sc.prune(model, (x,), ratio=0.3, round_to=1)
    assert model.a.out_features < 64
    assert all(_kept_and_zeroed(dense, model)[:hi])
    torch.testing.assert_close(model(x), dense(x), rtol=1e-5, atol=1e-6)


def test_the_check_never_writes_into_the_dense_capture():
    """It writes masks and adopted values into the dense run's own values, never into parameters or buffers."""
    torch.manual_seed(0)
    model, x = Mlp(), torch.randn(5, 12)
    graph, info, keep, new, partner, _ = _rewrite(model, x)
    state = [v for v in graph.flat_inputs() if isinstance(v, torch.Tensor)]
    before = [v.clone() for v in state]
    assert masked_mismatch(graph, new, info, keep, partner) is None
    assert all(torch.equal(a, b) for a, b in zip(before, state, strict=True))


class ScaledEmbedding(nn.Embedding):
    """Gemma's convention: the embedding is scaled by ``sqrt(width)``, which follows a pruned width."""

    def __init__(self, n, d) -> None:
        super().__init__(n, d)
        self.scalar_embed_scale = float(d) ** 0.5
        self.register_buffer("embed_scale", torch.tensor(float(d) ** 0.5), persistent=False)

    def forward(self, ids):
        return super().forward(ids) * self.embed_scale


class ScaledEmbeddingAttention(SizeScale):
    def __init__(self) -> None:
        super().__init__()
        self.emb = ScaledEmbedding(50, 32)

    def forward(self, ids):
        return super().forward(self.emb(ids))


def test_narrowing_down_a_culprit_keeps_scales_that_follow_a_pruned_size():
    """The traced-size node reads no pruned dim, so the culprit is searched among all groups; the embedding's
    group, whose scale follows its width by design, must not be blamed (it was, before the search used the
    scale the rewrite gave it)."""
    torch.manual_seed(0)
    model, ids = ScaledEmbeddingAttention(), torch.randint(0, 50, (5,))  # unbatched, as above
    report = sc.prune(model, (ids,), ratio=0.25, round_to=1)
    hits = _frozen(report, "size traced as a constant")
    assert [sorted(f.members) for f in hits] == [["k.bias", "k.weight", "q.bias", "q.weight"]]
    assert model.emb.embedding_dim == 24 and float(model.emb.embed_scale) == pytest.approx(24 ** 0.5)
    assert model.q.out_features == 64 and model.up.out_features == 48


def _rewrite(model, x, seed=0):
    graph = sc.capture(model, (x,))
    info = analyze(graph)
    rng = np.random.default_rng(seed)
    keep = {}
    for g in info.iter_groups():
        mask = np.ones(g.size, dtype=bool)
        mask[rng.choice(g.size, g.size // 4, replace=False)] = False
        keep[g.id] = mask
    snap = apply_keep(graph, info, keep)
    new, problem, partner = _shape_problem(graph, info, {g: int(m.sum()) for g, m in keep.items()})
    assert problem is None
    return graph, info, keep, new, partner, snap


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(12, 40), nn.Linear(40, 6)

    def forward(self, x):
        return self.b(F.gelu(self.a(x)))


def test_the_check_passes_a_correct_rewrite_and_names_the_node_of_a_tampered_one():
    torch.manual_seed(0)
    model, x = Mlp(), torch.randn(5, 12)
    graph, info, keep, new, partner, _ = _rewrite(model, x)
    assert masked_mismatch(graph, new, info, keep, partner) is None
    with torch.no_grad():
        model.b.weight[0, 0] += 1.0  # a kept weight that the plan did not change
    tampered = sc.capture(model, (x,))
    _, _, partner = _shape_problem(graph, info, {g: int(m.sum()) for g, m in keep.items()})
    found = masked_mismatch(graph, tampered, info, keep, partner)
    assert found is not None and found.node.startswith("linear")


def test_the_check_includes_compensated_biases():
    torch.manual_seed(0)
    model, x = Mlp(), torch.randn(5, 12)
    graph, info, keep, new, partner, _ = _rewrite(model, x)
    model.b.bias = nn.Parameter(model.b.bias.detach() + 0.5)  # what bias compensation does: a new, moved bias
    moved = sc.capture(model, (x,))
    _, _, partner = _shape_problem(graph, info, {g: int(m.sum()) for g, m in keep.items()})
    assert masked_mismatch(graph, moved, info, keep, partner) is not None
    full = graph.state_tensor("b.bias") + 0.5
    assert masked_mismatch(graph, moved, info, keep, partner, {"b.bias": full}) is None


def test_flap_with_bias_compensation_and_hidden_pruning_pass_the_check():
    """The check compares what the plan means: compensated biases and changed norm statistics are not errors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2, vocab_size=128, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 128, (2, 12))
    calib = [{"input_ids": torch.randint(0, 128, (2, 12))} for _ in range(2)]
    report = sc.prune(model, {"input_ids": ids}, ffn=0.25, hidden=0.25, calib=calib, round_to=1)
    assert not _frozen(report, "the model's code"), [f.reason for f in report.frozen]
    assert model.config.hidden_size == 48 or model.model.embed_tokens.embedding_dim == 48
