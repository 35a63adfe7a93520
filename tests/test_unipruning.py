"""UniPruning: the anchor alone is Wanda, the budget is met exactly, the controller follows the global loss."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import secateurs as sc
from secateurs.errors import BudgetError
from secateurs.passes import check_nm
from secateurs.passes.sparse_masks import _nm_mask, _unstructured_mask
from secateurs.passes.unipruning import search_masks


class TwoBranches(nn.Module):
    """``head(a(x) + scale * b(x))`` with ``b`` a copy of ``a``: equal local saliencies, ``1 / scale`` times less
    weight of ``b`` in the output (the head, an output layer, stays dense)."""

    def __init__(self, scale: float = 0.01) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 32)
        with torch.no_grad():
            self.b.load_state_dict(self.a.state_dict())
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.a(x) + self.scale * self.b(x))


def _llama():
    import transformers as tf

    cfg = tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    return tf.LlamaForCausalLM(cfg).eval()


def _batches(n: int = 3) -> list[dict[str, torch.Tensor]]:
    return [{"input_ids": torch.randint(0, 64, (2, 16))} for _ in range(n)]


def test_without_feedback_the_masks_are_the_anchors_masks():
    """Oracle: with both steps at zero the search keeps its anchor and the uniform allocation, so its masks
    are Wanda's per-row masks (and Wanda's N:M masks) of the same scores, exactly."""
    model = TwoBranches(0.5).eval()
    x = torch.randn(8, 32)
    targets = [("a", model.a), ("b", model.b)]
    anchors = {n: m.weight.detach().abs() * torch.rand(1, 32) for n, m in targets}
    calls = [((x,), {})]
    masks, search = search_masks(model, targets, anchors, calls, ratio=0.5, nm=None, eta=0.0, eta_c=0.0)
    for name, _ in targets:
        assert torch.equal(masks[name], _unstructured_mask(anchors[name], 0.5, per_row=True))
    assert search.measured_loss == pytest.approx(search.anchor_loss)
    masks, _ = search_masks(model, targets, anchors, calls, ratio=0.0, nm=(2, 4), eta=0.0, eta_c=0.0)
    for name, _ in targets:
        assert torch.equal(masks[name], _nm_mask(anchors[name], 2, 4))


def test_the_controller_moves_sparsity_to_the_branch_the_output_barely_sees():
    """Oracle by construction: ``b`` is ``a`` scaled by 0.01 in the output, so its marginal weights cost 100x
    less and the controller takes the whole band from it (a at 40%, b at 60% for a 50% budget); the chosen masks
    then measure a lower loss than the anchor's uniform ones."""
    model = TwoBranches(0.01).eval()
    calib = [(torch.randn(16, 32),) for _ in range(4)]
    report = sc.prune(model, calib[0], sparsity=0.5, allocate="unipruning", calib=calib)
    per = dict(report.sparsity.layers)
    assert per == {"a": 410 / 1024, "b": 614 / 1024}  # the band's edge in whole weights: 614 = floor(0.6 * 1024)
    search = report.sparsity.search
    assert search is not None and search.measured_loss < 0.9 * search.anchor_loss
    assert report.sparsity.criterion == "wanda"  # the method's anchor when no criterion is named


@pytest.mark.parametrize("ratio", [0.5, 0.37])
def test_the_budget_is_met_exactly_and_every_layer_stays_in_its_band(ratio):
    model = _llama()
    report = sc.prune(model, _batches(1)[0], sparsity=ratio, allocate="unipruning", calib=_batches())
    layers = dict(report.sparsity.layers)
    weights = {n: model.get_submodule(n).weight for n in layers}
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    total = sum(w.numel() for w in weights.values())
    assert zeros == round(total * ratio)
    assert all(ratio - 0.1 - 1e-9 <= v <= ratio + 0.1 + 1e-9 for v in layers.values())
    assert len(set(round(v, 3) for v in layers.values())) > 1  # the allocation is not uniform
    assert dict(report.sparsity.search.layer_ratios) == pytest.approx(layers)


def test_nm_masks_keep_the_pattern_and_the_report_records_the_search(tmp_path):
    model = _llama()
    report = sc.prune(model, _batches(1)[0], nm="2:4", allocate="unipruning", calib=_batches())
    names = [n for n, _ in report.sparsity.layers]
    assert len(names) == 14 and check_nm(model, 2, 4, names) == []
    search = report.sparsity.search
    assert len(search.losses) == search.steps == 16 and search.seconds > 0
    assert "unipruning search: 16 steps" in str(report)
    from secateurs.convert import report_dict
    from secateurs.report import write_report

    data = report_dict(report, {}, tmp_path)
    assert data["sparsity"]["search"]["steps"] == 16
    write_report(tmp_path, json.loads(json.dumps(data)))
    assert "UniPruning search" in (tmp_path / "report.html").read_text()


@pytest.mark.parametrize(("options", "match"), [
    ({"ffn": 0.3, "allocate": "unipruning"}, r"allocate='unipruning' \(--allocate unipruning\) is read only by "
                                             r"weight sparsity"),
    ({"sparsity": 0.5, "allocate": "unipruning", "sparsity_criterion": "sparsegpt"}, "wanda or magnitude"),
    ({"sparsity": 0.5, "allocate": "unipruning", "sequential": True}, "drop sequential"),
    ({"sparsity": 0.5, "allocate": "unipruning", "sparsity_allocate": "owl"}, "give one"),
    ({"sparsity": 0.5, "allocate": "unipruning", "ffn": 0.3, "budget_unit": "params"}, "unipruning allocates weight sparsity"),
])
def test_what_unipruning_cannot_do_is_refused(options, match):
    with pytest.raises(BudgetError, match=match):
        sc.prune(_llama(), _batches(1)[0], **options)


def test_its_step_count_is_refused_with_another_allocator():
    from secateurs.passes.sparsity import SparsifyWeights

    with pytest.raises(BudgetError, match="unipruning_steps=8 is read by allocate='unipruning' only"):
        SparsifyWeights(0.5, allocate="owl", unipruning_steps=8)


def test_a_layer_that_already_carries_a_mask_is_named():
    from torch.nn.utils import prune as torch_prune

    model = TwoBranches().eval()
    torch_prune.random_unstructured(model.a, "weight", 0.2)
    x = torch.randn(4, 32)
    with pytest.raises(BudgetError, match="layer 'a' has no plain weight parameter"):
        search_masks(model, [("a", model.a)], {"a": torch.ones(32, 32)}, [((x,), {})], ratio=0.5, nm=None)


def test_the_cli_takes_it_with_nm_and_refuses_it_streamed(llama_dir, tmp_path, capsys):
    from secateurs.cli import main

    out = tmp_path / "out"
    assert main(["prune", str(llama_dir), "--out", str(out), "--nm", "2:4", "--allocate", "unipruning", "--calib",
                 "none", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["sparsity"]["search"]["steps"] == 16 and data["sparsity"]["criterion"] == "wanda"
    reloaded = sc.load_pretrained(out)
    assert check_nm(reloaded, 2, 4, [n for n, _ in data["sparsity"]["layers"]]) == []
    assert main(["prune", str(llama_dir), "--out", str(tmp_path / "s"), "--stream", "--sparsity", "0.5",
                 "--allocate", "unipruning", "--calib", "none", "--json"]) == 2
    err = json.loads(capsys.readouterr().out)["error"]
    assert "unipruning" in err and "backpropagates" in err, err
    assert not (tmp_path / "s").exists()
