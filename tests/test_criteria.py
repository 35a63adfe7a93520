"""Channel criteria live in one registry: every path (in memory, streamed, ONNX, CLI) offers what its inputs allow,
refuses the rest with the reason, and a criterion added as one class is offered by all of them."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import secateurs as sc
from secateurs.backends.onnx import export_onnx
from secateurs.errors import BudgetError
from secateurs.passes import AnalyzeDependencies, ChannelScores, PassManager, ScoreChannels
from secateurs.passes import criteria as registry
from secateurs.passes.criteria import WeightCriterion, channel_criterion, criteria_names


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


def _hidden_scores(model, criterion):
    graph = sc.capture(model, (torch.randn(2, 8),))
    PassManager([AnalyzeDependencies(), ScoreChannels(criterion)])(graph)
    scores = graph.analysis(ChannelScores).scores
    assert len(scores) == 1
    return next(iter(scores.values()))


def test_the_registry_says_what_each_criterion_needs():
    assert criteria_names() == ("l1", "l2", "maw", "random", "taylor", "activation", "flap")
    assert criteria_names(("weights",)) == ("l1", "l2", "maw", "random")
    assert criteria_names(("weights", "calibration")) == ("l1", "l2", "maw", "random", "activation", "flap")
    with pytest.raises(BudgetError, match="did you mean 'l2' or 'l1'"):
        channel_criterion("l3")
    with pytest.raises(BudgetError, match="needs calibration batches .* an ONNX file"):
        channel_criterion("flap", needs=("weights",), where="an ONNX file")
    with pytest.raises(BudgetError, match="needs gradients of a loss"):
        channel_criterion("taylor", needs=("weights", "calibration"))


def test_weight_criteria_score_what_they_say():
    """The hidden channels of Linear(8, 16) -> Linear(16, 4): each owns a row and a bias of the first layer and a
    column of the second; the scores are those sums, roots and maxima, computed here by hand."""
    model = _mlp()
    w1, b1, w2 = (t.detach().double() for t in (model[0].weight, model[0].bias, model[2].weight))
    owned = [torch.cat([w1[j], b1[j:j + 1], w2[:, j]]) for j in range(16)]
    want = {"l1": [float(o.abs().sum()) for o in owned],
            "l2": [float(o.pow(2).sum().sqrt()) for o in owned],
            "maw": [float(o.abs().max()) for o in owned]}
    for name, values in want.items():
        np.testing.assert_allclose(_hidden_scores(model, name), values, rtol=1e-5)
    first, again = _hidden_scores(model, "random"), _hidden_scores(_mlp(), "random")
    assert first.shape == (16,) and np.array_equal(first, again)  # fixed by the group, whatever the weights
    assert len(set(first.tolist())) == 16


def test_random_is_offered_in_memory_streamed_onnx_and_by_the_cli(tmp_path, capsys):
    import transformers as tf

    from secateurs.cli import main
    from secateurs.onnx_prune import prune_onnx
    from secateurs.stream import prune_checkpoint

    model = _mlp()
    x = (torch.randn(2, 8),)
    kept = []
    for _ in range(2):
        pruned = copy.deepcopy(model)
        report = sc.prune(pruned, x, ratio=0.5, importance="random", round_to=1)
        assert pruned[0].out_features == 8 and report.params_after < report.params_before
        kept.append(pruned[0].weight.detach().clone())
    assert torch.equal(*kept)  # the same channels on every run

    export_onnx(model, x, tmp_path / "m.onnx")
    onnx_report = prune_onnx(tmp_path / "m.onnx", tmp_path / "p.onnx", ratio=0.5, importance="random", round_to=1)
    assert [(c.before, c.after) for c in onnx_report.changes] == [(16, 8)]

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=120, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    llama = tf.LlamaForCausalLM(cfg).eval()
    llama.save_pretrained(tmp_path / "src")
    options = {"ffn": 0.25, "heads": 0.5, "hidden": 0.25, "importance": "random", "round_to": 1}
    report = prune_checkpoint(tmp_path / "src", tmp_path / "s1", **options)
    assert {(b, a) for n, b, a in report.widths if "mlp" in n} == {(128, 96)}
    streamed = sc.load_pretrained(tmp_path / "s1")
    assert streamed.config.hidden_size == 48
    sc.prune(llama, {"input_ids": torch.randint(0, 120, (2, 8))}, **options)  # the same draws in memory
    want = llama.state_dict()
    assert streamed.state_dict().keys() == want.keys()
    assert all(torch.equal(v, want[k]) for k, v in streamed.state_dict().items())

    assert main(["prune", str(tmp_path / "src"), "--out", str(tmp_path / "cli"), "--ffn", "0.25", "--criterion",
                 "random", "--calib", "none", "--quiet"]) == 0
    assert main(["prune", str(tmp_path / "m.onnx"), "--out", str(tmp_path / "cli.onnx"), "--ffn", "0.5",
                 "--criterion", "flap", "--quiet"]) == 2
    assert "an ONNX file does not have" in capsys.readouterr().err


class _Smallest(WeightCriterion):
    """The opposite of l1: the smallest weights score highest (so the largest are removed)."""

    name = "anti_l1"
    summary = "minus the sum of |w|"

    def per_position(self, weight, dim):
        return -registry.L1().per_position(weight, dim)


def test_a_criterion_added_as_one_class_is_offered_by_every_path(tmp_path, monkeypatch):
    monkeypatch.setitem(registry._REGISTRY, "anti_l1", _Smallest())
    from secateurs.onnx_prune import prune_onnx

    model = _mlp()
    x = (torch.randn(2, 8),)
    l1 = _hidden_scores(model, "l1")
    pruned = copy.deepcopy(model)
    sc.prune(pruned, x, ratio=0.5, importance="anti_l1", round_to=1)
    smallest = np.sort(np.argsort(l1)[:8])  # what anti_l1 keeps: the 8 channels with the smallest l1
    torch.testing.assert_close(pruned[0].weight, model[0].weight[torch.from_numpy(smallest)], rtol=0, atol=0)
    export_onnx(model, x, tmp_path / "m.onnx")
    report = prune_onnx(tmp_path / "m.onnx", tmp_path / "p.onnx", ratio=0.5, importance="anti_l1", round_to=1)
    assert [(c.before, c.after) for c in report.changes] == [(16, 8)]
    from secateurs.stream import StreamOptions

    assert StreamOptions(ffn=0.25, importance="anti_l1").importance == "anti_l1"
    with pytest.raises(BudgetError, match="did you mean 'anti_l1'"):
        sc.prune(copy.deepcopy(model), x, ratio=0.5, importance="anti_l")
