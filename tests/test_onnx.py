"""ONNX backend: export pruned models, ONNX Runtime equals PyTorch, dynamic axes, refusals leave no file."""

import pytest
import torch

import secateurs as sc

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from secateurs.backends.onnx import export_onnx, ort_latency, verify_onnx  # noqa: E402
from secateurs.errors import CheckpointError, VerificationError  # noqa: E402

import models  # noqa: E402
from zoo import build  # noqa: E402


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_pruned_cnn_exports_and_matches(exporter, tmp_path):
    model = models.Grouped().eval()
    x = (torch.randn(2, 3, 8, 8),)
    sc.prune(model, x, ratio=0.5, round_to=1)
    result = export_onnx(model, x, tmp_path / "m.onnx", exporter=exporter)
    assert result.path.is_file() and result.max_abs_error < 1e-4
    # dynamic batch: another batch size runs and matches too
    import onnxruntime as ort

    session = ort.InferenceSession(str(result.path))
    x4 = torch.randn(4, 3, 8, 8)
    (out,) = session.run(None, {session.get_inputs()[0].name: x4.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), model(x4).detach(), atol=1e-4, rtol=1e-3)
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_pruned_bert_exports_with_dynamic_sequence(tmp_path):
    model, inputs = build("bert")
    sc.prune(model, inputs, heads=0.5, ffn=0.3, round_to=1)
    result = export_onnx(model, inputs, tmp_path / "bert.onnx")
    assert result.max_abs_error < 1e-4
    longer = {k: torch.cat([v, v[:, :5]], 1) for k, v in inputs.items()}
    verify_onnx(result.path, model, (), longer)
    assert ort_latency(result.path, model, inputs, warmup=1, runs=3) > 0


def test_mismatch_is_refused_and_nothing_is_left(tmp_path):
    model = models.ConvBN().eval()
    x = (torch.randn(1, 3, 4, 4),)
    path = tmp_path / "m.onnx"
    export_onnx(model, x, path)
    other = models.ConvBN().eval()  # different random weights: outputs differ
    with pytest.raises(VerificationError, match="differs from PyTorch"):
        verify_onnx(path, other, x, {})
    with pytest.raises(CheckpointError, match="exporter"):
        export_onnx(model, x, tmp_path / "n.onnx", exporter="magic")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_fp16_export_carries_the_precision(tmp_path):
    import onnx

    model = models.Grouped().eval()
    x = (torch.randn(2, 3, 8, 8),)
    sc.prune(model, x, ratio=0.5, round_to=1)
    result = export_onnx(model, x, tmp_path / "half.onnx", dtype=torch.float16, atol=2e-2, rtol=2e-2)
    graph = onnx.load(str(result.path)).graph
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in graph.initializer)
    assert next(model.parameters()).dtype == torch.float32  # the user's model is untouched


def test_bf16_needs_verify_false_on_cpu(tmp_path):
    model = models.Grouped().eval()
    x = (torch.randn(2, 3, 8, 8),)
    with pytest.raises(VerificationError, match="verify=False"):
        export_onnx(model, x, tmp_path / "bf.onnx", dtype=torch.bfloat16)
    assert list(tmp_path.iterdir()) == []
    result = export_onnx(model, x, tmp_path / "bf.onnx", dtype=torch.bfloat16, verify=False)
    assert result.path.is_file()


def test_attached_masks_export_as_sparse_weights_not_mul(tmp_path):
    """Above the exporter's folding limit a masked weight would become Mul(weight_orig, weight_mask)."""
    import onnx

    from secateurs.backends.onnx_checks import check_sparsity

    model = torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.ReLU(), torch.nn.Linear(128, 8)).eval()
    x = (torch.randn(2, 128),)
    sc.prune(model, x, nm="2:4")
    assert hasattr(model[0], "weight_mask")  # the user's model keeps its masks
    result = export_onnx(model, x, tmp_path / "m.onnx")
    graph = onnx.load(str(result.path)).graph
    assert "Mul" not in {n.op_type for n in graph.node}
    assert check_sparsity(result.path, modules=["0"]) == []  # the output layer stays dense by design
    assert check_sparsity(result.path, modules=["2"])
    assert hasattr(model[0], "weight_mask")


def test_a_failed_dynamo_export_of_sdpa_attention_is_redone_with_eager_attention(tmp_path):
    import families

    model, inputs = families.build("t5")
    sc.prune(model, inputs, ratio=0.3)
    result = export_onnx(model, inputs, tmp_path / "t5.onnx")
    assert result.exporter == "dynamo (eager attention)" and result.max_abs_error < 1e-4
    assert model.config._attn_implementation == "sdpa"
