"""AnalyzeDependencies: golden channel groups for small graphs, boundaries, unknown ops, tied weights."""

import pytest
import torch
from torch import nn

import secateurs as sc
from secateurs.errors import PassContractError
from secateurs.ir import DependencyInfo, analyze
from secateurs.passes import AnalyzeDependencies, PassManager, PruneChannels

import models


def render(info):
    lines = []
    for g in info.iter_groups():
        lines.append(f"{g.size}: " + ", ".join(sorted(f"{m.name}[{m.dim}]/{m.stride}" for m in g.members)))
    return sorted(lines)


GOLDEN = {
    "ConvBN": """
8: bn1.bias[0]/1, bn1.running_mean[0]/1, bn1.running_var[0]/1, bn1.weight[0]/1, conv1.bias[0]/1, conv1.weight[0]/1, conv2.weight[1]/1
""",
    # groups=4 conv: whole groups (4, each 4 input rows of conv1 and 6 output channels), the 4 input slots
    # inside every group, and the 6 output slots inside every group (shared with the depthwise conv).
    "Grouped": """
4: conv1.bias[0]/4, conv1.weight[0]/4, dw.bias[0]/6, dw.weight[0]/6, gconv.bias[0]/6, gconv.weight[0]/6, out.weight[1]/6
4: conv1.bias[0]/4, conv1.weight[0]/4, gconv.weight[1]/1
6: dw.bias[0]/4, dw.weight[0]/4, gconv.bias[0]/4, gconv.weight[0]/4, out.weight[1]/4
""",
    "FlattenHead": """
6: conv.bias[0]/1, conv.weight[0]/1, fc.weight[1]/16
""",
    "CatSplit": """
10: b.bias[0]/1, b.weight[0]/1, mix.weight[1]/1
5: left.weight[1]/1, mix.bias[0]/1, mix.weight[0]/1
6: a.bias[0]/1, a.weight[0]/1, mix.weight[1]/1
7: mix.bias[0]/1, mix.weight[0]/1, right.weight[1]/1
""",
    # GQA: 2 KV groups (each 3 query heads of 5 dims), 3 query heads per group, 40 GLU neurons.
    "Attention": """
2: k.bias[0]/5, k.weight[0]/5, o.weight[1]/15, q.bias[0]/15, q.weight[0]/15, v.bias[0]/5, v.weight[0]/5
3: o.weight[1]/10, q.bias[0]/10, q.weight[0]/10
40: down.weight[1]/1, gate.bias[0]/1, gate.weight[0]/1, up.bias[0]/1, up.weight[0]/1
""",
}
SHAPES = {"Attention": (2, 7, 24)}


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_groups(name):
    model = getattr(models, name)().eval()
    info = analyze(sc.capture(model, (torch.randn(*SHAPES.get(name, (1, 3, 4, 4))),)))
    assert render(info) == sorted(GOLDEN[name].strip().splitlines())


def test_inputs_outputs_and_head_dim_are_frozen_with_reasons():
    info = analyze(sc.capture(models.Attention().eval(), (torch.randn(2, 7, 24),)))
    reasons = {m: f.reason for f in info.frozen for m in f.members}
    assert reasons["q.weight[1]"].startswith("graph input")
    assert "head_dim" in reasons["k.weight[0]"]


def test_pass_attaches_analysis_and_reports_record():
    graph = sc.capture(models.ConvBN().eval(), (torch.randn(1, 3, 4, 4),))
    result = AnalyzeDependencies()(graph)
    assert result.modified is False
    assert isinstance(graph.analysis(DependencyInfo), DependencyInfo)
    assert result.record.groups == 1 and result.record.prunable_channels == 8


def test_transform_without_analysis_is_refused():
    graph = sc.capture(models.ConvBN().eval(), (torch.randn(1, 3, 4, 4),))
    with pytest.raises(PassContractError, match="requires DependencyInfo"):
        PassManager([PruneChannels(ratio=0.5)])(graph)


@torch.library.custom_op("secateurs_test::mystery", mutates_args=())
def _mystery(x: torch.Tensor) -> torch.Tensor:
    return x.flip(1).clone()


@_mystery.register_fake
def _(x):
    return torch.empty_like(x)


class Mystery(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(8, 8, 1)
        self.c = nn.Conv2d(8, 8, 1)
        self.d = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = torch.ops.secateurs_test.mystery(self.a(x))
        return self.d(torch.relu(self.c(torch.relu(self.b(y)))))


def test_unknown_op_freezes_what_it_touches_and_is_reported():
    model = Mystery().eval()
    x = torch.randn(1, 3, 4, 4)
    ref = model(x)
    info = analyze(sc.capture(model, (x,)))
    assert any("mystery" in u for u in info.unsupported)
    frozen = {m for f in info.frozen for m in f.members}
    assert {"a.weight[0]", "b.weight[1]"} <= frozen
    # b->c and c->d channels are understood and stay prunable.
    assert len(info.groups) == 2
    report = sc.prune(model, (x,), ratio=0.5, round_to=1)
    assert any("mystery" in u for u in report.unsupported_ops)
    assert model.a.out_channels == 8 and model.b.in_channels == 8
    assert model.b.out_channels == 4 and model.c.out_channels == 4
    assert model(x).shape == ref.shape


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.mid = nn.Linear(8, 16)
        self.back = nn.Linear(16, 8)
        self.head = nn.Linear(8, 11, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        h = self.emb(ids)
        return self.head(h + self.back(torch.relu(self.mid(h))))


def test_tied_weights_are_one_tensor():
    model = Tied().eval()
    ids = torch.randint(0, 11, (2, 5))
    info = analyze(sc.capture(model, (ids,)))
    hidden = [g for g in info.iter_groups() if g.size == 8]
    assert len(hidden) == 1
    assert {"emb.weight", "head.weight"} & {m.name for m in hidden[0].members}
    sc.prune(model, (ids,), ratio=0.5, round_to=1, scope="local")
    assert model.head.weight is model.emb.weight
    assert model(ids).shape == (2, 5, 11)


def test_per_channel_costs_match_the_layer_arithmetic():
    from secateurs.ir.aten_cost import count_flops, per_channel_costs

    graph = sc.capture(models.FlattenHead().eval(), (torch.randn(1, 3, 4, 4),))
    info = analyze(graph)
    (gid,) = info.groups
    params, flops = per_channel_costs(graph, info)[gid]
    # one conv channel: 3*3*3 weights + 1 bias, and 16 inputs of fc (flattened 4x4 map) for each of 7 outputs
    assert params == 27 + 1 + 16 * 7 == info.groups[gid].params_per_channel
    # conv: 2 * (4*4 outputs) * 27 MACs; fc: 2 * 7 * 16
    assert flops == 2 * 16 * 27 + 2 * 7 * 16
    assert count_flops(graph) == 2 * 6 * 16 * 27 + 2 * 7 * 96
