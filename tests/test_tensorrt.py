"""TensorRT backend and the TensorRT-friendly ONNX checks.

The ONNX checks (2:4 layout along TensorRT's axis, channel alignment, constant folding) and the TensorRT
backend's control flow (against a stand-in ``tensorrt`` module) run anywhere. The engine tests at the end need
the real ``tensorrt`` package and a CUDA GPU and are skipped, with the reason, without them.
"""

import enum
import importlib.machinery
import json
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

import secateurs as sc

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from secateurs.backends import tensorrt as trt_backend  # noqa: E402
from secateurs.backends.onnx import export_onnx  # noqa: E402
from secateurs.backends.onnx_checks import (  # noqa: E402
    channel_alignment,
    check_sparsity,
    fold_constants,
    sparsity_layout,
)
from secateurs.backends.tensorrt import build_engine, engine_latency, run_engine  # noqa: E402
from secateurs.errors import BackendUnavailableError, CheckpointError  # noqa: E402
from secateurs.passes.sparsity import check_nm, remove_masks  # noqa: E402

from zoo import build  # noqa: E402


class MLP(nn.Module):
    def __init__(self, width=64, hidden=128, out=16):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, out)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class CNN(nn.Module):
    def __init__(self, width=32, classes=16):
        super().__init__()
        self.conv1 = nn.Conv2d(8, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.conv3 = nn.Conv2d(width, width, 1)
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(torch.relu(self.conv3(x)).mean((2, 3)))


def _mlp():
    return MLP().eval(), (torch.randn(4, 64),)


def _cnn():
    return CNN().eval(), (torch.randn(2, 8, 8, 8),)


def _targeted(report):
    return [name for name, _ in report.sparsity.layers]


def _ort(path, feeds):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: v for i, v in zip(session.get_inputs(), feeds, strict=True)})


# --- 2:4 layout as TensorRT sees it ------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [_mlp, _cnn], ids=["linear", "conv"])
@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_nm_sparsified_model_passes_the_layout_check(make, exporter, tmp_path):
    model, x = make()
    report = sc.prune(model, x, nm="2:4")
    targeted = _targeted(report)
    assert targeted and not check_nm(model, names=targeted)
    remove_masks(model)  # bake the masks (see the masked-export test below for what happens otherwise)
    path = export_onnx(model, x, tmp_path / "m.onnx", exporter=exporter).path
    assert check_sparsity(path, modules=targeted) == []
    layouts = {lay.module: lay for lay in sparsity_layout(path)}
    assert all(layouts[name].sparse and layouts[name].groups > 0 for name in targeted)
    # the classifier is left dense by the pass, and the check says so by name
    head = "head" if "head" in layouts else "fc"
    assert layouts[head].status == "dense"
    assert any(f"'{head}'" in msg for msg in check_sparsity(path))


def test_transformer_matmul_weights_are_checked_along_k(tmp_path):
    # 3-D activations: the exporters write nn.Linear as MatMul with B = W^T, so K is B's rows (axis -2)
    model, inputs = build("bert")
    report = sc.prune(model, inputs, nm="2:4")
    remove_masks(model)
    path = export_onnx(model, inputs, tmp_path / "bert.onnx").path
    layouts = [lay for lay in sparsity_layout(path) if lay.module in set(_targeted(report))]
    assert {lay.op for lay in layouts} == {"MatMul"}
    assert all(lay.axis == 0 and lay.sparse for lay in layouts)
    assert check_sparsity(path, modules=_targeted(report)) == []


def test_dense_model_fails_and_names_the_initializer(tmp_path):
    model, x = _mlp()
    path = export_onnx(model, x, tmp_path / "dense.onnx").path
    problems = check_sparsity(path)
    assert len(problems) == 3
    assert any("'fc1.weight'" in p and "break the pattern" in p for p in problems)
    with pytest.raises(CheckpointError, match="no Conv / Gemm / MatMul weight of module"):
        check_sparsity(path, modules=["nowhere"])


@torch.no_grad()
def _sparsify_wrong_axis(module):
    """2:4 along the output-channel axis (axis 0): the pattern TensorRT does not accelerate."""
    w = module.weight
    rows = w.movedim(0, -1).reshape(-1, 4)
    keep = torch.zeros_like(rows, dtype=torch.bool)
    keep.scatter_(1, rows.abs().topk(2, dim=1).indices, True)
    w.copy_((rows * keep).reshape(w.movedim(0, -1).shape).movedim(-1, 0))


@pytest.mark.parametrize("make", [_mlp, _cnn], ids=["linear", "conv"])
def test_sparse_along_the_wrong_axis_fails(make, tmp_path):
    model, x = make()
    layer = model.fc1 if isinstance(model, MLP) else model.conv2
    _sparsify_wrong_axis(layer)
    assert float((layer.weight == 0).float().mean()) == 0.5
    name = "fc1" if isinstance(model, MLP) else "conv2"
    assert check_nm(model, names=[name])  # the PyTorch-side check agrees
    path = export_onnx(model, x, tmp_path / "wrong.onnx").path
    (problem,) = check_sparsity(path, modules=[name])
    assert f"'{name}.weight'" in problem and "along axis 1" in problem


def test_attached_masks_export_as_sparse_weights(tmp_path):
    # export_onnx makes attached masks permanent on a copy: no Mul(weight_orig, weight_mask) in the file
    model, x = MLP(width=128, hidden=256).eval(), (torch.randn(4, 128),)
    report = sc.prune(model, x, nm="2:4")
    path = export_onnx(model, x, tmp_path / "masked.onnx").path
    layouts = {lay.module: lay for lay in sparsity_layout(path)}
    assert layouts["fc2"].status == "sparse" and layouts["fc2"].bad_groups == 0
    assert check_sparsity(path, modules=_targeted(report)) == []


class _MaskedMatmul(torch.nn.Module):
    """A weight computed as weight * mask in forward: above the exporter's folding limit it stays a Mul."""

    def __init__(self):
        super().__init__()
        self.weight_orig = torch.nn.Parameter(torch.randn(256, 128))
        mask = torch.zeros(256, 128)
        mask[:, 0::4] = 1
        mask[:, 1::4] = 1
        self.register_buffer("weight_mask", mask)

    def forward(self, x):
        return x @ (self.weight_orig * self.weight_mask).t()


def test_computed_weights_are_flagged_until_folded(tmp_path):
    model, x = _MaskedMatmul().eval(), (torch.randn(4, 128),)
    path = export_onnx(model, x, tmp_path / "computed.onnx").path
    layouts = sparsity_layout(path)
    assert [lay.status for lay in layouts] == ["computed"] and "fold_constants()" in layouts[0].describe()
    reference = _ort(path, [x[0].numpy()])

    folded = fold_constants(path, tmp_path / "folded.onnx")
    assert folded.nodes_after < folded.nodes_before and folded.bytes_after < folded.bytes_before
    np.testing.assert_array_equal(_ort(folded.path, [x[0].numpy()])[0], reference[0])
    assert [lay.status for lay in sparsity_layout(folded.path)] == ["sparse"]

    # weights as external data (what models over 2 GB need) run the same
    external = fold_constants(path, tmp_path / "ext" / "m.onnx", external_data_bytes=0)
    assert sorted(p.name for p in external.path.parent.iterdir()) == ["m.onnx", "m.onnx.data"]
    np.testing.assert_array_equal(_ort(external.path, [x[0].numpy()])[0], reference[0])

    # folding in place leaves only the model
    fold_constants(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["computed.onnx", "ext", "folded.onnx"]
    assert [lay.status for lay in sparsity_layout(path)] == ["sparse"]


def test_fold_constants_keeps_outputs_of_a_pruned_transformer(tmp_path):
    model, inputs = build("distilbert")
    sc.prune(model, inputs, heads=0.5, ffn=0.3, round_to=1)
    path = export_onnx(model, inputs, tmp_path / "m.onnx").path
    feeds = [v.numpy() for v in inputs.values()]
    before = _ort(path, feeds)
    folded = fold_constants(path, tmp_path / "f.onnx")
    for a, b in zip(before, _ort(folded.path, feeds), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(CheckpointError, match="does not exist"):
        fold_constants(tmp_path / "missing.onnx")


# --- channel alignment -------------------------------------------------------------------------------------------

def test_channel_alignment_flags_odd_widths_and_passes_rounded_ones(tmp_path):
    x = (torch.randn(2, 8, 8, 8),)
    odd = CNN(width=48).eval()
    sc.prune(odd, x, ratio=0.3, round_to=1)
    assert odd.conv1.out_channels % 8
    path = export_onnx(odd, x, tmp_path / "odd.onnx").path
    flagged = {a.module: a for a in channel_alignment(path)}
    assert set(flagged) == {"conv1", "conv2", "conv3", "fc"}
    assert flagged["conv1"].misaligned == ("out",) and flagged["fc"].misaligned == ("in",)
    assert "misaligned" in flagged["conv2"].describe()

    rounded = CNN(width=48).eval()
    sc.prune(rounded, x, ratio=0.3, round_to=8)
    assert rounded.conv1.out_channels % 8 == 0
    path8 = export_onnx(rounded, x, tmp_path / "aligned.onnx").path
    assert channel_alignment(path8) == []
    # the 8 input channels and 16 classes are the model's interface: reported only with fixed_io=False
    strict = {a.module: a.misaligned for a in channel_alignment(path8, multiple=32, fixed_io=False)}
    assert "in" in strict["conv1"] and "out" in strict["fc"]
    lenient = {a.module: a.misaligned for a in channel_alignment(path8, multiple=32)}
    assert "in" not in lenient.get("conv1", ()) and "out" not in lenient.get("fc", ())


# --- TensorRT backend without a GPU ------------------------------------------------------------------------------

def _trt_ready():
    try:
        import tensorrt  # noqa: F401
    except (ImportError, OSError):
        return False
    return torch.cuda.is_available()


@pytest.mark.skipif(_trt_ready(), reason="TensorRT and a GPU are present: the missing-backend error cannot happen")
def test_missing_tensorrt_or_gpu_is_a_clear_error_and_leaves_nothing(tmp_path):
    model, x = _mlp()
    path = export_onnx(model, x, tmp_path / "m.onnx", exporter="legacy").path
    message = r"TensorRT is not installed: pip install secateurs\[trt\]|no CUDA GPU"
    with pytest.raises(BackendUnavailableError, match=message):
        build_engine(path, tmp_path / "m.engine", sparse=True, timing_cache=tmp_path / "cache.bin")
    with pytest.raises(BackendUnavailableError, match=message):
        engine_latency(tmp_path / "m.engine", x)
    with pytest.raises(BackendUnavailableError, match=message):
        run_engine(tmp_path / "m.engine", x)
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]
    assert isinstance(BackendUnavailableError("x"), sc.SecateursError)


def test_profile_shapes_follow_the_dynamic_dims():
    inputs = [("input_ids", ["s0", "s1"], 7), ("attention_mask", ["s2", "s1"], 7), ("pixels", [None, 3, 4], 1),
              ("static", [2, 3], 1)]
    shapes = trt_backend._profile_shapes(inputs, None, {"input_ids": (4, 40)}, {"input_ids": (8, 64)},
                                         batch=(1, 2, 16), dims=(1, 32, 128))
    # input_ids: min from the defaults, opt / max given; the mask shares "s1" (sequence) but not the batch symbol
    assert shapes["input_ids"] == ((1, 1), (4, 40), (8, 64))
    assert shapes["attention_mask"] == ((1, 1), (2, 40), (16, 64))
    assert shapes["pixels"] == ((1, 3, 4), (2, 3, 4), (16, 3, 4))
    assert "static" not in shapes
    with pytest.raises(CheckpointError, match="rank"):
        trt_backend._profile_shapes(inputs, {"input_ids": (1,)}, None, None, (1, 1, 8), (1, 8, 8))
    with pytest.raises(CheckpointError, match="no ONNX input"):
        trt_backend._profile_shapes(inputs, {"nope": (1,)}, None, None, (1, 1, 8), (1, 8, 8))
    with pytest.raises(CheckpointError, match="static dims"):
        trt_backend._profile_shapes(inputs, {"pixels": (1, 4, 4)}, None, None, (1, 1, 8), (1, 8, 8))
    with pytest.raises(CheckpointError, match="min <= opt <= max"):
        trt_backend._profile_shapes(inputs, None, None, None, (4, 1, 8), (1, 8, 8))


def test_sparsity_report_parsers():
    lines = ["something else",
             "(Sparsity) Layers eligible for sparse math: conv1, conv2, /fc/Gemm",
             "(Sparsity) TRT inference plan picked sparse implementation for layers: conv2, /fc/Gemm"]
    assert trt_backend._parse_sparsity_log(lines) == (("conv1", "conv2", "/fc/Gemm"), ("conv2", "/fc/Gemm"))
    assert trt_backend._parse_sparsity_log([]) == ((), ())
    detailed = json.dumps({"Layers": [{"Name": "conv1", "LayerType": "CaskConvolution", "TacticName": "sm80_xmma"},
                                      {"Name": "conv2", "LayerType": "CaskConvolution",
                                       "TacticName": "sm80_xmma_fprop_sparse_conv"}]})
    layers = trt_backend._parse_inspector(detailed)
    assert [(lay.name, lay.tactic) for lay in layers] == [("conv1", "sm80_xmma"),
                                                          ("conv2", "sm80_xmma_fprop_sparse_conv")]
    assert [lay.name for lay in trt_backend._parse_inspector(json.dumps({"Layers": ["a", "b"]}))] == ["a", "b"]
    assert trt_backend._parse_inspector("not json") == ()


def _fake_tensorrt(*, fp16_flag, fail_build=False):
    """A stand-in for the parts of the ``tensorrt`` module build_engine uses (TensorRT 10 / 11 Python API)."""
    import onnx

    calls = {"flags": [], "profiles": {}, "caches_loaded": []}
    trt = types.ModuleType("tensorrt")
    trt.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)  # torch._dynamo looks modules up by spec
    trt.__version__ = "10.fake"

    class Severity(enum.IntEnum):
        INTERNAL_ERROR = 0
        ERROR = 1
        WARNING = 2
        INFO = 3
        VERBOSE = 4

    class ILogger:
        def __init__(self):
            pass

    ILogger.Severity = Severity
    trt.ILogger = ILogger
    trt.BuilderFlag = enum.IntEnum("BuilderFlag", ["TF32", "SPARSE_WEIGHTS"] + (["FP16"] if fp16_flag else []))
    trt.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", {"STRONGLY_TYPED": 1})
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
    trt.ProfilingVerbosity = types.SimpleNamespace(DETAILED="detailed")
    trt.LayerInformationFormat = types.SimpleNamespace(JSON="json")

    class Network:
        inputs = []

        def __init__(self, flags):
            calls["network_flags"] = flags

        @property
        def num_inputs(self):
            return len(self.inputs)

        def get_input(self, i):
            return self.inputs[i]

    class OnnxParser:
        num_errors = 0

        def __init__(self, network, logger):
            self.network = network

        def parse_from_file(self, path):
            graph = onnx.load(path).graph
            self.network.inputs = [
                types.SimpleNamespace(name=i.name, shape=[d.dim_value or -1 for d in i.type.tensor_type.shape.dim])
                for i in graph.input]
            return True

    class Profile:
        def set_shape(self, name, lo, mid, hi):
            calls["profiles"][name] = (lo, mid, hi)

    class Config:
        profiling_verbosity = None

        def set_memory_pool_limit(self, pool, size):
            calls["workspace"] = size

        def set_flag(self, flag):
            calls["flags"].append(flag.name)

        def add_optimization_profile(self, profile):
            pass

        def create_timing_cache(self, blob):
            calls["caches_loaded"].append(bytes(blob))
            return bytes(blob)

        def set_timing_cache(self, cache, ignore_mismatch):
            return True

        def get_timing_cache(self):
            return types.SimpleNamespace(serialize=lambda: b"timings")

    class Builder:
        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags):
            return Network(flags)

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            self.logger.log(Severity.INFO, "(Sparsity) Layers eligible for sparse math: fc1, fc2")
            self.logger.log(Severity.INFO, "(Sparsity) TRT inference plan picked sparse implementation for layers: fc2")
            if fail_build:
                self.logger.log(Severity.ERROR, "out of memory while building")
                return None
            return b"ENGINE"

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            info = json.dumps({"Layers": [{"Name": "fc1", "TacticName": "gemm"},
                                          {"Name": "fc3", "TacticName": "sm90_sparse_gemm"}]})
            inspector = types.SimpleNamespace(get_engine_information=lambda fmt: info)
            return types.SimpleNamespace(create_engine_inspector=lambda: inspector)

    trt.OnnxParser, trt.Builder, trt.Runtime = OnnxParser, Builder, Runtime
    return trt, calls


@pytest.fixture
def fake_trt(monkeypatch):
    def install(**kw):
        trt, calls = _fake_tensorrt(**kw)
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        return calls

    return install


def test_build_flow_with_a_tensorrt10_style_api(fake_trt, tmp_path):
    model, x = _mlp()
    path = export_onnx(model, x, tmp_path / "m.onnx").path
    calls = fake_trt(fp16_flag=True)  # after exporting: it makes torch.cuda.is_available() say True
    cache = tmp_path / "timing.cache"
    result = build_engine(path, tmp_path / "out" / "m.engine", fp16=True, sparse=True, timing_cache=cache,
                          workspace_gb=0.5)
    assert result.path.read_bytes() == b"ENGINE" and cache.read_bytes() == b"timings"
    assert calls["flags"] == ["FP16", "SPARSE_WEIGHTS"] and calls["network_flags"] == 0  # weakly typed + flag
    assert calls["workspace"] == 1 << 29 and result.precision == "fp16 (builder flag)"
    assert calls["profiles"] == {"x": ((1, 64), (1, 64), (8, 64))}  # the dynamic batch, default range
    assert result.sparse_eligible == ("fc1", "fc2") and result.sparse_layers == ("fc2", "fc3")
    build_engine(path, tmp_path / "out" / "m.engine", timing_cache=cache, batch=(2, 4, 4))
    assert calls["caches_loaded"] == [b"", b"timings"]
    assert calls["profiles"]["x"] == ((2, 64), (4, 64), (4, 64))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["m.engine"]


def test_build_flow_with_a_strongly_typed_tensorrt11_style_api(fake_trt, tmp_path):
    model, x = _mlp()
    fp32 = export_onnx(model, x, tmp_path / "fp32.onnx").path
    half = export_onnx(model, x, tmp_path / "fp16.onnx", dtype=torch.float16, atol=1e-2, rtol=1e-2).path
    calls = fake_trt(fp16_flag=False)
    with pytest.raises(CheckpointError, match=r"dtype=torch.float16"):
        build_engine(fp32, tmp_path / "a.engine", fp16=True)
    result = build_engine(half, tmp_path / "b.engine", fp16=True, sparse=True)
    assert calls["network_flags"] == 1 << 1 and calls["flags"] == ["SPARSE_WEIGHTS"]
    assert result.precision == "from the file (strongly typed)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.engine", "fp16.onnx", "fp32.onnx"]


def test_failed_build_leaves_nothing(fake_trt, tmp_path):
    model, x = _mlp()
    path = export_onnx(model, x, tmp_path / "m.onnx", exporter="legacy").path
    fake_trt(fp16_flag=True, fail_build=True)
    with pytest.raises(CheckpointError, match="out of memory"):
        build_engine(path, tmp_path / "m.engine", timing_cache=tmp_path / "cache")
    with pytest.raises(CheckpointError, match="does not exist"):
        build_engine(tmp_path / "missing.onnx", tmp_path / "m.engine")
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


# --- TensorRT engines (GPU only) ----------------------------------------------------------------------------------

def _trt_state():
    try:
        import tensorrt
    except (ImportError, OSError) as exc:
        return f"tensorrt not importable ({type(exc).__name__})"
    return f"tensorrt {tensorrt.__version__}"


gpu = pytest.mark.skipif(
    not _trt_ready(),
    reason="needs the tensorrt package (pip install secateurs[trt]) and a CUDA GPU; here: "
           f"{_trt_state()}, torch.cuda.is_available()={torch.cuda.is_available()}",
)


class BigCNN(nn.Module):
    """256-channel 3x3 convolutions: where TensorRT has sparse kernels worth picking."""

    def __init__(self, width=256):
        super().__init__()
        self.stem = nn.Conv2d(8, width, 3, padding=1)
        self.body = nn.Sequential(*[nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU())
                                    for _ in range(4)])
        self.head = nn.Conv2d(width, 16, 1)

    def forward(self, x):
        return self.head(self.body(torch.relu(self.stem(x))))


def _big(batch=8):
    torch.manual_seed(0)
    return BigCNN().eval(), (torch.randn(batch, 8, 32, 32),)


def _half_onnx(model, x, path):
    """An FP16 file with the masks baked in: what TensorRT 11 needs, and TensorRT 10 builds it strongly typed."""
    remove_masks(model)
    one = tuple(t[:1] for t in x)  # the batch axis stays dynamic; PyTorch's FP16 convs on the CPU are slow
    return export_onnx(model, one, path, dtype=torch.float16, atol=5e-2, rtol=5e-2).path


def _close(outputs, model, x, tol):
    """The engine's output against PyTorch FP32, relative to the output's largest magnitude."""
    (got,) = outputs.values()
    with torch.no_grad():
        want = model.float()(*x)
    err = float((got.float().cpu() - want).abs().max() / want.abs().max())
    assert err < tol, err


@gpu
def test_sparse_engine_of_a_2_4_model(tmp_path):
    model, x = _big()
    report = sc.prune(model, x, nm="2:4")
    path = _half_onnx(model, x, tmp_path / "sparse.onnx")
    assert check_sparsity(path, modules=_targeted(report)) == []
    result = build_engine(path, tmp_path / "sparse.engine", fp16=True, sparse=True, timing_cache=tmp_path / "cache",
                          opt_shapes={"x": (8, 8, 32, 32)}, max_shapes={"x": (8, 8, 32, 32)})
    assert result.path.is_file() and (tmp_path / "cache").is_file() and result.layers
    assert result.sparse_eligible, "TensorRT reported no 2:4-eligible layer in a 2:4 model"
    assert set(result.sparse_layers) <= {lay.name for lay in result.layers} | set(result.sparse_eligible)
    _close(run_engine(result.path, x), model, x, tol=2e-2)


@gpu
def test_fp16_engine_matches_pytorch(tmp_path):
    import tensorrt as trt

    model, x = _mlp()
    path = _half_onnx(model, x, tmp_path / "half.onnx")
    result = build_engine(path, tmp_path / "half.engine", fp16=True, optimization_level=1)
    assert result.precision == "from the file (strongly typed)"
    _close(run_engine(result.path, x), model, x, tol=1e-2)
    if hasattr(trt.BuilderFlag, "FP16"):  # TensorRT 10: the flag on an FP32 file works too
        fp32 = export_onnx(model, x, tmp_path / "fp32.onnx").path
        flagged = build_engine(fp32, tmp_path / "flag.engine", fp16=True, optimization_level=1)
        assert flagged.precision == "fp16 (builder flag)"
        _close(run_engine(flagged.path, x), model, x, tol=1e-2)


@gpu
def test_dynamic_batch_profile(tmp_path):
    model, x = _cnn()
    path = export_onnx(model, x, tmp_path / "cnn.onnx").path
    result = build_engine(path, tmp_path / "cnn.engine", min_shapes={"x": (1, 8, 8, 8)},
                          opt_shapes={"x": (4, 8, 8, 8)}, max_shapes={"x": (8, 8, 8, 8)}, optimization_level=1)
    for batch in (1, 8):
        xb = (torch.randn(batch, 8, 8, 8),)
        _close(run_engine(result.path, xb), model, xb, tol=1e-2)  # TF32 may be on
    with pytest.raises(CheckpointError, match="outside the engine's profile"):
        run_engine(result.path, (torch.randn(9, 8, 8, 8),))


@gpu
def test_latency_dense_vs_sparse_vs_pruned(tmp_path):
    batch = 32
    ms = {}
    for name in ("dense", "sparse", "pruned"):
        model, x = _big(batch)
        if name == "sparse":
            sc.prune(model, x, nm="2:4")
        elif name == "pruned":
            sc.prune(model, x, ratio=0.5)
        path = _half_onnx(model, x, tmp_path / f"{name}.onnx")
        shape = {"x": (batch, 8, 32, 32)}
        engine = build_engine(path, tmp_path / f"{name}.engine", fp16=True, sparse=name == "sparse",
                              opt_shapes=shape, max_shapes=shape, timing_cache=tmp_path / "cache")
        ms[name] = engine_latency(engine.path, x, warmup=20, runs=100)
    assert all(v > 0 for v in ms.values())
    assert ms["pruned"] < ms["dense"], ms  # half the channels of every conv: about a quarter of the work
    assert ms["sparse"] < 1.1 * ms["dense"], ms  # TensorRT keeps dense kernels where sparse ones are slower
