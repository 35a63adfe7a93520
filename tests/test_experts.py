"""Mixture-of-experts: whole experts with router rows, neurons inside experts, exactness, checkpoints."""

import copy

import numpy as np
import pytest
import torch

import secateurs as sc
from secateurs.errors import BudgetError
from secateurs.passes import ExpertScores, PruneExperts, ScoreExperts, find_moe_blocks

from helpers import call, first_tensor
from zoo import mixtral, qwen2_moe


def _build(fn):
    torch.manual_seed(0)
    model, inputs = fn()
    return model.eval(), inputs


def test_moe_blocks_are_found():
    model, _ = _build(mixtral)
    blocks = find_moe_blocks(model)
    assert [b.name for b in blocks] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert all(b.num_experts == 8 and b.top_k == 2 and b.fused for b in blocks)


def test_unselected_experts_are_removed_exactly():
    """With 3 tokens and top-2 routing at most 6 of 8 experts are used; Mixtral renormalises the top-k."""
    model, _ = _build(mixtral)
    ids = {"input_ids": torch.randint(0, 120, (1, 3))}
    graph = sc.capture(model, ids)
    ScoreExperts("frequency")(graph)
    scores = graph.analysis(ExpertScores).scores
    assert all((s == 0).sum() >= 2 for s in scores.values())
    ref = first_tensor(call(model, ids))
    report = sc.prune(model, ids, experts=0.25)
    assert [(e.before, e.after) for e in report.experts] == [(8, 6), (8, 6)]
    for layer in model.model.layers:
        assert layer.mlp.gate.weight.shape == (6, 64) and layer.mlp.experts.gate_up_proj.shape[0] == 6
        assert layer.mlp.experts.num_experts == 6 and layer.mlp.gate.num_experts == 6
    torch.testing.assert_close(first_tensor(call(model, ids)), ref, atol=1e-6, rtol=1e-5)
    assert report.params_after < report.params_before


@pytest.mark.parametrize("fn", [mixtral, qwen2_moe])
def test_experts_and_expert_neurons_then_generate_and_reload(fn, tmp_path):
    model, inputs = _build(fn)
    # with expert_neurons= the experts are pruned per expert and ffn= prunes the dense MLPs only: Mixtral has none
    # (ffn= would select no group there and be refused); Qwen2-MoE's shared expert is one
    dense_ffn = {"ffn": 0.25} if fn is qwen2_moe else {}
    report = sc.prune(model, inputs, experts=0.5, expert_neurons=0.25, expert_importance="mass", **dense_ffn)
    blocks = find_moe_blocks(model)
    assert all(b.num_experts in (3, 4) and b.num_experts >= b.top_k for b in blocks)
    assert {e.what for e in report.experts} == {"experts", "neurons per expert"}
    out = model.generate(inputs["input_ids"][:1, :4], max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (1, 8)
    ref = first_tensor(call(model, inputs))
    result = sc.save_pretrained(model, tmp_path / "moe")
    loaded = sc.load_pretrained(tmp_path / "moe")
    assert torch.equal(first_tensor(call(loaded, inputs)), ref)
    assert result.plain_loadable


def test_top_k_is_kept_valid():
    model, inputs = _build(mixtral)
    sc.prune(model, inputs, experts=0.9)
    assert all(b.num_experts == b.top_k == 2 for b in find_moe_blocks(model))
    assert first_tensor(call(model, inputs)).shape == (2, 12, 120)


def test_expert_options_are_validated():
    with pytest.raises(BudgetError, match="experts ratio"):
        PruneExperts(1.0)
    with pytest.raises(BudgetError, match="expert criterion"):
        ScoreExperts("popularity")


def test_expert_removal_without_scores_is_refused():
    model, inputs = _build(mixtral)
    graph = sc.capture(model, inputs)
    with pytest.raises(sc.PassContractError, match="ExpertScores"):
        sc.PassManager([PruneExperts(0.5)])(graph)
    assert np.all([b.num_experts == 8 for b in find_moe_blocks(copy.deepcopy(model))])


def test_output_norm_is_zero_for_unused_experts_and_matches_frequency_support():
    model, _ = _build(mixtral)
    ids = {"input_ids": torch.randint(0, 120, (1, 3))}
    graph = sc.capture(model, ids)
    ScoreExperts("output_norm")(graph)
    norms = graph.analysis(ExpertScores).scores
    ScoreExperts("frequency")(graph)
    freq = graph.analysis(ExpertScores).scores
    for name in norms:
        assert ((norms[name] > 0) == (freq[name] > 0)).all()


@pytest.mark.parametrize("fn", [mixtral, qwen2_moe])
def test_moe_forward_with_and_without_masks_after_pruning(fn):
    model, inputs = _build(fn)
    sc.prune(model, inputs, experts=0.5, heads=0.5, **({"ffn": 0.25} if fn is qwen2_moe else {}))
    ids = inputs["input_ids"]
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    with torch.no_grad():
        masked = model(input_ids=ids, attention_mask=mask).logits
        plain = model(input_ids=ids).logits
    assert masked.shape == plain.shape == (2, 12, 120)
    torch.testing.assert_close(masked[1], plain[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("dtype", "ratio", "kept"), [(torch.float32, 0.3, 32), (torch.float32, 0.2, 40),
                                                     (torch.bfloat16, 0.3, 32)])
def test_fused_expert_neurons_keep_the_strides_grouped_mm_needs(dtype, ratio, kept):
    """torch's grouped_mm (how transformers runs fused experts) needs 16-byte strides: 48 neurons less 30% is 34,
    which it refuses; the count is rounded to a multiple of 8 neurons (16 bytes in bf16, which a model pruned in
    fp32 may be served in) and the model runs, in its dtype and in bf16."""
    model, inputs = _build(mixtral)
    model.to(dtype)
    assert model.model.layers[0].mlp.experts.down_proj.shape[2] == 48
    report = sc.prune(model, inputs, expert_neurons=ratio)
    assert {(e.before, e.after) for e in report.experts} == {(48, kept)}
    for layer in model.model.layers:
        assert layer.mlp.experts.down_proj.shape[2] == kept
        assert layer.mlp.experts.gate_up_proj.shape[1] == 2 * kept
    assert first_tensor(call(model, inputs)).shape == (2, 12, 120)
    assert first_tensor(call(model.to(torch.bfloat16), inputs)).shape == (2, 12, 120)


@pytest.mark.parametrize("fn", [mixtral, qwen2_moe])
def test_pruned_fused_experts_export_to_onnx_and_match_onnx_runtime(fn, tmp_path):
    """transformers 5 runs fused experts through grouped_mm, which has no ONNX conversion: the export goes through
    transformers' batched_mm instead, and ONNX Runtime must match the model as it runs (grouped_mm), which is
    what the model is left with."""
    pytest.importorskip("onnxruntime")
    from secateurs.backends.onnx import export_onnx, verify_onnx

    model, inputs = _build(fn)
    sc.prune(model, inputs, experts=0.25, heads=0.5)
    assert model.config._experts_implementation == "grouped_mm"
    result = export_onnx(model, inputs, tmp_path / "moe.onnx")
    assert model.config._experts_implementation == "grouped_mm"
    assert result.max_abs_error < 1e-4
    other = {"input_ids": torch.randint(0, 120, (3, 9))}  # another batch and length through the dynamic axes
    assert verify_onnx(tmp_path / "moe.onnx", model, (), other)[0] < 1e-4


@pytest.mark.parametrize("fn", [mixtral, qwen2_moe])
def test_ffn_prunes_fused_experts_through_grouped_mm_and_plain_loaders_reload_it(fn, tmp_path):
    """transformers 5 runs fused experts through grouped_mm: its rule makes their neurons one ffn group per layer
    (the same neurons leave every expert), rounded like any FFN, and the config says the new width."""
    import transformers as tf

    model, inputs = _build(fn)
    width = model.model.layers[0].mlp.experts.down_proj.shape[2]
    report = sc.prune(model, inputs, ffn=0.3)
    experts = [c for c in report.changes if ".experts." in c.name]
    assert len(experts) == 2 and all(c.kind == "ffn" and c.before == width for c in experts)
    kept = experts[0].after
    assert kept < width and kept % 8 == 0  # every sliced dim (gate_up's 2 x kept rows too) a multiple of 8
    for layer in model.model.layers:
        e = layer.mlp.experts
        assert e.gate_up_proj.shape[1] == 2 * kept and e.down_proj.shape[2] == kept and e.intermediate_dim == kept
    ref = first_tensor(call(model, inputs))
    result = sc.save_pretrained(model, tmp_path / "out")
    assert result.plain_loadable
    plain = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(first_tensor(call(plain, inputs)), ref, rtol=1e-5, atol=1e-6)


def test_expert_neurons_and_ffn_prune_each_ffn_once():
    model, inputs = _build(qwen2_moe)
    width = model.model.layers[0].mlp.experts.down_proj.shape[2]
    report = sc.prune(model, inputs, expert_neurons=0.25, ffn=0.25)
    assert {e.what for e in report.experts} == {"neurons per expert"}
    assert model.model.layers[0].mlp.experts.down_proj.shape[2] == report.experts[0].after < width
    assert not [c for c in report.changes if ".experts." in c.name]  # ffn= left the experts to expert_neurons=
    assert [c.kind for c in report.changes] == ["ffn", "ffn"]  # the shared experts
    assert any("pruned per expert by expert_neurons=" in f.reason for f in report.frozen)
    model, inputs = _build(mixtral)  # no dense FFN besides the experts: ffn= selects nothing and is refused
    with pytest.raises(BudgetError, match=r"ffn=0\.25 \(--ffn\) selects no prunable group in this model \(frozen: "
                                          r"expert neurons are pruned per expert by expert_neurons="):
        sc.prune(model, inputs, expert_neurons=0.25, ffn=0.25)
