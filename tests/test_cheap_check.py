"""The cheap check of a width rewrite: one replayed forward, traced shapes against the plan, outputs against the
masked dense model.

Oracles: the capture derived from the replay equals a fresh recording of the pruned model node by node (targets,
traced shapes, literal arguments, parameters); a correct rewrite passes with one recording in all (the dense
one); a tampered rewrite and a literal channel range are caught by the cheap check alone, before the per-node
check names the culprit, also before a norm whose input the plan changes (adopted from the pruned model); the drift is
an eager forward's.
"""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import secateurs as sc
import secateurs.frontends.torch_export as torch_export
import secateurs.passes.channels as channels
from secateurs.frontends.derive import derive_capture
from secateurs.ir import analyze
from secateurs.ir.graph import tensor_shape
from secateurs.modeling.rewrite import apply_keep
from secateurs.passes import AnalyzeDependencies, PassManager, PruneChannels, ScoreChannels
from secateurs.passes.drift import measure_drift
from secateurs.passes.masked import _literals, masked_outputs, outputs_differ

from families import build


def _shapes(value):
    if isinstance(value, (list, tuple)):
        return [tensor_shape(v) for v in value]
    return tensor_shape(value)


def _same_program(derived, fresh):
    a = [n for n in derived.fx_graph.nodes]
    b = [n for n in fresh.fx_graph.nodes]
    assert [(n.op, str(n.target)) for n in a] == [(n.op, str(n.target)) for n in b]
    same = {x.name: y.name for x, y in zip(a, b, strict=True)}  # names may differ where a relayout was skipped
    for x, y in zip(a, b, strict=True):
        assert _shapes(x.meta.get("val")) == _shapes(y.meta.get("val")), x.name
        assert _literals(x) == _literals(y), x.name
        assert [same[i.name] for i in x.all_input_nodes] == [i.name for i in y.all_input_nodes], x.name
    for name, fqn in fresh.params.items():
        assert derived.params[name] == fqn and derived.program.state[name] is fresh.program.state[name]


@pytest.fixture
def recordings(monkeypatch):
    """Counts the recordings of a model (the dense capture is one)."""
    calls = []
    real = torch_export.record_call

    def counted(*args, **kwargs):
        calls.append(type(args[0]).__name__)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch_export, "record_call", counted)
    return calls


@pytest.mark.parametrize("family", ["bert", "llama", "gpt2", "vit", "resnet", "mixtral"])
def test_the_derived_capture_is_what_a_new_recording_gives(family, monkeypatch, recordings):
    derived = []
    real = channels.derive_capture
    monkeypatch.setattr(channels, "derive_capture", lambda g, **kw: derived.append(real(g, **kw)) or derived[-1])
    model, inputs = build(family)
    report = sc.prune(model, inputs, ratio=0.3)
    assert report.verification.startswith("fast: one forward of the pruned model replayed"), report.verification
    assert len(recordings) == 1 and len(derived) == 1  # the dense capture only: the pruned model was replayed
    assert report.params_after < report.params_before
    _same_program(derived[0].graph, sc.capture(model, inputs))


def _mlp_plan(model, x, seed=0):
    graph = sc.capture(model, (x,))
    info = analyze(graph)
    rng = np.random.default_rng(seed)
    keep = {}
    for g in info.iter_groups():
        mask = np.ones(g.size, dtype=bool)
        mask[rng.choice(g.size, g.size // 4, replace=False)] = False
        keep[g.id] = mask
    apply_keep(graph, info, keep)
    return graph, info, keep


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(12, 40), nn.Linear(40, 6)

    def forward(self, x):
        return self.b(F.gelu(self.a(x)))


def test_the_cheap_check_passes_a_correct_rewrite_and_catches_a_tampered_one_alone():
    torch.manual_seed(0)
    model, x = Mlp(), torch.randn(5, 12)
    graph, info, keep = _mlp_plan(model, x)
    got = derive_capture(graph)
    assert outputs_differ(masked_outputs(graph, info, keep, got.graph.values), got.outputs) is None
    with torch.no_grad():
        model.b.weight[0, 0] += 1.0  # a kept weight the plan did not change
    got = derive_capture(graph)
    why = outputs_differ(masked_outputs(graph, info, keep, got.graph.values), got.outputs)
    assert why is not None and why.startswith("output #0 differs from the masked dense model's")


class PrefixSlice(nn.Module):
    """Reads a literal channel range: removing channels before 32 shifts what the slice reads."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.o = nn.Linear(32, 128), nn.Linear(64, 10)

    def forward(self, x):
        return self.o(F.relu(self.a(x))[:, 32:96])


def test_a_literal_channel_range_is_caught_by_the_cheap_check_then_frozen_by_the_full_one(monkeypatch):
    torch.manual_seed(0)
    model, x = PrefixSlice(), torch.randn(4, 32)
    ref = model(x)
    graph = sc.capture(copy.deepcopy(model), (x,))
    info = analyze(graph)
    group = next(info.iter_groups())  # channels 0:32 of ``a``, before the range: removing them shifts it
    assert group.size == 32 and {m.name for m in group.members} == {"a.weight", "a.bias"}
    keep = {group.id: np.arange(group.size) % 4 != 0}
    apply_keep(graph, info, keep)
    got = derive_capture(graph)  # the shapes agree: only the values say the slice now reads other channels
    assert outputs_differ(masked_outputs(graph, info, keep, got.graph.values), got.outputs) is not None
    full = []
    real = channels._shape_problem
    monkeypatch.setattr(channels, "_shape_problem", lambda *a, **k: full.append(1) or real(*a, **k))
    report = sc.prune(model, (x,), ratio=0.3, round_to=1)
    assert full  # the cheap check's doubt sent the rewrite to the per-node check, which named the culprit
    assert any("fixed channel range" in f.reason for f in report.frozen)
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-6)


class InPlace(nn.Module):
    """Writes into its activations (``relu_``, ``add_``): the cheap check runs node by node on the replay."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 32), nn.Linear(32, 32), nn.Linear(32, 4)

    def forward(self, x):
        h = F.relu(self.a(x), inplace=True)
        g = self.b(h)
        g.add_(h)
        return self.c(F.relu(g, inplace=True))


def test_a_model_that_writes_in_place_is_checked_on_the_replayed_values(recordings):
    torch.manual_seed(0)
    model, x = InPlace().eval(), torch.randn(6, 8)
    report = sc.prune(model, (x,), ratio=0.5, round_to=1)
    assert report.verification.startswith("fast: one forward of the pruned model replayed"), report.verification
    assert len(recordings) == 1 and model.a.out_features == 16


@pytest.mark.parametrize("family", ["gpt2", "vit", "opt"])
def test_what_comes_before_an_adopted_norm_is_checked_too(family, monkeypatch):
    """With the hidden size pruned every LayerNorm over it is adopted from the pruned model (its statistics change
    by design), and every path to the output goes through one: a wrong kept weight in the first block must still
    be found by the cheap check, which compares what an adopted node reads."""
    model, inputs = build(family)
    seen = []
    real = channels.PruneChannels._fast

    def tampered(self, graph, *args):
        if seen:
            return real(self, graph, *args)
        first = next(p for n, p in graph.module.named_parameters() if ".0." in n and n.endswith("weight")
                     and p.dim() == 2)
        with torch.no_grad():
            first[0, 0] += 1.0  # a kept weight the plan did not change, for the cheap check only
        try:
            seen.append(real(self, graph, *args))
        finally:
            with torch.no_grad():
                first[0, 0] -= 1.0
        return seen[-1]

    monkeypatch.setattr(channels.PruneChannels, "_fast", tampered)
    report = sc.prune(model, inputs, hidden=0.25, round_to=1)
    assert seen == [None]  # the cheap check doubted the tampered rewrite: the per-node check then verified it
    assert report.verification.startswith("fast: a recorded forward"), report.verification
    assert any(c.kind == "hidden" and c.after < c.before for c in report.changes)


def test_the_drift_is_measured_on_an_eager_forward_of_the_pruned_model():
    model, inputs = build("bert")
    dense = copy.deepcopy(model).eval()
    report = sc.prune(model, inputs, ratio=0.3)
    args, kwargs = torch_export.split_inputs(model, inputs)
    with torch.no_grad():
        reference = [t for t in torch.utils._pytree.tree_leaves(dense(*args, **kwargs)) if isinstance(t, torch.Tensor)]
    again = measure_drift(model, args, kwargs, reference)
    assert report.drift is not None and report.drift.outputs == again.outputs
    assert report.drift.cosine == pytest.approx(again.cosine, abs=1e-6)
    assert report.drift.rel_error == pytest.approx(again.rel_error, rel=1e-4, abs=1e-7)


def test_a_pass_after_the_rewrite_gets_a_fresh_capture():
    model, inputs = build("bert")
    graph = sc.capture(model, inputs)
    result = PassManager([AnalyzeDependencies(), ScoreChannels("l2"), PruneChannels(ratio=0.3),
                          AnalyzeDependencies()])(graph)
    pruned = result.results[2][1].graph
    assert pruned.derived and not result.graph.derived
    _same_program(pruned, result.graph)
