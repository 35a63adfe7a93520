"""What is written is what was verified: every checkpoint is reloaded (as its manifest says it loads) and compared
with the verified model before it is renamed into place; factorised layers and size-derived constants survive.
"""

import json
import shutil

import pytest
import torch
import transformers as tf

import secateurs as sc
from secateurs.backends.checkpoint import check_reload
from secateurs.cli import main
from secateurs.errors import VerificationError


def _low_rank_llama(path):
    """A Llama whose k / v projections have rank 4, so a 0.999-energy factorisation is exact and saves weights."""
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=120, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = tf.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.k_proj, layer.self_attn.v_proj):
                out_f, in_f = proj.weight.shape
                proj.weight.copy_(torch.randn(out_f, 4) @ torch.randn(4, in_f) / 8)
    sc.save_pretrained(model, path)
    return model


def _gemma(path):
    model = _gemma_model()
    sc.save_pretrained(model, path)
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_low_rank_checkpoints_reload_inspect_and_export(tmp_path, capsys):
    dense = _low_rank_llama(tmp_path / "src")
    out = tmp_path / "out"
    assert main(["prune", str(tmp_path / "src"), "--out", str(out), "--low-rank", "0.999", "--calib", "none",
                 "--quiet"]) == 0
    manifest = json.loads((out / "secateurs.json").read_text())
    assert manifest["plain_loadable"] is False
    assert {spec["type"] for spec in manifest["modules"].values()} == {"LowRankLinear"}
    reloaded = sc.load_pretrained(out)
    assert type(reloaded.model.layers[0].self_attn.k_proj).__name__ == "LowRankLinear"
    ids = torch.randint(0, 120, (2, 10))
    torch.testing.assert_close(_logits(reloaded, ids), _logits(dense, ids), atol=1e-4, rtol=1e-4)  # exact rank
    assert main(["inspect", str(out), "--quiet"]) == 0
    assert main(["export", str(out), "--onnx", str(tmp_path / "m.onnx"), "--quiet"]) == 0


def test_low_rank_that_saves_nothing_is_refused(llama_dir, tmp_path, capsys):
    # random weights have a flat spectrum: no rank below in*out/(in+out) keeps 99.9% of the energy
    code = main(["prune", str(llama_dir), "--out", str(tmp_path / "o"), "--low-rank", "0.999", "--calib", "none",
                 "--json"])
    assert code == 2 and "saves parameters in none" in json.loads(capsys.readouterr().out)["error"]
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("stream", [False, True])
def test_gemma_embed_scale_follows_the_pruned_hidden_size(tmp_path, stream):
    _gemma(tmp_path / "src")
    out = tmp_path / "out"
    argv = ["prune", str(tmp_path / "src"), "--out", str(out), "--hidden", "0.25", "--calib", "none", "--quiet"]
    assert main(argv + (["--stream"] if stream else [])) == 0
    plain = tf.GemmaForCausalLM.from_pretrained(out).eval()
    ours = sc.load_pretrained(out)
    assert plain.config.hidden_size == 48
    assert float(plain.model.embed_tokens.embed_scale) == pytest.approx(48 ** 0.5)
    ids = torch.randint(0, 128, (2, 10))
    torch.testing.assert_close(_logits(plain, ids), _logits(ours, ids), atol=1e-5, rtol=1e-5)


def test_in_memory_gemma_keeps_what_loaders_rebuild():
    model = _gemma_model()
    ids = torch.randint(0, 128, (2, 10))
    sc.prune(model, {"input_ids": ids}, hidden=0.25)
    assert float(model.model.embed_tokens.embed_scale) == pytest.approx(48 ** 0.5)
    assert model.model.embed_tokens.scalar_embed_scale == pytest.approx(48 ** 0.5)


def test_gemma_saved_with_per_layer_sizes_reloads_its_pruned_embed_scale(tmp_path):
    """Non-plain: load_pretrained builds the dense config (scale sqrt(64)) and must follow the restored width."""
    model = _gemma_model()
    ids = torch.randint(0, 128, (2, 10))
    sc.prune(model, {"input_ids": ids}, 0.3, hidden=0.25, scope="global")
    widths = {layer.mlp.up_proj.out_features for layer in model.model.layers}
    assert len(widths) > 1, "the test needs per-layer sizes, so that the checkpoint is not plain"
    assert not sc.save_pretrained(model, tmp_path / "g").plain_loadable
    reloaded = sc.load_pretrained(tmp_path / "g")
    assert float(reloaded.model.embed_tokens.embed_scale) == pytest.approx(48 ** 0.5)
    torch.testing.assert_close(_logits(reloaded, ids), _logits(model, ids), atol=0, rtol=0)


def _gemma_model():
    torch.manual_seed(0)
    cfg = tf.GemmaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
    return tf.GemmaForCausalLM(cfg).eval()


def test_a_checkpoint_that_reloads_differently_is_never_renamed_into_place(tmp_path, capsys, monkeypatch):
    """The old bug, forced back: the dense embed_scale stays in memory, every loader rebuilds another one."""
    _gemma(tmp_path / "src")
    monkeypatch.setattr("secateurs.modeling.rewrite._follow_embed_scale", lambda snap, mod: None)
    code = main(["prune", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--hidden", "0.25", "--calib",
                 "none", "--json"])
    error = json.loads(capsys.readouterr().out)["error"]
    assert code == 3 and "reloaded with GemmaForCausalLM.from_pretrained differs" in error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_check_reload_compares_with_the_loader_the_manifest_names(tmp_path):
    model = _gemma_model()
    sc.save_pretrained(model, tmp_path / "g")
    example = {"input_ids": torch.randint(0, 128, (1, 6))}
    check_reload(tmp_path / "g", model, example, plain=True)
    check_reload(tmp_path / "g", model, example, plain=False)
    with torch.no_grad():
        model.lm_head.weight.mul_(1.01)  # tied with the embeddings: every output moves
    with pytest.raises(VerificationError, match="differs from the verified model"):
        check_reload(tmp_path / "g", model, example, plain=True)


def test_armor_layers_save_and_reload(tmp_path):
    from secateurs.passes import AnalyzeDependencies, PassManager
    from secateurs.passes.armor import FactorizeARMOR

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = tf.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 120, (2, 8))
    PassManager([AnalyzeDependencies(), FactorizeARMOR(calib=[{"input_ids": ids}], steps=2,
                                                       ignore=("lm_head",))])(sc.capture(model, {"input_ids": ids}))
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "ArmorLinear"
    sc.save_pretrained(model, tmp_path / "armor")
    reloaded = sc.load_pretrained(tmp_path / "armor")
    assert type(reloaded.model.layers[0].mlp.up_proj).__name__ == "ArmorLinear"
    torch.testing.assert_close(_logits(reloaded, ids), _logits(model, ids), atol=0, rtol=0)
    check_reload(tmp_path / "armor", model, {"input_ids": ids}, plain=False)


def test_per_expert_moe_checkpoints_as_transformers_writes_them_load_and_prune(tmp_path, capsys):
    """transformers 5 keeps Mixtral's experts fused in memory but saves them one by one (experts.N.w1.weight)."""
    from safetensors import safe_open

    torch.manual_seed(0)
    cfg = tf.MixtralConfig(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    model = tf.MixtralForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path / "src")
    with safe_open(str(tmp_path / "src" / "model.safetensors"), "pt") as f:
        assert any(".experts.0.w1.weight" in k for k in f.keys())  # the per-expert layout
    ids = torch.randint(0, 100, (2, 7))
    assert torch.equal(_logits(sc.load_pretrained(tmp_path / "src"), ids), _logits(model, ids))
    assert main(["inspect", str(tmp_path / "src"), "--quiet"]) == 0
    out = tmp_path / "out"
    assert main(["prune", str(tmp_path / "src"), "--out", str(out), "--kv-groups", "0.5", "--round-to", "1",
                 "--calib", "none", "--quiet"]) == 0
    assert sc.load_pretrained(out).model.layers[0].self_attn.k_proj.out_features == 8


def _stored_names(folder):
    from secateurs.backends.sharded import ShardedSource

    return set(ShardedSource(folder).tensors)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_per_expert_sources_are_written_back_per_expert_or_as_asked(tmp_path, capsys, family):
    """The output keeps the source's expert layout (plain from_pretrained reads it), --expert-layout fused
    asks for the fused one; a structure only load_pretrained reads (per-layer sizes, factorised layers) falls back
    to fused with the reason in the report, and asking for per-expert then is an error."""
    torch.manual_seed(0)
    if family == "mixtral":
        cfg = tf.MixtralConfig(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
        model, one = tf.MixtralForCausalLM(cfg).eval(), ".experts.0.w1.weight"
    else:
        cfg = tf.Qwen2MoeConfig(vocab_size=100, hidden_size=32, intermediate_size=48, moe_intermediate_size=24,
                                shared_expert_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, num_experts=4, num_experts_per_tok=2)
        model, one = tf.Qwen2MoeForCausalLM(cfg).eval(), ".experts.0.gate_proj.weight"
    model.save_pretrained(tmp_path / "src")
    assert any(one in k for k in _stored_names(tmp_path / "src"))
    ids = torch.randint(0, 100, (2, 7))
    base = ["prune", str(tmp_path / "src"), "--experts", "0.25", "--calib", "none", "--json"]
    assert main([*base, "--out", str(tmp_path / "same")]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["expert_layout"]["written"] == "per-expert"
    assert any(one in k for k in _stored_names(tmp_path / "same"))
    assert not any(k.endswith("experts.gate_up_proj") for k in _stored_names(tmp_path / "same"))
    plain = type(model).from_pretrained(tmp_path / "same")
    assert len(plain.model.layers[0].mlp.experts.gate_up_proj) == 3  # 4 experts -> 3, fused again in memory
    torch.testing.assert_close(_logits(plain, ids), _logits(sc.load_pretrained(tmp_path / "same"), ids), atol=0, rtol=0)
    assert main([*base, "--out", str(tmp_path / "fused"), "--expert-layout", "fused"]) == 0
    assert json.loads(capsys.readouterr().out)["expert_layout"]["written"] == "fused"
    assert not any(one in k for k in _stored_names(tmp_path / "fused"))
    torch.testing.assert_close(_logits(sc.load_pretrained(tmp_path / "fused"), ids), _logits(plain, ids), atol=0,
                               rtol=0)
    per_layer = [*base, "--low-rank", "0.2"]  # factorised layers: only secateurs.json describes them
    assert main([*per_layer, "--out", str(tmp_path / "global")]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["expert_layout"]["written"] == "fused" and "per-layer" in data["expert_layout"]["why"]
    sc.load_pretrained(tmp_path / "global")
    assert main([*per_layer, "--out", str(tmp_path / "refused"), "--expert-layout", "per-expert"]) == 2
    assert "per-layer sizes" in json.loads(capsys.readouterr().out)["error"]
    assert not (tmp_path / "refused").exists()


def test_a_layout_nothing_can_convert_is_still_refused(llama_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    from secateurs.errors import CheckpointError

    src = tmp_path / "src"
    shutil.copytree(llama_dir, src)
    (src / "secateurs.json").unlink()
    state = load_file(src / "model.safetensors")
    state["model.layers.0.mlp.renamed.weight"] = state.pop("model.layers.0.mlp.up_proj.weight")
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="do not match the config"):
        sc.load_pretrained(src)


def test_head_counts_the_config_class_refuses_are_recorded_in_the_manifest(tmp_path):
    """Llama with 8 -> 6 heads of a 64-wide model: transformers refuses 64 % 6 != 0 on save; load_pretrained works."""
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=120, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=64)
    model = tf.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 120, (2, 8))
    sc.prune(model, {"input_ids": ids}, heads=0.25, round_to=1)
    assert model.model.layers[0].self_attn.q_proj.out_features == 48
    result = sc.save_pretrained(model, tmp_path / "o")
    assert result.plain_loadable is False
    torch.testing.assert_close(_logits(sc.load_pretrained(tmp_path / "o"), ids), _logits(model, ids), atol=0, rtol=0)


def test_the_reload_check_loads_as_the_source_was_loaded(llama_dir, tmp_path, monkeypatch):
    """trust_remote_code reaches the reload as it reached the load (remote-code models reload only so)."""
    import secateurs.backends.checkpoint_load as ckpt  # check_reload calls load_pretrained from there
    from secateurs.convert import prune_checkpoint

    seen = []
    real = ckpt.load_pretrained

    def spy(path, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        return real(path, **kwargs)

    monkeypatch.setattr(ckpt, "load_pretrained", spy)
    model = sc.load_pretrained(llama_dir)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(10)  # per-layer widths: the reload goes through load_pretrained
    sc.save_pretrained(model, tmp_path / "src")
    prune_checkpoint(tmp_path / "src", tmp_path / "o", calib="none", ffn=0.3, scope="global", round_to=1,
                     trust_remote_code=True)
    assert seen == [True]
