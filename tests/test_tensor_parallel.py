"""Serving-friendly sizes. tensor_parallel= / --tp: every pruned layer stays shardable over N ranks, as serving
engines shard it; uniform= / --uniform: every layer keeps the same sizes, so plain from_pretrained loads it.

Oracle: the engines' own rule, checked on the pruned modules' real sizes in every layer: query heads and FFN
width multiples of N, KV heads a multiple or a divisor of N (vLLM replicates KV heads when N exceeds them).
"""

import json

import pytest
import torch

import secateurs as sc
from secateurs.errors import BudgetError
from secateurs.passes import ALLOCATORS
from secateurs.stream import prune_checkpoint


def _llama(layers=3, heads=16, kv=4, hidden=256, ffn=200):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=120, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=64)
    model = tf.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # layers that differ, so that allocators give them different sizes
        for i, layer in enumerate(model.model.layers):
            layer.mlp.down_proj.weight.mul_(0.2 + i)
            layer.self_attn.o_proj.weight.mul_(0.3 + 2 * i)
    return model


INPUTS = {"input_ids": torch.arange(16).reshape(2, 8) % 120}


def _sizes(model):
    out = []
    for layer in model.model.layers:
        attn = layer.self_attn
        out.append((attn.q_proj.out_features // attn.head_dim, attn.k_proj.out_features // attn.head_dim,
                    layer.mlp.up_proj.out_features))
    return out


def _shardable(sizes, tp):
    return all(q % tp == 0 and (kv % tp == 0 or tp % kv == 0) and f % tp == 0 for q, kv, f in sizes)


@pytest.mark.parametrize("allocate", [None, "global-scope", *ALLOCATORS])
def test_every_allocator_plans_sizes_that_four_ranks_shard(allocate):
    options = {"heads": 0.3, "kv_groups": 0.6, "ffn": 0.37, "round_to": 1}
    if allocate == "global-scope":
        options["scope"] = "global"
    elif allocate is not None:
        options["allocate"] = allocate
    dense = _llama()
    free = _llama()
    sc.prune(free, INPUTS, **options)
    assert not _shardable(_sizes(free), 4), _sizes(free)  # the same request without --tp breaks sharding
    model = _llama()
    report = sc.prune(model, INPUTS, tensor_parallel=4, **options)
    sizes = _sizes(model)
    assert _shardable(sizes, 4), sizes
    assert sum(q for q, _, _ in sizes) < 48 and sum(f for _, _, f in sizes) < 600, sizes  # still pruned
    assert any(c.bound == "tp=4" for c in report.changes)  # the report says which constraint set a size
    with torch.no_grad():
        assert model(**INPUTS).logits.shape == dense(**INPUTS).logits.shape


def test_tp_one_is_the_plan_without_it():
    a, b = _llama(), _llama()
    ra = sc.prune(a, INPUTS, heads=0.3, kv_groups=0.5, ffn=0.3)
    rb = sc.prune(b, INPUTS, heads=0.3, kv_groups=0.5, ffn=0.3, tensor_parallel=1)
    assert [(c.name, c.after) for c in ra.changes] == [(c.name, c.after) for c in rb.changes]
    with torch.no_grad():
        assert torch.equal(a(**INPUTS).logits, b(**INPUTS).logits)


def test_kv_groups_fewer_than_the_ranks_are_replicated_and_query_heads_still_divide():
    model = _llama(heads=16, kv=4)
    sc.prune(model, INPUTS, kv_groups=0.5, tensor_parallel=8, round_to=1)
    assert _sizes(model) == [(8, 2, 200)] * 3  # 2 KV heads, each replicated on 4 of the 8 ranks
    with pytest.raises(BudgetError, match="heads=0.5 .* removes no channel.*tensor_parallel=8"):
        # both at once cannot shard: 2 KV groups x 2 heads = 4 query heads for 8 ranks; the heads are dropped
        sc.prune(_llama(heads=16, kv=4), INPUTS, kv_groups=0.5, heads=0.5, tensor_parallel=8, round_to=1)


def test_an_unshardable_request_is_refused_before_anything_changes():
    model = _llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(BudgetError, match=r"tensor_parallel=32 \(--tp\).*self_attn"):
        sc.prune(model, INPUTS, heads=0.3, tensor_parallel=32)  # 16 query heads cannot fill 32 ranks
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(BudgetError, match="tensor_parallel"):
        sc.prune(_llama(), INPUTS, ffn=0.3, tensor_parallel=0)
    with pytest.raises(BudgetError, match=r"read only by width pruning"):
        sc.prune(_llama(), INPUTS, layers=1, tensor_parallel=4)


def test_the_hidden_size_and_multi_head_attention_follow_tp():
    model = _llama(heads=8, kv=8, hidden=128)  # kv == heads: multi-head attention, one group per head
    sc.prune(model, INPUTS, heads=0.3, hidden=0.3, ffn=0.3, tensor_parallel=4, round_to=1)
    sizes = _sizes(model)
    assert _shardable(sizes, 4) and all(kv == q < 8 for q, kv, _ in sizes), sizes
    assert model.model.norm.weight.shape[0] % 4 == 0 and model.model.norm.weight.shape[0] < 128


def test_a_streamed_prune_keeps_every_block_shardable(tmp_path):
    src = tmp_path / "src"
    sc.save_pretrained(_llama(layers=2), src)
    prune_checkpoint(src, tmp_path / "out", heads=0.3, kv_groups=0.6, ffn=0.37, round_to=1, tensor_parallel=4,
                     allocate="owl")
    model = sc.load_pretrained(tmp_path / "out")
    assert _shardable(_sizes(model), 4), _sizes(model)


def test_the_cli_flag(tmp_path, capsys):
    from secateurs.cli import main

    src = tmp_path / "src"
    sc.save_pretrained(_llama(layers=2), src)
    code = main(["prune", str(src), "--out", str(tmp_path / "out"), "--heads", "0.3", "--kv-groups", "0.6",
                 "--round-to", "1", "--tp", "4", "--calib", "none", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == 0 and any(c.get("bound") == "tp=4" for c in data["changes"]), data["changes"]
    assert _shardable(_sizes(sc.load_pretrained(tmp_path / "out")), 4)


# --uniform: an allocator's per-layer ratios equalised per structure, so every engine loads the result.

@pytest.mark.parametrize("allocate", ["dp", "lamp", "owl"])
def test_uniform_equalises_an_allocator_and_loads_with_plain_from_pretrained(tmp_path, allocate):
    from secateurs.backends.checkpoint import describe

    free = _llama()
    sc.prune(free, INPUTS, ffn=0.3, kv_groups=0.5, allocate=allocate, round_to=1)
    model = _llama()
    sc.prune(model, INPUTS, ffn=0.3, kv_groups=0.5, allocate=allocate, round_to=1, uniform=True)
    sizes = _sizes(model)
    assert len(set(sizes)) == 1 and sizes[0][2] < 200, sizes
    total = sum(f for _, _, f in _sizes(free))
    assert abs(3 * sizes[0][2] - total) <= 3, (sizes, _sizes(free))  # the allocator's budget, spread evenly
    assert describe(model).plain_loadable
    result = sc.save_pretrained(model, tmp_path / "out")
    assert result.plain_loadable and json.loads((tmp_path / "out" / "secateurs.json").read_text())["shapes"] == {}
    import transformers as tf

    plain = tf.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert torch.equal(plain(**INPUTS).logits, model(**INPUTS).logits)


def test_uniform_refusals_and_the_streamed_path(tmp_path):
    with pytest.raises(BudgetError, match=r"uniform=True \(--uniform\).*scope='global'"):
        sc.prune(_llama(), INPUTS, ffn=0.3, scope="global", uniform=True)
    with pytest.raises(BudgetError, match=r"uniform=True \(--uniform\).*sublayers="):
        sc.prune(_llama(), INPUTS, ffn=0.3, sublayers=1, uniform=True)
    with pytest.raises(BudgetError, match="read only by width pruning"):
        sc.prune(_llama(), INPUTS, layers=1, uniform=True)
    src = tmp_path / "src"
    sc.save_pretrained(_llama(), src)
    prune_checkpoint(src, tmp_path / "out", ffn=0.3, allocate="dp", round_to=1, uniform=True)
    sizes = _sizes(sc.load_pretrained(tmp_path / "out"))
    assert len(set(sizes)) == 1 and sizes[0][2] < 200, sizes
