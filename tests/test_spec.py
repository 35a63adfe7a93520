"""One option schema (secateurs.spec.PruneSpec) for every path: the same option gets the same answer from
``secateurs.prune``, recipes, the streamed ``prune_checkpoint``, ``prune_onnx`` and the command line, and the
schema, the CLI flags and the drivers' signatures cannot drift apart."""

import dataclasses
import inspect

import pytest
import torch

import secateurs as sc
from secateurs.cli import _parser
from secateurs.errors import BudgetError, RecipeError
from secateurs.recipe import parse_recipe
from secateurs.spec import OPTIONS, PATHS, WEIGHT_DEFAULT, PruneSpec, path_options
from secateurs.stream import StreamOptions, prune_checkpoint

from helpers import run_cli
from models import MLP


def _mlp_onnx(path, width=64):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    gen = torch.Generator().manual_seed(0)
    inits = [numpy_helper.from_array(torch.randn(16, width, generator=gen).numpy(), "w1"),
             numpy_helper.from_array(torch.randn(width, 4, generator=gen).numpy(), "w2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


# ------------------------------------------------------------------------------------------ one answer per option

@pytest.mark.parametrize(("options", "message"), [
    ({"ffn": 0.3, "sparsity_criterion": "wanda"}, r"sparsity_criterion='wanda' .* is read only by weight sparsity"),
    ({"nm": "2:4", "importance": "l1"}, r"importance='l1' \(--criterion l1\) is read only by width pruning"),
    ({"ffn": 0.3, "depth_criterion": "angular"}, r"depth_criterion='angular' .* read only by depth pruning"),
    ({"ffn": 0.3, "importance": "l2", "bias_compensation": True}, r"bias_compensation .* needs importance"),
    ({"ffn": 0.3, "sparsity_criterion": "flap"}, r"'flap' is a criterion of importance; use importance='flap'"),
    ({"ffn": 1.5}, r"ffn ratio must be in \[0, 1\)"),
    ({"nm": "two:four"}, r"nm must look like '2:4'"),
    ({"nm": "4:2"}, r"N:M needs 0 < N < M"),
    ({"ffn": 0.3, "round_to": 0}, r"round_to must be an integer >= 1"),
    ({"ffn": 0.3, "importance": "l3"}, r"unknown importance .*'l3'.*did you mean 'l2' or 'l1'"),
])
def test_the_same_mistake_gets_the_same_answer_in_memory_in_recipes_and_streamed(options, message):
    with pytest.raises(BudgetError, match=message):
        sc.prune(MLP(), (torch.randn(2, 16),), **options)
    with pytest.raises(RecipeError, match=message):
        parse_recipe({"passes": [{"prune": options}]})
    with pytest.raises(BudgetError, match=message):
        StreamOptions(**options)
    with pytest.raises(BudgetError, match=message):
        PruneSpec.parse(options, path="stream")


def test_a_streamed_prune_refuses_what_it_used_to_ignore(tmp_path):
    # before the schema only the command line checked these; prune_checkpoint(**options) ran without them
    with pytest.raises(BudgetError, match=r"sparsity_criterion='sparsegpt' .* is read only by weight sparsity"):
        prune_checkpoint(tmp_path / "src", tmp_path / "out", ffn=0.25, sparsity_criterion="sparsegpt")
    with pytest.raises(BudgetError, match=r"expert_importance='mass' is read only by expert pruning"):
        StreamOptions(ffn=0.25, expert_importance="mass")
    with pytest.raises(BudgetError, match=r"budget_unit= is read by the budget allocator only"):
        StreamOptions(ffn=0.25, budget_unit="params")
    assert not (tmp_path / "out").exists()


def test_unknown_options_name_the_closest_one():
    with pytest.raises(BudgetError, match=r"prune\(\): unknown option 'fnn' \(did you mean 'ffn'\?\)"):
        sc.prune(MLP(), (torch.randn(2, 16),), fnn=0.3)
    with pytest.raises(RecipeError, match=r"'sparsity_critrion' is not an option of prune; did you mean "
                                          r"'sparsity_criterion'"):
        parse_recipe({"passes": [{"prune": {"nm": "2:4", "sparsity_critrion": "wanda"}}]})


@pytest.mark.parametrize(("path", "options", "message"), [
    ("stream", {"channels": 0.3}, r"channels \(--channels\) does not apply to a streamed prune"),
    ("stream", {"ratio": 0.3}, r"ratio does not apply to a streamed prune"),
    ("stream", {"ffn": 0.3, "allocate": "ecoflap"}, r"allocate='ecoflap' .* cannot run in a streamed prune.*whole "
                                                    r"model's loss"),
    ("stream", {"layers": 1, "depth_criterion": "greedy"}, r"depth_criterion='greedy' .* needs the whole PyTorch "
                                                           r"model at once, which a streamed prune .* choose from "
                                                           r"bi, angular$"),
    ("stream", {"nm": "2:4", "sparsity_criterion": "global_magnitude"}, r"choose from magnitude, wanda, sparsegpt$"),
    ("stream", {"ffn": 0.3, "importance": "taylor"}, r"importance 'taylor' needs gradients of a loss"),
    ("stream", {"hidden": True}, r"give the hidden fraction"),
    ("onnx", {"sparsity": 0.5}, r"sparsity \(--sparsity\) does not apply to an ONNX file; it takes ratio, "
                                r"heads \(--heads\)"),
    ("onnx", {"ffn": 0.3, "importance": "flap"}, r"importance 'flap' needs calibration batches"),
    ("onnx", {"ffn": 0.3, "bias_compensation": True}, r"bias_compensation \(--bias-compensation\) does not apply"),
    ("memory", {"ffn": 0.3, "allocate": "tyrr"}, r"unknown allocate \(--allocate\) 'tyrr'.*did you mean 'tyr'.*; "
                                                 r"choose from global"),
])
def test_each_path_refuses_what_it_cannot_do_with_the_reason(path, options, message):
    with pytest.raises(BudgetError, match=message):
        PruneSpec.parse(options, path=path)


def test_defaults_are_resolved_once_for_every_path():
    spec = PruneSpec.parse({"ffn": 0.3})
    assert spec.resolved(calibrated=True).importance == "flap" and spec.resolved(calibrated=True).bias_compensation
    assert spec.resolved(calibrated=False).importance == WEIGHT_DEFAULT
    assert not spec.resolved(calibrated=False).bias_compensation
    assert PruneSpec.parse({"ffn": 0.3}, path="onnx").resolved(calibrated=True, path="onnx").importance == "l2"
    hidden = PruneSpec.parse({"hidden": 0.25}, path="stream").resolved(calibrated=True, path="stream")
    assert hidden.importance == WEIGHT_DEFAULT  # the hidden size is scored by weights on every path
    only_sparse = PruneSpec.parse({"nm": "2:4"}, path="stream").resolved(calibrated=True, path="stream")
    assert only_sparse.importance is None and only_sparse.pattern == (2, 4)
    assert PruneSpec.parse({"ffn": 0.3}).default_ratio == 0.0 and PruneSpec().default_ratio == 0.3
    assert PruneSpec(layers=2.0).layers == 2 and isinstance(PruneSpec(layers=2.0).layers, int)


def test_an_onnx_file_rounds_like_a_module(tmp_path):
    pytest.importorskip("onnxruntime")
    from secateurs.onnx_prune import prune_onnx

    src = _mlp_onnx(tmp_path / "m.onnx", width=64)
    onnx_report = prune_onnx(src, tmp_path / "p.onnx", ffn=0.3)  # round_to defaults to 8, as in memory
    model = MLP(64)
    report = sc.prune(model, (torch.randn(2, 16),), ffn=0.3, check_outputs=False)
    assert [(c.before, c.after) for c in onnx_report.changes] == [(c.before, c.after) for c in report.changes]
    assert [(c.before, c.after) for c in report.changes] == [(64, 48)]  # 64 * 0.7 = 44.8 -> 48 (a multiple of 8)


# ------------------------------------------------------------------------------------------ the command line

def test_cli_onnx_takes_every_pruning_flag_its_path_takes(capsys, tmp_path):
    pytest.importorskip("onnxruntime")
    src = _mlp_onnx(tmp_path / "m.onnx")
    code, data, err = run_cli(capsys, "prune", str(src), "--out", str(tmp_path / "p.onnx"), "--ffn", "0.3",
                           "--scope", "global", "--criterion", "l1")  # --scope was refused before the schema
    assert code == 0, err
    code, data, err = run_cli(capsys, "prune", str(src), "--out", str(tmp_path / "q.onnx"), "--sparsity", "0.5")
    assert code == 2 and "an ONNX source supports --heads --kv-groups --ffn --channels --hidden" in data["error"]
    assert "not --sparsity" in data["error"] and not (tmp_path / "q.onnx").exists()
    code, data, err = run_cli(capsys, "prune", str(src), "--out", str(tmp_path / "q.onnx"), "--ffn", "0.3",
                           "--criterion", "flap")
    assert code == 2 and "needs calibration batches" in data["error"], data


def test_every_schema_flag_is_a_cli_flag_and_every_pruning_flag_is_in_the_schema():
    prune = next(a for a in _parser()._subparsers._group_actions[0].choices.items() if a[0] == "prune")[1]
    flags = {s for action in prune._actions for s in action.option_strings}
    schema_flags = {opt.flag for opt in OPTIONS.values() if opt.flag}
    assert schema_flags <= flags, schema_flags - flags
    group = next(g for g in prune._action_groups if g.title.startswith("pruning flags"))
    pruning = {s for action in group._group_actions for s in action.option_strings if s.startswith("--")}
    assert pruning - schema_flags <= {"--low-rank", "--recover", "--recover-mode", "--no-bias-compensation"}


def test_the_drivers_take_exactly_the_options_the_schema_gives_their_path():
    stream_fields = {f.name for f in dataclasses.fields(StreamOptions)}
    assert set(path_options("stream")) <= stream_fields
    assert stream_fields - set(OPTIONS) == {"block", "damp", "chunk_bytes", "max_shard_bytes", "expert_layout"}
    assert {f.name for f in dataclasses.fields(PruneSpec)} == set(OPTIONS)
    pytest.importorskip("onnx_ir")
    from secateurs.onnx_prune import prune_onnx

    params = set(inspect.signature(prune_onnx).parameters) - {"src", "dst", "input_shapes", "verify"}
    assert params == set(path_options("onnx"))
    assert set(PATHS) == {"memory", "stream", "onnx"} and path_options("memory") == list(OPTIONS)


def test_a_misspelt_flag_gets_the_closest_one(capsys):
    code, data, err = run_cli(capsys, "prune", "src", "--out", "dst", "--fnn", "0.3")
    assert code == 2 and "unrecognized arguments: --fnn 0.3 (did you mean --ffn?)" in err
    assert data == {"error": "invalid command line (see standard error)", "exit_code": 2}
