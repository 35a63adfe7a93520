"""Budget allocators: redundant layers are pruned more, and each allocator spends exactly its budget."""

import pytest
import torch
from torch import nn

import secateurs as sc
from secateurs.errors import BudgetError
from secateurs.ir import DependencyInfo
from secateurs.passes import ALLOCATORS, AllocateBudget, AnalyzeDependencies, LayerBudget, ScoreChannels


class Graded(nn.Module):
    """Four hidden layers of 32 neurons; layer 1's neurons contribute almost nothing (their rows and the next
    layer's columns are scaled near zero), layer 3 has a few outlier neurons."""

    def __init__(self):
        super().__init__()
        self.fcs = nn.ModuleList([nn.Linear(16, 32)] + [nn.Linear(32, 32) for _ in range(3)])
        self.head = nn.Linear(32, 32)
        with torch.no_grad():
            self.fcs[1].weight.mul_(0.01)
            self.fcs[1].bias.mul_(0.01)
            self.fcs[2].weight.mul_(0.01)
            self.fcs[3].weight[:3].mul_(40)

    def forward(self, x):
        for fc in self.fcs:
            x = torch.relu(fc(x))
        return self.head(x)


def _budget(allocator, ratio=0.4, unit="channels"):
    torch.manual_seed(0)
    model = Graded().eval()
    graph = sc.capture(model, (torch.randn(8, 16),))
    AnalyzeDependencies()(graph)
    ScoreChannels("l2")(graph)
    AllocateBudget(ratio, allocator, unit=unit, min_keep=0.1)(graph)
    info = graph.analysis(DependencyInfo)
    budget = graph.analysis(LayerBudget)
    by_layer = {}
    for g in info.iter_groups():
        layer = next(m.name for m in g.members if m.dim == 0 and m.name.endswith("weight"))
        by_layer[layer] = budget.ratios[g.id]
    return budget, info, by_layer


@pytest.mark.parametrize("allocator", [a for a in ALLOCATORS if a != "cfsp"])  # cfsp needs residual blocks
@pytest.mark.parametrize("unit", ["channels", "params", "flops"])
def test_budget_is_met_within_rounding(allocator, unit):
    budget, info, _ = _budget(allocator, 0.4, unit)
    assert budget.spent(info) == pytest.approx(0.4, abs=1.5 / 32)


@pytest.mark.parametrize("allocator", ["global", "dp", "tyr"])
def test_redundant_layer_is_pruned_most(allocator):
    budget, _, by_layer = _budget(allocator)
    assert by_layer["fcs.1.weight"] == max(by_layer.values())
    assert by_layer["fcs.1.weight"] > 0.4
    if allocator == "tyr":  # its search measured the choice: less loss than the uniform ratios
        assert budget.search is not None and budget.search.measured_loss < budget.search.uniform_loss


def test_lamp_is_scale_invariant_per_layer():
    # LAMP ranks by the shape of each layer's score distribution, not its scale: the near-zero layer is not
    # singled out; the outlier layer (few large, many small scores) is pruned more than the uniform ones.
    _, _, by_layer = _budget("lamp")
    assert by_layer["fcs.1.weight"] < max(by_layer.values())
    assert by_layer["fcs.3.weight"] == max(by_layer.values())


def test_owl_protects_the_outlier_layer():
    _, _, by_layer = _budget("owl")
    assert by_layer["fcs.3.weight"] == min(by_layer.values())
    assert max(by_layer.values()) - min(by_layer.values()) == pytest.approx(2 * 0.08, abs=1e-6)


def test_prune_with_allocator_gives_uneven_layers():
    torch.manual_seed(0)
    model = Graded().eval()
    x = (torch.randn(8, 16),)
    report = sc.prune(model, x, ratio=0.4, allocate="dp", round_to=1)
    widths = [fc.out_features for fc in model.fcs]
    assert widths[1] == min(widths) and len(set(widths)) > 1
    assert model(x[0]).shape == (8, 32) and report.params_after < report.params_before


def test_cfsp_without_blocks_is_refused():
    with pytest.raises(BudgetError, match="residual blocks"):
        _budget("cfsp")


def test_allocator_errors():
    with pytest.raises(BudgetError, match="allocator"):
        AllocateBudget(0.3, "magic")
    with pytest.raises(BudgetError, match="budget ratio"):
        AllocateBudget(1.2, "global")


def test_ecoflap_zeroth_order_importance_protects_the_layer_that_matters():
    """Layers 0 and 1 barely reach the output (everything passes through layer 1's near-zero weights): their
    loss derivatives are tiny, so they are pruned most; the outlier layer 3 matters most."""
    budget, info, by_layer = _budget("ecoflap")
    assert by_layer["fcs.1.weight"] == pytest.approx(max(by_layer.values()), abs=1e-3)
    assert by_layer["fcs.0.weight"] == pytest.approx(max(by_layer.values()), abs=1e-3)
    assert by_layer["fcs.3.weight"] == min(by_layer.values())
    assert budget.spent(info) == pytest.approx(0.4, abs=1.5 / 32)


def test_zeroth_order_estimate_matches_autograd_taylor():
    from secateurs.passes.importance import default_loss

    torch.manual_seed(0)
    model = Graded().eval()
    x = torch.randn(8, 16)
    graph = sc.capture(model, (x,))
    AnalyzeDependencies()(graph)
    groups = list(graph.analysis(DependencyInfo).iter_groups())
    estimate = AllocateBudget(0.3, "ecoflap")._zeroth_order(graph, groups)
    model.zero_grad()
    default_loss(model(x)).backward()
    exact = [abs(sum(float((model.get_parameter(m.name) * model.get_parameter(m.name).grad).sum())
                     for m in g.members if m.is_param)) for g in groups]
    for est, ex in zip(estimate, exact):
        assert est == pytest.approx(ex, rel=2e-2, abs=1e-3 * max(exact))


def test_cfsp_follows_block_influence():
    model, inputs = _llama_like()
    graph = sc.capture(model, inputs)
    AnalyzeDependencies()(graph)
    ScoreChannels("l2")(graph)
    AllocateBudget(0.3, "cfsp", kinds=("ffn",))(graph)
    budget = graph.analysis(LayerBudget)
    info = graph.analysis(DependencyInfo)
    ratio = {next(m.name for m in info.groups[g].members).split(".")[2]: r for g, r in budget.ratios.items()}
    # layer 1's MLP output is zeroed: the block barely changes the stream, so its neurons go first
    assert ratio["1"] == max(ratio.values()) and budget.spent(info) == pytest.approx(0.3, abs=2 / 96)


def _llama_like():
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=120, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=40)
    model = tf.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(1e-3)
        model.model.layers[1].self_attn.o_proj.weight.mul_(1e-3)
    return model, {"input_ids": torch.randint(0, 120, (2, 12))}


@pytest.mark.parametrize("allocator", ["global", "owl", "dp", "cfsp"])
def test_per_structure_ratios_are_each_spread_over_their_own_groups(allocator):
    """prune(ffn=0.3, heads=0.5, allocate=...) removes 30% of all FFN neurons and half of all heads (it used to
    allocate the unset overall ratio, 0, and remove nothing)."""
    model, inputs = _llama_like()
    report = sc.prune(model, inputs, ffn=0.3, heads=0.5, allocate=allocator, round_to=1, check_outputs=False)
    ffn = [layer.mlp.up_proj.out_features for layer in model.model.layers]
    heads = [layer.self_attn.q_proj.out_features // 16 for layer in model.model.layers]
    assert sum(ffn) == pytest.approx(0.7 * 3 * 96, abs=2)
    assert sum(heads) == pytest.approx(0.5 * 3 * 4, abs=1)
    if allocator in ("global", "cfsp"):  # layer 1 barely changes the stream: its neurons go first
        assert ffn[1] == min(ffn) and len(set(ffn)) > 1
    assert report.params_after < report.params_before


def test_speedup_and_per_structure_ratios_do_not_mix():
    with pytest.raises(BudgetError, match="speedup"):
        AllocateBudget(0.3, "dp", unit="latency", latency=object(), speedup=1.5, kind_ratios={"ffn": 0.3})
    with pytest.raises(BudgetError, match="ffn"):
        AllocateBudget(0.0, "global", kind_ratios={"ffn": 1.5})


def test_the_hidden_size_is_not_allocated():
    """It is one group: an allocator would silently leave it whole."""
    model, inputs = _llama_like()
    with pytest.raises(BudgetError, match="hidden size is one group"):
        sc.prune(model, inputs, hidden=0.25, ffn=0.3, allocate="owl")
