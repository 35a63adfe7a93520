"""Recipes: YAML pass lists validated step by step, and the same result as the Python API."""

import copy

import pytest
import torch
import yaml

import secateurs as sc
from secateurs.api import run_passes
from secateurs.errors import RecipeError
from secateurs.recipe import build_passes, load_recipe, parse_recipe

from zoo import build

GOOD = """
seed: 3
calib: {source: none, samples: 4, seq_len: 16}
passes:
  - RemoveBlocks: {amount: 1, criterion: bi}
  - AnalyzeDependencies
  - ScoreChannels: {criterion: l2}
  - PruneChannels: {heads: 0.5, ffn: 0.25, round_to: 1}
  - AnalyzeDependencies
  - SparsifyWeights: {nm: "2:4"}
"""


def test_recipe_round_trips_and_runs(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(GOOD)
    recipe = load_recipe(path)
    assert recipe.seed == 3 and recipe.calib["samples"] == 4 and len(recipe.steps) == 6
    again = parse_recipe(yaml.safe_load(yaml.safe_dump(recipe.to_dict())))
    assert again.steps == recipe.steps
    model, inputs = build("bert")
    report = run_passes(model, inputs, build_passes(recipe, model))
    assert len(model.encoder.layer) == 1 and report.depth and report.sparsity.pattern == "2:4"
    assert {c.kind for c in report.changes} == {"heads", "ffn"}
    assert [name for name, _ in report.passes] == [s.name for s in recipe.steps]


def test_prune_step_equals_the_python_api():
    model, inputs = build("llama")
    twin = copy.deepcopy(model)
    recipe = parse_recipe({"passes": [{"prune": {"ffn": 0.25, "kv_groups": 0.5, "round_to": 1}}]})
    via_recipe = run_passes(model, inputs, build_passes(recipe, model))
    via_api = sc.prune(twin, inputs, ffn=0.25, kv_groups=0.5, round_to=1)
    assert via_recipe.params_after == via_api.params_after < via_api.params_before
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, twin(**inputs).logits, rtol=0, atol=0)


@pytest.mark.parametrize(("recipe", "message"), [
    ({"passes": [{"PruneChanels": {}}]}, "unknown pass 'PruneChanels'; did you mean 'PruneChannels'"),
    ({"passes": [{"RemoveBlocks": {"ratio": 0.3}}]}, "'ratio' is not an option of RemoveBlocks; it is an option of"),
    ({"passes": [{"prune": {"heds": 0.3}}]}, "did you mean 'heads'"),
    ({"passes": ["AnalyzeDependencies", "ScoreChannels", {"PruneChannels": {"ratio": 1.5}}]},
     r"step 3 \(PruneChannels\): ratio must be in \[0, 1\)"),
    ({"passes": [{"PruneExperts": {"ratio": -0.1}}]}, "step 1 .*experts ratio"),
    ({"passes": [{"PruneChannels": {"heads": 0.5}}]}, "needs DependencyInfo, which AnalyzeDependencies provides"),
    ({"passes": ["AnalyzeDependencies", {"PruneChannels": {"ffn": 0.5}}]}, "needs ChannelScores, which ScoreChannels"),
    ({"passes": ["AnalyzeDependencies", "ScoreChannels", {"PruneChannels": {"ffn": 0.5}}, "ScoreChannels"]},
     r"step 4 \(ScoreChannels\) needs DependencyInfo"),
    ({"passes": [{"SparsifyWeights": {"nm": "2-4"}}]}, "nm must look like '2:4'"),
    ({"passes": [{"RemoveBlocks": {"amount": 1, "criterion": "magic"}}]}, "unknown depth criterion"),
    ({"passes": [{"RemoveBlocks": "fast"}]}, "options must be a mapping"),
    ({"passes": [{"A": {}, "B": {}}]}, "one-key mapping"),
    ({"passes": []}, "non-empty list"),
    ({"pases": []}, "unknown top-level key"),
    ({"passes": ["AnalyzeDependencies"], "calib": {"samples": 0}}, "calib.samples must be a positive integer"),
    ({"passes": ["AnalyzeDependencies"], "seed": "x"}, "seed must be an integer"),
    ([1, 2], "a recipe is a mapping"),
    ({"passes": [{"prune": {"ffn": 0.3, "latency_cache": "../../etc/cron.d/x"}}]}, "recipes cannot choose where"),
])
def test_each_mistake_has_a_clear_message(recipe, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe(recipe)


def test_files_are_read_safely(tmp_path):
    with pytest.raises(RecipeError, match="cannot read recipe"):
        load_recipe(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("passes: [unclosed")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)
    evil = tmp_path / "evil.yaml"
    evil.write_text("passes: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(evil)


def test_recover_step_trains_against_the_dense_model_and_reports_the_curve(tmp_path):
    from pathlib import Path

    from secateurs.convert import report_dict
    from secateurs.report import write_report

    model, inputs = build("llama")
    gen = torch.Generator().manual_seed(0)
    calib = [{"input_ids": torch.randint(0, 120, (2, 12), generator=gen)} for _ in range(4)]
    for batch in calib:
        batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    recipe = parse_recipe({"passes": [{"prune": {"ffn": 0.25, "round_to": 1}},
                                      {"Recover": {"steps": 3, "eval_every": 1, "lr": 1e-3}}]})
    report = run_passes(model, inputs, build_passes(recipe, model, calib=calib))
    assert report.recovery.steps == 3 and len(report.recovery.evaluations) >= 2
    assert model.model.layers[0].mlp.up_proj.out_features < 96  # pruned shapes kept through training
    written = write_report(tmp_path, report_dict(report, {}, Path("llama"), recipe=recipe))
    assert "recovery.png" in written and "id='recovery'" in (tmp_path / "report.html").read_text()
    with pytest.raises(RecipeError, match="needs calibration text"):
        build_passes(recipe, model, calib=None)
    with pytest.raises(RecipeError, match="Recover"):
        parse_recipe({"passes": [{"Recover": {"steps": 3, "mode": "magic"}}]})
