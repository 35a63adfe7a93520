"""Out-of-core pruning (secateurs.stream): block by block from sharded safetensors equals the in-memory prune."""

from __future__ import annotations

import copy
import functools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import secateurs as sc
from secateurs.backends.sharded import INDEX, ShardedSource, ShardedWriter
from secateurs.errors import BudgetError, CheckpointError
from secateurs.passes import check_nm, remove_masks
from secateurs.stream import StreamOptions, prune_checkpoint


def _llama(layers=4, hidden=64, intermediate=128, tie=False, dtype=torch.float32):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=120, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tie)
    return tf.LlamaForCausalLM(cfg).eval().to(dtype)


def save_sharded(model, folder: Path, shards: int = 4) -> Path:
    """Save ``model`` as exactly ``shards`` safetensors files with an index (a block may span two files)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(folder)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    names = list(state)
    per = -(-len(names) // shards)
    weight_map = {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: state[n] for n in names[i * per:(i + 1) * per]}
        save_file(part, str(folder / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
    (folder / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def _calib(n=3):
    return [{"input_ids": torch.randint(0, 120, (2, 8 + 2 * i))} for i in range(n)]


CASES = {
    "l2_ffn_magnitude_2_4": ({"ffn": 0.25, "nm": "2:4", "round_to": 8}, {}),
    "activation_ffn_wanda_2_4": ({"ffn": 0.25, "importance": "activation", "nm": "2:4", "sparsity_criterion": "wanda",
                                  "round_to": 8}, {"sequential": True}),
    "flap_ffn_sparsegpt": ({"ffn": 0.5, "importance": "flap", "sparsity": 0.5, "sparsity_criterion": "sparsegpt",
                            "round_to": 16}, {"sequential": True}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_streaming_equals_in_memory_prune(tmp_path, case):
    opts, extra = CASES[case]
    model = _llama(4)
    src = save_sharded(model, tmp_path / "src")
    assert len(list(src.glob("*.safetensors"))) == 4
    calib = _calib()
    calibrated = "importance" in opts
    ref = copy.deepcopy(model)
    sc.prune(ref, calib[0], calib=calib if calibrated else None, check_outputs=False, **opts, **extra)
    remove_masks(ref)
    report = prune_checkpoint(src, tmp_path / "out", calib=calib if calibrated else None, **opts)
    assert report.blocks == 4 and report.plain_loadable
    assert [w[1:] for w in report.widths] == [(128, ref.model.layers[0].mlp.up_proj.out_features)] * 4
    loaded = sc.load_pretrained(tmp_path / "out")
    got, want = loaded.state_dict(), ref.state_dict()
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert got[k].shape == v.shape, k  # same kept channels
        if opts.get("sparsity_criterion") == "sparsegpt":
            torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6, msg=k)
            assert torch.equal(got[k] == 0, v == 0), k
        else:
            assert torch.equal(got[k], v), k
    x = calib[1]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, ref(x).logits, rtol=1e-5, atol=1e-5)
    if "nm" in opts:
        assert check_nm(loaded, 2, 4, [n for n, _ in loaded.named_modules() if n.endswith("proj")]) == []
    index = json.loads((tmp_path / "out" / INDEX).read_text())
    assert set(index["weight_map"]) == set(got)
    assert (tmp_path / "out" / "secateurs.json").is_file()


def _mixtral(layers=3):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.MixtralConfig(vocab_size=120, hidden_size=64, intermediate_size=48, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                           max_position_embeddings=64)
    return tf.MixtralForCausalLM(cfg).eval()


def _qwen2_moe(layers=3):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.Qwen2MoeConfig(vocab_size=120, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                            shared_expert_intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                            num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, max_position_embeddings=64)
    return tf.Qwen2MoeForCausalLM(cfg).eval()


def _llama_outliers():
    """Block 2's MLP has a few outlier neurons: OWL prunes it less than the others."""
    model = _llama(4)
    with torch.no_grad():
        model.model.layers[2].mlp.up_proj.weight[:6].mul_(40)
    return model


def _fixed_calib(n=3):
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, 120, (2, 8 + 2 * i), generator=g)} for i in range(n)]


# name: (model factory, stream options, extra in-memory options, calibrated, first statistics passes)
STRUCTURES = {
    "heads_ffn_l2": (_llama, {"heads": 0.5, "ffn": 0.25, "round_to": 1}, {}, False, 0),
    "global_activation": (_llama, {"heads": 0.5, "ffn": 0.3, "round_to": 1, "importance": "activation",
                                   "scope": "global"}, {}, True, 1),
    "owl": (_llama_outliers, {"ffn": 0.3, "round_to": 1, "allocate": "owl"}, {}, False, 1),
    "dp_params": (_llama, {"ffn": 0.3, "heads": 0.5, "round_to": 1, "allocate": "dp", "budget_unit": "params"}, {},
                  False, 1),
    "cfsp": (_llama, {"ffn": 0.3, "round_to": 1, "allocate": "cfsp"}, {}, True, 1),
    "depth_bi_wanda": (_llama, {"layers": 1, "ffn": 0.25, "importance": "activation", "nm": "2:4",
                                "sparsity_criterion": "wanda", "round_to": 8}, {"sequential": True}, True, 1),
    "depth_angular": (functools.partial(_llama, 6), {"layers": 2, "depth_criterion": "angular", "heads": 0.5,
                                                     "round_to": 1}, {}, True, 1),
    "mixtral_experts_heads": (_mixtral, {"experts": 0.25, "expert_neurons": 0.25, "heads": 0.5,
                                         "importance": "activation", "round_to": 1}, {}, True, 0),
    "mixtral_depth_mass_sparsegpt": (_mixtral, {"experts": 0.5, "expert_importance": "mass", "layers": 1,
                                                "nm": "2:4", "sparsity_criterion": "sparsegpt"},
                                     {"sequential": True}, True, 1),
    "hidden_l2": (_llama, {"hidden": 0.25, "round_to": 8}, {}, False, 1),
    "hidden_depth_heads_ffn_wanda": (_llama, {"hidden": 0.25, "heads": 0.5, "ffn": 0.25, "layers": 1, "nm": "2:4",
                                              "sparsity_criterion": "wanda", "round_to": 8}, {"sequential": True},
                                     True, 2),
    "qwen2_moe_global_flap": (_qwen2_moe, {"experts": 0.25, "ffn": 0.25, "importance": "flap", "round_to": 1,
                                           "scope": "global"}, {}, True, 1),
}


@pytest.mark.parametrize("case", list(STRUCTURES))
def test_streamed_structures_equal_in_memory_prune(tmp_path, case):
    """Heads, experts, depth, global rankings and allocators: the streamed weights are the in-memory ones."""
    factory, opts, extra, calibrated, surveys = STRUCTURES[case]
    model = factory()
    src = save_sharded(model, tmp_path / "src")
    calib = _fixed_calib() if calibrated else None
    ref = copy.deepcopy(model)
    memory = sc.prune(ref, _fixed_calib()[0], calib=calib, check_outputs=False, **opts, **extra)
    remove_masks(ref)
    report = prune_checkpoint(src, tmp_path / "out", calib=calib, **opts)
    assert report.passes == 1 + surveys
    assert [n for n, _ in report.removed_blocks] == [n for d in memory.depth for n, _ in d.removed]
    assert len(report.experts) == len(memory.experts)
    assert sorted((b, a) for _, b, a in report.widths) == sorted((c.before, c.after) for c in memory.changes)
    loaded = sc.load_pretrained(tmp_path / "out")
    got, want = loaded.state_dict(), ref.state_dict()
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert got[k].shape == v.shape, k  # the same kept heads, neurons, experts and blocks
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6, msg=k)
    x = _fixed_calib()[1]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, ref(x).logits, rtol=1e-4, atol=1e-4)
    if case.startswith("mixtral") or case in ("heads_ffn_l2", "hidden_l2"):
        import transformers as tf

        assert report.plain_loadable
        plain = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()  # uniform: the config says it all
        with torch.no_grad():
            torch.testing.assert_close(plain(x).logits, ref(x).logits, rtol=1e-4, atol=1e-4)
    if opts.get("scope") == "global" or "allocate" in opts:
        assert len({a for n, _, a in report.widths if "mlp" in n}) > 1  # the blocks got different widths


def test_hidden_size_of_a_tied_bf16_checkpoint_is_sliced_in_row_chunks(tmp_path):
    """The embeddings (tied to the LM head) lose hidden columns chunk by chunk; the result is the in-memory one."""
    import transformers as tf

    model = _llama(2, tie=True, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "src")
    opts = {"hidden": 0.25, "ffn": 0.25, "importance": "maw", "round_to": 8}
    report = prune_checkpoint(tmp_path / "src", tmp_path / "out", chunk_bytes=1000, **opts)
    ref = copy.deepcopy(model)
    sc.prune(ref, {"input_ids": torch.randint(0, 120, (1, 6))}, check_outputs=False, **opts)
    assert report.widths[-1][1:] == (64, 48) and report.peak_weight_bytes <= report.block_bytes
    plain = tf.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert plain.config.hidden_size == 48 and plain.config.head_dim == 16
    assert plain.lm_head.weight.data_ptr() == plain.model.embed_tokens.weight.data_ptr()
    for k, v in ref.state_dict().items():
        assert torch.equal(plain.state_dict()[k], v), k


def test_the_hidden_size_of_fused_experts_streams_as_in_memory(tmp_path):
    """The residual stream runs through the routers and fused experts (grouped_mm): both lose its channels, and
    the streamed result is the in-memory one (it was frozen before grouped_mm had a rule)."""
    import transformers as tf

    model = _mixtral(2)
    src = save_sharded(model, tmp_path / "src", shards=2)
    opts = {"hidden": 0.25, "ffn": 0.25}
    prune_checkpoint(src, tmp_path / "o", **opts)
    ref = copy.deepcopy(model)
    sc.prune(ref, {"input_ids": torch.randint(0, 120, (1, 6))}, check_outputs=False, **opts)
    plain = tf.MixtralForCausalLM.from_pretrained(tmp_path / "o").eval()
    assert plain.config.hidden_size == 48 and plain.config.intermediate_size == 40  # 48 x 0.75 = 36 -> 40
    for k, v in ref.state_dict().items():
        assert torch.equal(plain.state_dict()[k], v), k


def test_hidden_size_refusals(tmp_path):
    with pytest.raises(BudgetError, match="weight criteria"):
        StreamOptions(hidden=0.25, importance="activation")
    with pytest.raises(BudgetError, match="allocator"):
        StreamOptions(hidden=0.25, ffn=0.25, allocate="owl")


def test_weight_only_ffn_width_streams_a_model_whose_preamble_cannot_be_rebuilt(tmp_path):
    """Gemma's scaled embedding has a buffer the checkpoint does not store: weight-only FFN width and sparsity
    capture the MLP alone and never run the model's preamble."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.GemmaConfig(vocab_size=120, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
    model = tf.GemmaForCausalLM(cfg).eval()
    src = save_sharded(model, tmp_path / "src", shards=2)
    prune_checkpoint(src, tmp_path / "out", ffn=0.25, nm="2:4", round_to=8)
    ref = copy.deepcopy(model)
    sc.prune(ref, {"input_ids": torch.randint(0, 120, (1, 6))}, ffn=0.25, nm="2:4", round_to=8, check_outputs=False)
    remove_masks(ref)
    got = sc.load_pretrained(tmp_path / "out").state_dict()
    for k, v in ref.state_dict().items():
        assert torch.equal(got[k], v), k
    with pytest.raises(CheckpointError, match="embed_tokens"):  # heads need the block's real inputs
        prune_checkpoint(src, tmp_path / "heads", heads=0.5)
    assert not (tmp_path / "heads").exists()


def test_an_existing_output_is_refused_before_reading_any_block(tmp_path, monkeypatch):
    src = save_sharded(_llama(4), tmp_path / "src")
    (tmp_path / "out").mkdir()
    loads = []
    monkeypatch.setattr(ShardedSource, "load", lambda self, names: loads.append(names))
    with pytest.raises(CheckpointError, match="exists"):
        prune_checkpoint(src, tmp_path / "out", layers=1, ffn=0.25, scope="global", calib=_fixed_calib())
    assert loads == []


def test_depth_first_pass_loads_one_block_at_a_time(tmp_path):
    src = save_sharded(_llama(4), tmp_path / "src")
    report = prune_checkpoint(src, tmp_path / "out", calib=_fixed_calib(), layers=0.25, ffn=0.25, scope="global")
    assert report.passes == 3 and report.blocks == 3
    assert report.peak_weight_bytes == report.block_bytes
    assert len(report.depth_scores) == 4
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_hidden_layers"] == 3
    assert "removed blocks" in report.summary()


def test_tied_single_file_bf16_checkpoint_copies_embeddings_in_chunks(tmp_path):
    import transformers as tf

    model = _llama(2, tie=True, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "src")  # one model.safetensors, lm_head tied to the embeddings
    report = prune_checkpoint(tmp_path / "src", tmp_path / "out", ffn=0.5, nm="2:4", round_to=8, chunk_bytes=1000)
    assert report.peak_weight_bytes <= report.block_bytes
    ref = copy.deepcopy(model)
    sc.prune(ref, {"input_ids": torch.randint(0, 120, (1, 6))}, ffn=0.5, nm="2:4", round_to=8, check_outputs=False)
    remove_masks(ref)
    assert (ref.model.embed_tokens.weight != 0).all()  # the tied LM head is an output layer: left dense
    plain = tf.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()  # uniform widths: config says it all
    assert plain.config.intermediate_size == 64 and plain.dtype == torch.bfloat16
    for k, v in ref.state_dict().items():
        assert torch.equal(plain.state_dict()[k], v), k
    assert plain.lm_head.weight.data_ptr() == plain.model.embed_tokens.weight.data_ptr()
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's owner-only mode
    assert (tmp_path / "out" / INDEX).stat().st_mode & 0o777 == 0o666 & ~umask


def test_peak_weights_are_one_block_at_any_depth(tmp_path):
    reports = {}
    for layers in (2, 8):
        src = save_sharded(_llama(layers), tmp_path / f"src{layers}")
        reports[layers] = prune_checkpoint(src, tmp_path / f"out{layers}", ffn=0.25, nm="2:4", round_to=8,
                                           chunk_bytes=4096)
    small, big = reports[2], reports[8]
    assert big.model_bytes > 3 * small.model_bytes
    assert small.block_bytes == big.block_bytes
    # the counter of checkpoint bytes loaded at once: one block whatever the depth, a fraction of the model
    # (8 blocks and the embeddings: a block is less than an eighth)
    assert small.peak_weight_bytes == big.peak_weight_bytes == big.block_bytes
    assert big.peak_weight_bytes < big.model_bytes / 8


RSS_SCRIPT = textwrap.dedent("""
    import json, re, sys
    from pathlib import Path
    from secateurs.stream import prune_checkpoint

    tmp = Path(sys.argv[1])

    def status(key):
        return int(re.search(key + r":\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024

    prune_checkpoint(tmp / "src1", tmp / "out1", ffn=0.25, nm="2:4")  # warm-up: imports, torch.export caches
    out = {}
    for layers in (4, 16):
        Path("/proc/self/clear_refs").write_text("5")  # resets the peak RSS (VmHWM) to the current RSS
        base = status("VmRSS")
        r = prune_checkpoint(tmp / f"src{layers}", tmp / f"out{layers}", ffn=0.25, nm="2:4", chunk_bytes=1 << 20)
        out[layers] = {"growth": status("VmHWM") - base, "block": r.block_bytes, "model": r.model_bytes}
    print(json.dumps(out))
""")


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's resettable peak RSS")
def test_peak_rss_grows_by_one_block_not_the_model(tmp_path):
    """The peak RSS of streaming a 16-layer model is that of a 4-layer one: a few blocks, not the model."""
    for layers in (1, 4, 16):
        save_sharded(_llama(layers, hidden=512, intermediate=2048), tmp_path / f"src{layers}")  # 15 MiB blocks
    # glibc otherwise raises its mmap threshold as blocks are freed and keeps them in the heap: noise
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    block, model16 = m["16"]["block"], m["16"]["model"]
    grow4, grow16 = m["4"]["growth"], m["16"]["growth"]
    assert model16 > 15 * block
    assert grow16 < grow4 + 2 * block, m  # 12 more layers, (almost) no more memory
    assert grow16 < 6 * block, m  # a block, its pruned copy, float64 scores of one layer, the shard written
    assert grow16 < model16 / 3, m  # loading the model would need all of it


def test_interrupted_run_leaves_no_output_and_keeps_the_previous_one(tmp_path, monkeypatch):
    src = save_sharded(_llama(4), tmp_path / "src")
    calls = []
    original = ShardedWriter.write_shard

    def failing(self, filename, tensors):
        calls.append(filename)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as if killed mid-way
        original(self, filename, tensors)

    monkeypatch.setattr(ShardedWriter, "write_shard", failing)
    with pytest.raises(KeyboardInterrupt):
        prune_checkpoint(src, tmp_path / "out", ffn=0.25)
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no temporary folder left either
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("previous")
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        prune_checkpoint(src, tmp_path / "out", ffn=0.25, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_bad_requests_are_refused(tmp_path):
    src = save_sharded(_llama(2), tmp_path / "src", shards=2)
    with pytest.raises(BudgetError, match="taylor"):
        prune_checkpoint(src, tmp_path / "o", ffn=0.25, importance="taylor")
    with pytest.raises(BudgetError, match="calib"):
        prune_checkpoint(src, tmp_path / "o", nm="2:4", sparsity_criterion="wanda")
    with pytest.raises(BudgetError, match="unexpected keyword"):
        prune_checkpoint(src, tmp_path / "o", ffn_ratio=0.25)
    with pytest.raises(BudgetError, match="2:4"):
        StreamOptions(nm="two:four")
    with pytest.raises(BudgetError, match="greedy"):
        StreamOptions(layers=1, depth_criterion="greedy")
    with pytest.raises(BudgetError, match="ecoflap"):
        StreamOptions(ffn=0.3, allocate="ecoflap")
    with pytest.raises(BudgetError, match="heads ratio"):
        StreamOptions(heads=1.5)
    with pytest.raises(BudgetError, match="flops"):
        StreamOptions(ffn=0.3, allocate="dp", budget_unit="flops")
    with pytest.raises(BudgetError, match="mixture-of-experts"):
        prune_checkpoint(src, tmp_path / "o", experts=0.25, calib=_calib())
    with pytest.raises(BudgetError, match="layers=1 needs calibration"):
        prune_checkpoint(src, tmp_path / "o", layers=1)
    with pytest.raises(BudgetError, match="tuple of 2"):
        prune_checkpoint(src, tmp_path / "o", layers=1, calib=[(torch.zeros(1, 4, dtype=torch.long),) * 2])
    with pytest.raises(BudgetError, match=r"allocate='cfsp' .* is read only by width pruning"):
        StreamOptions(nm="2:4", allocate="cfsp")  # cfsp without width would allocate nothing: refused, as in memory
    assert not StreamOptions(nm="2:4").calibrated
    with pytest.raises(BudgetError, match="layers"):
        StreamOptions(layers=float("inf"))
    with pytest.raises(BudgetError, match="at least one must stay"):
        prune_checkpoint(src, tmp_path / "o", layers=2, calib=_calib())
    (tmp_path / "exists").mkdir()
    with pytest.raises(CheckpointError, match="exists"):
        prune_checkpoint(src, tmp_path / "exists", ffn=0.25)
    (src / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        ShardedSource(src)
    assert not (tmp_path / "o").exists()


def test_source_reads_rows_and_chunks_like_the_tensor(tmp_path):
    model = _llama(1)
    src = save_sharded(model, tmp_path / "src", shards=2)
    source = ShardedSource(src)
    emb = model.model.embed_tokens.weight.detach()
    ids = torch.tensor([[3, 7, 3], [119, 0, 7]])
    assert torch.equal(source.rows("model.embed_tokens.weight", ids), emb[ids])
    assert torch.equal(torch.cat(list(source.chunks("model.embed_tokens.weight", 1000))), emb)
    with pytest.raises(CheckpointError, match="no tensor"):
        source.info("model.nope")


def _broken_stream(tmp_path, monkeypatch, spoil, **options):
    """Stream with ``spoil(layout_or_writer)`` applied; the reload check must refuse the output (exit 3)."""
    from secateurs.cli import main

    src = save_sharded(_llama(3), tmp_path / "src")
    spoil(monkeypatch)
    argv = ["prune", str(src), "--out", str(tmp_path / "out"), "--stream", "--calib", "none", "--json"]
    for key, value in options.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return main(argv)


def test_streamed_output_is_reloaded_before_rename_structure(tmp_path, monkeypatch, capsys):
    """A manifest that loses one layer's recorded width: the loader builds the dense shape, so the written
    checkpoint would not load; the check refuses it and nothing is written."""
    import secateurs.streaming.writer as stream  # the last walk writes the manifest describe() gives

    real = stream.describe

    def lossy(model):
        layout = real(model)
        dropped = [k for k in layout.manifest.get("shapes", {}) if k.endswith("layers.1.mlp.up_proj.weight")]
        assert dropped, layout.manifest.get("shapes", {}).keys()
        del layout.manifest["shapes"][dropped[0]]
        return layout

    code = _broken_stream(tmp_path, monkeypatch, lambda mp: mp.setattr(stream, "describe", lossy),
                          ffn=0.3, scope="global", round_to=1)
    assert code == 3, capsys.readouterr()
    assert "up_proj" in json.loads(capsys.readouterr().out)["error"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_streamed_output_is_reloaded_before_rename_constants(tmp_path, monkeypatch, capsys):
    """A written config whose rotary base differs from the streamed model's: the blocks' weights are all right,
    but every loader would rebuild other rotary tables."""
    import secateurs.streaming.writer as stream  # the last walk writes the manifest describe() gives

    real = stream.describe

    def other_rope(model):
        layout = real(model)
        rope = dict(layout.config.rope_parameters)
        rope["rope_theta"] = float(rope["rope_theta"]) * 2
        layout.config.rope_parameters = rope
        return layout

    code = _broken_stream(tmp_path, monkeypatch, lambda mp: mp.setattr(stream, "describe", other_rope), ffn=0.25)
    err = json.loads(capsys.readouterr().out)["error"]
    assert code == 3 and "rotary_emb.inv_freq" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


@pytest.mark.parametrize("options", [{"heads": 0.5}, {"hidden": 0.25}])
def test_streamed_output_is_reloaded_before_rename_copied_tensors(tmp_path, monkeypatch, capsys, options):
    """An embedding copied through with one value changed (as is, and sliced by a pruned hidden size): the blocks
    and every shape are right, the read-back embedding is not the source's."""
    real = ShardedWriter.stream_shard

    def spoiled(self, filename, items):
        def bent(chunks):
            def pieces():
                for j, piece in enumerate(chunks()):
                    if j == 0:
                        piece = piece.clone()
                        piece.view(-1)[0] += 1.0
                    yield piece
            return pieces

        items = [(n, d, s, bent(c) if "embed_tokens" in n else c) for n, d, s, c in items]
        return real(self, filename, items)

    code = _broken_stream(tmp_path, monkeypatch, lambda mp: mp.setattr(ShardedWriter, "stream_shard", spoiled),
                          **options)
    err = json.loads(capsys.readouterr().out)["error"]
    assert code == 3 and "embed_tokens" in err and "differs" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_streams_of_slices_are_compared_across_their_cuts():
    from secateurs.stream_reload import _same_rows

    t = torch.arange(24.0).reshape(6, 4)
    nan = t.clone()
    nan[2, 1] = float("nan")
    assert _same_rows([t[:1], t[1:5], t[5:]], [t[:3], t[3:]])
    assert _same_rows([nan], [nan[:2], nan[2:]])  # bit for bit: the same NaN is equal
    assert not _same_rows([t], [t[:5]])
    assert not _same_rows([t[:5]], [t])
    other = t.clone()
    other[4, 3] += 1
    assert not _same_rows([t[:2], t[2:]], [other[:4], other[4:]])
    assert not _same_rows([t], [t.double()])


def test_streamed_output_is_reloaded_before_rename_blocks(tmp_path, monkeypatch, capsys):
    """A block written with other values than the verified block holds: caught by the probe of that block."""
    real = ShardedWriter.write_shard

    def spoiled(self, filename, tensors):
        tensors = {k: (v * 1.5 if k.endswith("layers.2.self_attn.o_proj.weight") else v) for k, v in tensors.items()}
        return real(self, filename, tensors)

    code = _broken_stream(tmp_path, monkeypatch, lambda mp: mp.setattr(ShardedWriter, "write_shard", spoiled),
                          heads=0.5)
    err = json.loads(capsys.readouterr().out)["error"]
    assert code == 3 and "model.layers.2" in err and "differs" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_per_expert_sources_stream_and_are_written_back_per_expert(tmp_path, monkeypatch, capsys, family):
    """A checkpoint saved as transformers saves MoE models (experts one by one, over several shards) streams block
    by block: it is read through transformers' conversion, pruned as in memory, and written back per-expert so that
    plain from_pretrained loads it; fused on request, and fused with the reason when the pruning has per-layer
    sizes (asking for per-expert then is an error that writes nothing). A spoiled per-expert tensor is caught by
    the reload check. Qwen2-MoE (a shared expert beside the routed ones) runs the per-expert round trip; the other
    layouts run on Mixtral."""
    import transformers as tf

    from secateurs.cli import main

    torch.manual_seed(0)
    shape = {"vocab_size": 120, "hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 8,  # 4 per group
             "num_key_value_heads": 2, "num_experts_per_tok": 2, "max_position_embeddings": 64}
    if family == "mixtral":
        model = tf.MixtralForCausalLM(tf.MixtralConfig(intermediate_size=48, num_local_experts=8, **shape)).eval()
    else:
        model = tf.Qwen2MoeForCausalLM(tf.Qwen2MoeConfig(
            intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=64, num_experts=8,
            **shape)).eval()
    with torch.no_grad():  # block 2's heads matter more: a ranking across the blocks keeps more of them
        model.model.layers[2].self_attn.o_proj.weight.mul_(4)
        model.model.layers[2].self_attn.v_proj.weight.mul_(4)
    one = ".experts.0.w1.weight" if family == "mixtral" else ".experts.0.gate_proj.weight"
    src = tmp_path / "src"
    model.save_pretrained(src, max_shard_size="150KB")
    stored = ShardedSource(src).tensors
    assert any(one in k for k in stored) and len({i.file for i in stored.values()}) > 2
    opts = {"experts": 0.25, "heads": 0.5, "round_to": 1, "importance": "activation", "calib": _fixed_calib()}
    ref = copy.deepcopy(model)
    sc.prune(ref, _fixed_calib()[0], check_outputs=False, **opts)
    x = _fixed_calib()[1]["input_ids"]
    with torch.no_grad():
        want = ref(x).logits
    report = prune_checkpoint(src, tmp_path / "same", **opts)
    assert report.expert_layout == {"written": "per-expert", "why": "the source stores its experts one by one"}
    names = set(ShardedSource(tmp_path / "same").tensors)
    assert any(one in k for k in names) and not any("experts.gate_up_proj" in k for k in names)
    assert json.loads((tmp_path / "same" / "secateurs.json").read_text())["expert_layout"] == "per-expert"
    plain = type(model).from_pretrained(tmp_path / "same").eval()
    assert len(plain.model.layers[0].mlp.experts.gate_up_proj) == 6  # 8 experts -> 6, fused again in memory
    with torch.no_grad():
        torch.testing.assert_close(plain(x).logits, want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(sc.load_pretrained(tmp_path / "same")(x).logits, plain(x).logits, rtol=0, atol=0)
    if family != "mixtral":
        return  # the layouts below do not depend on the family (Qwen2-MoE adds a shared expert, checked above)
    report = prune_checkpoint(src, tmp_path / "fused", expert_layout="fused", **opts)
    assert report.expert_layout["written"] == "fused"
    assert not any(one in k for k in ShardedSource(tmp_path / "fused").tensors)
    with torch.no_grad():
        torch.testing.assert_close(sc.load_pretrained(tmp_path / "fused")(x).logits, want, rtol=1e-4, atol=1e-4)
    per_layer = {**opts, "scope": "global", "importance": "l2"}  # heads ranked across the blocks: per-layer head counts
    report = prune_checkpoint(src, tmp_path / "global", **per_layer)
    assert not report.plain_loadable
    assert report.expert_layout["written"] == "fused" and "per-layer" in report.expert_layout["why"]
    assert not any(one in k for k in ShardedSource(tmp_path / "global").tensors)
    sc.load_pretrained(tmp_path / "global")
    argv = ["prune", str(src), "--stream", "--heads", "0.5", "--round-to", "1", "--scope", "global", "--criterion", "l2",
            "--calib", "none", "--json"]
    assert main([*argv, "--out", str(tmp_path / "refused"), "--expert-layout", "per-expert"]) == 2
    assert "per-layer sizes" in json.loads(capsys.readouterr().out)["error"]
    assert not (tmp_path / "refused").exists()
    real = ShardedWriter.write_shard

    def spoiled(self, filename, tensors):
        return real(self, filename, {k: v * 1.5 if ".layers.1." in k and one.replace(".0.", ".2.") in k else v
                                     for k, v in tensors.items()})

    monkeypatch.setattr(ShardedWriter, "write_shard", spoiled)
    argv = ["prune", str(src), "--stream", "--heads", "0.5", "--calib", "none", "--json"]
    assert main([*argv, "--out", str(tmp_path / "spoiled")]) == 3
    err = json.loads(capsys.readouterr().out)["error"]
    assert "model.layers.1" in err and "differs" in err, err
    assert not (tmp_path / "spoiled").exists()


def test_a_streamed_dry_run_reports_what_the_run_does_and_writes_nothing(tmp_path, capsys):
    """Oracle: the streamed run itself. The dry run's widths, removed blocks and sparsity equal the real run's,
    and no file appears anywhere (through the CLI: exit 0 and no --out needed)."""
    src = save_sharded(_llama(4), tmp_path / "src")
    before = sorted(p.name for p in tmp_path.iterdir())
    files = sorted(p.name for p in Path(src).iterdir())
    opts = {"calib": _fixed_calib(), "layers": 1, "ffn": 0.25, "heads": 0.5, "scope": "global", "nm": "2:4"}
    dry = prune_checkpoint(src, None, dry_run=True, **opts)
    assert dry.path is None and sorted(p.name for p in tmp_path.iterdir()) == before
    assert sorted(p.name for p in Path(src).iterdir()) == files
    real = prune_checkpoint(src, tmp_path / "out", **opts)
    assert (dry.widths, dry.removed_blocks, dry.sparsity) == (real.widths, real.removed_blocks, real.sparsity)
    assert "dry run: nothing written" in dry.summary()
    from secateurs.cli import main

    code = main(["prune", str(src), "--stream", "--dry-run", "--ffn", "0.25", "--calib", "none", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == 0 and data["path"] is None and data["widths"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*before, "out"])
    assert sorted(p.name for p in Path(src).iterdir()) == files  # nothing left in the source either
    with pytest.raises(BudgetError, match="output folder is required"):
        prune_checkpoint(src, None, ffn=0.25)


def test_a_kind_that_removes_nothing_is_refused_and_nothing_is_written(tmp_path, monkeypatch):
    """As in memory: --kv-groups whose groups all round back to full size exits non-zero, naming the kind.

    With blocks of one shape the first block decides (one block read); otherwise after the last block, before
    the commit (every block read, no folder left)."""
    from secateurs.streaming.walker import _Walker

    src = save_sharded(_llama(4), tmp_path / "src")
    loaded = []
    original = _Walker.load
    monkeypatch.setattr(_Walker, "load", lambda self, p, b: (loaded.append(p), original(self, p, b))[1])
    with pytest.raises(BudgetError, match=r"kv_groups=0.5 \(--kv-groups\) removes no channel in the first block"):
        prune_checkpoint(src, tmp_path / "out", kv_groups=0.5, round_to=100000)
    assert loaded == [0] and sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    in_memory = sc.load_pretrained(src)
    with pytest.raises(BudgetError, match=r"kv_groups=0.5 \(--kv-groups\) removes no channel"):
        sc.prune(in_memory, {"input_ids": torch.zeros(1, 8, dtype=torch.long)}, kv_groups=0.5, round_to=100000)
    loaded.clear()
    monkeypatch.setattr(_Walker, "uniform_blocks", lambda self: False)
    with pytest.raises(BudgetError, match="removes no channel in any of the 4 blocks: each of its 4 groups"):
        prune_checkpoint(src, tmp_path / "out", kv_groups=0.5, ffn=0.25, round_to=100000)
    assert loaded == [0, 1, 2, 3] and sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    out = prune_checkpoint(src, tmp_path / "out", kv_groups=0.5)  # a ratio that removes something still runs
    assert [(before, after) for _, before, after in out.widths] == [(2, 1)] * 4, out.widths  # 2 KV groups -> 1


def test_experts_on_a_dense_checkpoint_name_the_missing_experts_before_the_calibration(tmp_path, capsys):
    """`--experts` on a model without experts selects nothing: that is the error, even with --calib none (which
    experts' scoring would also need); nothing is written."""
    from secateurs.cli import main

    src = save_sharded(_llama(2), tmp_path / "src")
    code = main(["prune", str(src), "--out", str(tmp_path / "out"), "--stream", "--experts", "0.5", "--calib", "none",
                 "--json"])
    err = json.loads(capsys.readouterr().out)["error"]
    assert code == 2 and "has no mixture-of-experts block" in err and "LlamaForCausalLM" in err, err
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_larger_than_memory_is_refused_in_memory_and_its_dry_run_is_streamed(tmp_path, monkeypatch,
                                                                                         capsys):
    """Oracle: the memory the load would take (the float32 model plus the stored weights, from file sizes and
    the meta skeleton) against a memory limit set just below it. In memory: exit 2 before any weight is read,
    naming both sizes and --stream, nothing written. ``--dry-run`` plans it as ``--stream --dry-run`` does (the
    same widths); a flag the streamed path does not take is refused with the reason. Above the limit the
    in-memory run goes ahead."""
    from secateurs.backends import checkpoint_load
    from secateurs.cli import main

    src = save_sharded(_llama(4), tmp_path / "src")
    skeleton = checkpoint_load.load_skeleton(src)
    wanted, stored = checkpoint_load.load_memory(skeleton, Path(src))
    assert wanted == 4 * sum(p.numel() for p in skeleton.state_dict().values()) and stored > 0
    monkeypatch.setattr(checkpoint_load, "available_memory", lambda: wanted + stored - 1)
    read = []
    monkeypatch.setattr(checkpoint_load, "_read_state", lambda folder: read.append(folder))
    argv = ["prune", str(src), "--ffn", "0.25", "--calib", "none", "--json"]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = json.loads(capsys.readouterr().out)["error"]
    assert f"{(wanted + stored) / (1 << 30):,.1f} GiB" in err and "--stream" in err and "available" in err, err
    assert not read and not (tmp_path / "out").exists()
    assert main([*argv, "--dry-run"]) == 0
    planned = json.loads(capsys.readouterr().out)
    assert "needs about" in planned["streamed_because"]
    assert main(["prune", str(src), "--stream", "--dry-run", "--ffn", "0.25", "--calib", "none", "--json"]) == 0
    assert planned["widths"] == json.loads(capsys.readouterr().out)["widths"] and planned["path"] is None
    assert main(["prune", str(src), "--ffn", "0.25", "--calib", "none", "--dry-run"]) == 0
    assert "planned one block at a time" in capsys.readouterr().out
    assert main([*argv, "--dry-run", "--low-rank", "0.5"]) == 2
    err = json.loads(capsys.readouterr().out)["error"]
    assert "cannot plan this run" in err and "--low-rank" in err, err
    assert not read and sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    monkeypatch.undo()  # the weights are read again; the memory is just enough
    monkeypatch.setattr(checkpoint_load, "available_memory", lambda: wanted + stored)
    assert main(["prune", str(src), "--ffn", "0.25", "--calib", "none", "--dry-run"]) == 0
    assert "planned one block" not in capsys.readouterr().out
