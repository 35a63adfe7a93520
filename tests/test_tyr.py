"""Týr allocation search: per-structure budgets met, the search recorded, refused where it cannot run."""

from __future__ import annotations

import json

import pytest
import torch

import secateurs as sc
from secateurs.errors import BudgetError
from secateurs.ir import DependencyInfo
from secateurs.passes import AllocateBudget, AnalyzeDependencies, LayerBudget, ScoreChannels


def _llama():
    import transformers as tf

    cfg = tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4)
    return tf.LlamaForCausalLM(cfg).eval()


def test_each_structure_meets_its_budget_and_the_report_records_the_search(tmp_path):
    """Oracle: each kind's budget spent in whole channels (at least the budget, less than one channel more),
    every ratio within the search's reach of the uniform one (two rounds: +-0.25 and one channel), and the search
    in the text, JSON and HTML reports."""
    model = _llama()
    calib = [{"input_ids": torch.randint(0, 64, (2, 16))} for _ in range(2)]
    graph = sc.capture(model, calib[0])
    AnalyzeDependencies()(graph)
    ScoreChannels("l2")(graph)
    AllocateBudget(0.0, "tyr", calib=calib, kind_ratios={"heads": 0.5, "ffn": 0.25})(graph)
    info = graph.analysis(DependencyInfo)
    budget = graph.analysis(LayerBudget)
    for kind, ratio in (("heads", 0.5), ("ffn", 0.25)):
        groups = [g for g in info.iter_groups() if g.kind == kind]
        counts = {g.id: budget.ratios[g.id] * g.size for g in groups}
        assert all(abs(c - round(c)) < 1e-9 for c in counts.values())  # whole channels
        removed = sum(counts[g.id] * budget.weights[g.id] for g in groups)
        need = ratio * sum(g.size * budget.weights[g.id] for g in groups)
        assert need - 1e-9 <= removed < need + max(budget.weights[g.id] for g in groups)
        assert all(abs(budget.ratios[g.id] - ratio) <= 0.25 + 2 / g.size + 1e-9 for g in groups)
    search = budget.search
    assert search is not None and len(search.rounds) == 2 and search.evaluations > 8
    report = sc.prune(_llama(), calib[0], calib=calib, heads=0.5, ffn=0.25, allocate="tyr", round_to=1)
    assert report.allocation is not None and "tyr allocation search: 2 rounds" in str(report)
    from secateurs.convert import report_dict
    from secateurs.report import write_report

    data = json.loads(json.dumps(report_dict(report, {}, tmp_path)))
    assert data["allocation"]["evaluations"] == report.allocation.evaluations
    write_report(tmp_path, data)
    assert "Allocation search" in (tmp_path / "report.html").read_text()


def test_it_is_refused_where_it_cannot_measure_the_whole_model(llama_dir, tmp_path, capsys):
    from secateurs.cli import main

    assert main(["prune", str(llama_dir), "--out", str(tmp_path / "s"), "--stream", "--ffn", "0.3", "--allocate",
                 "tyr", "--calib", "none", "--json"]) == 2
    err = json.loads(capsys.readouterr().out)["error"]
    assert "tyr" in err and "whole model's loss" in err, err
    with pytest.raises(BudgetError, match="tyr allocator measures the whole model's loss"):
        AllocateBudget(0.3, "tyr").allocate([], {}, {})
    assert not (tmp_path / "s").exists()


class _Mlp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = torch.nn.Linear(16, 48), torch.nn.Linear(48, 48), torch.nn.Linear(48, 8)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


@pytest.mark.parametrize("importance", ["flap", "l2"])
def test_the_search_measures_the_model_it_produces(importance):
    """Oracle: a candidate zeroes the channels the pruning pass removes and folds in the same bias compensation
    (flap), so the loss the search measures for its final allocation is the pruned model's own distance to the
    dense outputs on the calibration batches (up to float rounding of sums over fewer terms)."""
    import copy

    from secateurs.passes.unipruning import distill_loss

    dense = _Mlp().eval()
    model = copy.deepcopy(dense)
    calib = [(torch.randn(32, 16) + 1.0,) for _ in range(3)]  # a non-zero mean: compensation moves the biases
    report = sc.prune(model, calib[0], calib=calib, ratio=0.4, allocate="tyr", round_to=1, importance=importance)
    assert (report.compensated_biases > 0) == (importance == "flap")
    with torch.no_grad():
        real = sum(float(distill_loss(model(*c), dense(*c))) for c in calib) / len(calib)
    assert report.allocation.measured_loss == pytest.approx(real, rel=1e-4)
    assert report.allocation.measured_loss <= report.allocation.uniform_loss


def test_a_round_whose_offsets_round_to_the_same_count_still_searches():
    """Four heads at 30%: +-0.05 and +-0.025 all round back to one head; the whole neighbours are candidates
    too, so the search runs and spends the budget in whole heads (two of four, as dp does)."""
    import transformers as tf

    cfg = tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4)
    calib = [{"input_ids": torch.randint(0, 64, (2, 16))} for _ in range(2)]
    report = sc.prune(tf.LlamaForCausalLM(cfg).eval(), calib[0], calib=calib, heads=0.3, allocate="tyr",
                      round_to=1)
    assert [(c.before, c.after) for c in report.changes] == [(4, 2)]
    assert report.allocation.measured_loss <= report.allocation.uniform_loss
