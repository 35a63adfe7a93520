"""Depth pruning: blocks and sublayers, exactness on identity blocks, generate, checkpoints, criteria."""

import pytest
import torch
import transformers as tf

import secateurs as sc
from secateurs.errors import BudgetError
from secateurs.passes import RemoveBlocks, ZeroSublayer, find_blocks

from helpers import call, first_tensor
from zoo import build


def _llama4():
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=120, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=40)
    return tf.LlamaForCausalLM(cfg).eval(), {"input_ids": torch.randint(0, 120, (2, 12))}


def test_identity_block_is_found_and_removed_exactly():
    model, inputs = _llama4()
    with torch.no_grad():  # layer 2's residual branches output zero: the block is an identity
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    ref = first_tensor(call(model, inputs))
    report = sc.prune(model, inputs, layers=1)
    (record,) = report.depth
    assert record.removed[0][0] == "model.layers.2" and record.removed[0][1] == pytest.approx(0, abs=1e-6)
    assert len(model.model.layers) == 3 and model.config.num_hidden_layers == 3
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2]
    torch.testing.assert_close(first_tensor(call(model, inputs)), ref, atol=1e-5, rtol=1e-5)
    assert "model.layers.2" in record.table() and "yes" in record.table()


def test_zeroed_sublayer_is_removed_exactly_and_reloads(tmp_path):
    model, inputs = _llama4()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.zero_()
    ref = first_tensor(call(model, inputs))
    report = sc.prune(model, inputs, sublayers=1, depth_criterion="greedy")
    assert report.depth[0].removed[0][0] == "model.layers.1.mlp"
    assert isinstance(model.model.layers[1].mlp, ZeroSublayer)
    torch.testing.assert_close(first_tensor(call(model, inputs)), ref, atol=1e-5, rtol=1e-5)
    sc.save_pretrained(model, tmp_path / "m")
    loaded = sc.load_pretrained(tmp_path / "m")
    assert isinstance(loaded.model.layers[1].mlp, ZeroSublayer)
    assert torch.equal(first_tensor(call(loaded, inputs)), first_tensor(call(model, inputs)))


@pytest.mark.parametrize("criterion", ["bi", "angular", "greedy"])
def test_llama_blocks_then_generate_and_reload(criterion, tmp_path):
    model, inputs = _llama4()
    report = sc.prune(model, inputs, layers=0.25, depth_criterion=criterion, ffn=0.25)
    assert len(model.model.layers) == 3 and report.changes  # depth first, then width (COMP-style)
    out = model.generate(inputs["input_ids"][:1, :4], max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert out.shape == (1, 9)
    ref = first_tensor(call(model, inputs))
    result = sc.save_pretrained(model, tmp_path / "m")
    assert result.plain_loadable
    plain = tf.LlamaForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert torch.equal(first_tensor(call(plain, inputs)), ref)


def test_angular_removes_consecutive_blocks():
    model, inputs = _llama4()
    report = sc.prune(model, inputs, layers=2, depth_criterion="angular")
    names = [n for n, _ in report.depth[0].removed]
    idx = [int(n.rsplit(".", 1)[1]) for n in names]
    assert idx[1] == idx[0] + 1 and len(model.model.layers) == 2


@pytest.mark.parametrize("name", ["bert", "gpt2", "vit"])
def test_zoo_blocks_removed_and_reload(name, tmp_path):
    model, inputs = build(name)
    before = first_tensor(call(model, inputs)).shape
    report = sc.prune(model, inputs, layers=1)
    assert report.params_after < report.params_before
    ref = first_tensor(call(model, inputs))
    assert ref.shape == before
    sc.save_pretrained(model, tmp_path / "m")
    assert torch.equal(first_tensor(call(sc.load_pretrained(tmp_path / "m"), inputs)), ref)
    if name == "gpt2":
        out = model.generate(inputs["input_ids"][:1, :4], max_new_tokens=4, min_new_tokens=4, do_sample=False)
        assert out.shape == (1, 8) and len(model.transformer.h) == 1


def test_resnet_blocks_with_matching_shapes_only(tmp_path):
    torch.manual_seed(0)
    model = tf.ResNetModel(tf.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[3, 2])).eval()
    x = (torch.randn(2, 3, 32, 32),)
    blocks = find_blocks(model, x, {}, sc.capture(model, x))
    # stage 1's first block changes the shape (and has a projection shortcut); the others are residual
    assert blocks == ["encoder.stages.0.layers.0", "encoder.stages.0.layers.1", "encoder.stages.0.layers.2",
                      "encoder.stages.1.layers.1"]
    ref_shape = call(model, x).last_hidden_state.shape
    sc.prune(model, x, layers=0.25)
    assert call(model, x).last_hidden_state.shape == ref_shape
    assert sum(len(s.layers) for s in model.encoder.stages) == 4
    assert len(model.encoder.stages[1].layers) >= 1 and model.encoder.stages[1].layers[0].shortcut is not None
    ref = call(model, x).last_hidden_state
    sc.save_pretrained(model, tmp_path / "resnet")
    assert torch.equal(call(sc.load_pretrained(tmp_path / "resnet"), x).last_hidden_state, ref)


def test_depth_budget_errors():
    model, inputs = _llama4()
    with pytest.raises(BudgetError, match="at least one must stay"):
        sc.prune(model, inputs, layers=4)
    with pytest.raises(BudgetError, match="depth criterion"):
        RemoveBlocks(1, "entropy")


def test_depth_plot_is_written(tmp_path):
    from secateurs.report import plot_depth

    model, inputs = _llama4()
    report = sc.prune(model, inputs, layers=1)
    out = plot_depth(report.depth[0], tmp_path / "plots" / "depth.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.parent.iterdir()] == ["depth.png"]
