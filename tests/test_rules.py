import math

import pytest
import torch

import secateurs as sc
from secateurs.errors import UnsupportedOpError
from secateurs.ir.depgraph import analyze
from secateurs.ir.rules import RULES, OpRuleTable

aten = torch.ops.aten


def _noop(ctx, node):
    return None


def test_table_refuses_packets_duplicates_and_non_ops():
    table = OpRuleTable()
    with pytest.raises(UnsupportedOpError, match="packet"):
        table.register([aten.add], _noop)
    table.register([aten.add.Tensor], _noop)
    with pytest.raises(UnsupportedOpError, match="already has a rule"):
        table.register([aten.add.Tensor], _noop)
    with pytest.raises(UnsupportedOpError, match="not an op"):
        table.register([42], _noop)


def test_core_ops_have_rules():
    import secateurs.ir.aten_rules  # noqa: F401

    for op in [aten.conv2d.default, aten.linear.default, aten.batch_norm.default, aten.layer_norm.default,
               aten.group_norm.default, aten.embedding.default, aten.add.Tensor, aten.mul.Tensor, aten.cat.default,
               aten.split.Tensor, aten.chunk.default, aten.slice.Tensor, aten.select.int, aten.view.default,
               aten.reshape.default, aten.flatten.using_ints, aten.permute.default, aten.transpose.int,
               aten.scaled_dot_product_attention.default, aten.max_pool2d.default, aten.adaptive_avg_pool2d.default,
               aten.relu.default, aten.dropout.default, aten.matmul.default, aten.addmm.default, aten.bmm.default,
               aten.conv_transpose2d.input, aten.rms_norm.default]:
        assert op in RULES, op


def test_a_rule_that_raises_freezes_its_node_instead_of_crashing(monkeypatch):
    """A rule's exception freezes what its node touches and is reported; the analysis goes on."""
    import secateurs as sc
    from secateurs.ir import analyze

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)
            self.c, self.d = torch.nn.Linear(8, 32), torch.nn.Linear(32, 4)

        def forward(self, x):
            return self.d(torch.tanh(self.c(self.b(torch.relu(self.a(x))))))

    def broken(ctx, node):
        ctx.same_dims(node.args[0], node)  # links something first, then fails like a rule bug would
        raise IndexError("tuple index out of range")

    graph = sc.capture(Net(), (torch.randn(2, 8),))
    healthy = analyze(graph)
    assert sorted(g.size for g in healthy.iter_groups()) == [8, 16, 32]
    monkeypatch.setitem(RULES._rules, aten.relu.default, RULES.get(aten.relu.default).__class__(
        aten.relu.default, broken))
    info = analyze(graph)
    assert sorted(g.size for g in info.iter_groups()) == [8, 32]  # the tanh side is still prunable
    assert any("relu" in u and "IndexError: tuple index out of range" in u for u in info.unsupported)
    frozen = [f for f in info.frozen if "a.weight[0]" in f.members]
    assert frozen and "cannot handle this node" in frozen[0].reason and "IndexError" in frozen[0].reason
    model = Net()
    report = sc.prune(model, (torch.randn(2, 8),), ratio=0.5)
    assert model.a.out_features == 16 and model.c.out_features == 16  # frozen by the failing rule; pruned
    assert any("rule failed: IndexError" in u for u in report.unsupported_ops)
    assert any("cannot handle this node" in f.reason for f in report.frozen)


class _Frac(torch.nn.Module):
    """Linear(8, 16) -> frac -> Linear(16, 4): aten.frac has no rule, so the 16 channels are frozen."""

    def __init__(self):
        super().__init__()
        self.a, self.o = torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.o(torch.frac(self.a(x)))


def test_a_rule_table_given_to_the_analysis_adds_a_rule_without_touching_the_built_in_one():
    import secateurs as sc
    from secateurs.ir.depgraph import DependencyInfo
    from secateurs.passes import AnalyzeDependencies

    frac = torch.ops.aten.frac.default
    assert frac not in RULES
    graph = sc.capture(_Frac().eval(), (torch.randn(2, 8),))
    AnalyzeDependencies()(graph)
    plain = graph.analysis(DependencyInfo)
    assert not any(g.size == 16 for g in plain.iter_groups())
    assert any("frac" in u for u in plain.unsupported)
    table = RULES.copy()
    table.register([frac], lambda ctx, node: ctx.same_dims(node.args[0], node))  # elementwise: same channels
    AnalyzeDependencies(table)(graph)
    ruled = graph.analysis(DependencyInfo)
    assert [g.size for g in ruled.iter_groups()] == [16] and not ruled.unsupported
    assert frac not in RULES and len(table) == len(RULES) + 1  # nothing leaked into the built-in table


def test_the_cost_of_a_plan_counts_with_the_rules_the_analysis_ran_with():
    import secateurs as sc
    from secateurs.ir.aten_cost import predict_cost
    from secateurs.ir.depgraph import DependencyInfo
    from secateurs.passes import AnalyzeDependencies

    frac = torch.ops.aten.frac.default
    graph = sc.capture(_Frac().eval(), (torch.randn(2, 8),))
    AnalyzeDependencies()(graph)
    _, plain = predict_cost(graph, graph.analysis(DependencyInfo), {})
    table = RULES.copy()
    # frac counted as one FLOP per element of its output (2 x 16 = 32), scaling with the kept channels
    table.register([frac], lambda ctx, node: ctx.same_dims(node.args[0], node),
                   flops=lambda node, shape_of: float(math.prod(shape_of(node) or (0,))))
    AnalyzeDependencies(table)(graph)
    info = graph.analysis(DependencyInfo)
    (group,) = info.iter_groups()
    _, ruled = predict_cost(graph, info, {})
    _, half = predict_cost(graph, info, {group.id: 8})
    assert ruled == plain + 32
    assert half == (ruled - 32) / 2 + 16  # both linear layers halve with the group; frac at 2 x 8 adds 16



class _EmptySlice(torch.nn.Module):
    """A rotary-style split whose pass-through part is empty (``x[..., 16:]`` of 16 channels)."""

    def __init__(self):
        super().__init__()
        self.a, self.o = torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)

    def forward(self, x):
        h = self.a(x)
        return self.o(torch.cat([h[..., :16] * 2, h[..., 16:]], dim=-1))


def test_an_empty_slice_is_no_rule_failure():
    import secateurs as sc

    report = sc.prune(_EmptySlice().eval(), (torch.randn(2, 8),), ratio=0.5, round_to=1)
    assert not report.unsupported_ops  # was: IndexError in the slice rule, the channels frozen
    assert [(c.before, c.after) for c in report.changes] == [(16, 8)]


def test_topk_sort_repeat_interleave_and_weight_norm_have_rules():
    class Ops(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(6, 8)
            self.b = torch.nn.Linear(8, 4)
            self.g = torch.nn.Parameter(torch.ones(8, 1))
            self.v = torch.nn.Parameter(torch.randn(8, 6))

        def forward(self, x):
            h = self.a(x)                                            # [2, 5, 8]
            top, idx = h.topk(3, dim=1)                              # positions selected: channels pass
            s, _ = h.sort(dim=1)
            r = torch.repeat_interleave(h, 2, dim=1)                 # positions repeated in place
            w = torch._weight_norm(self.v, self.g, 0)                # per output row
            counts = torch.histc(x, bins=4, min=-1, max=1)
            return self.b(top.sum(1) + s.sum(1) + r.sum(1) + (x @ w.t()).sum(1)) + counts.sum() + idx.sum() * 0

    model = Ops().eval()
    x = (torch.randn(2, 5, 6),)
    info = analyze(sc.capture(model, x))
    assert info.unsupported == []
    group = next(g for g in info.iter_groups() if "a.weight" in {m.name for m in g.members})
    assert group.size == 8 and {"b.weight", "v", "g"} <= {m.name for m in group.members}
