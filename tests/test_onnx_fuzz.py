"""Fuzz the ONNX frontend with mutated files: success, or one of the documented errors; never a crash of
another type, never a partial output file."""

import random

import numpy as np
import pytest
import torch

pytest.importorskip("onnx_ir")
import onnx  # noqa: E402
from onnx import numpy_helper  # noqa: E402

from secateurs.backends.onnx import export_onnx  # noqa: E402
from secateurs.errors import SecateursError  # noqa: E402
from secateurs.onnx_prune import prune_onnx  # noqa: E402

import models  # noqa: E402

CASES = 30  # CI budget; tools/fuzz.py --onnx N runs more


def _drop_node(model, rng):
    nodes = model.graph.node
    del nodes[rng.randrange(len(nodes))]


def _reshape_initializer(model, rng):
    inits = [i for i in model.graph.initializer if numpy_helper.to_array(i).size > 1]
    init = rng.choice(inits)
    arr = numpy_helper.to_array(init).reshape(-1)
    cut = arr[: max(1, arr.size - rng.randrange(1, arr.size))]
    init.CopyFrom(numpy_helper.from_array(cut, init.name))


def _opset(model, rng):
    model.opset_import[0].version = rng.choice([1, 6, 9, 11, 12, 30, 99])


def _rewire(model, rng):
    node = rng.choice(list(model.graph.node))
    if node.input:
        node.input[rng.randrange(len(node.input))] = "no_such_value"


def _op_type(model, rng):
    rng.choice(list(model.graph.node)).op_type = rng.choice(["Frobnicate", "Conv", "Relu", "MatMul"])


def _attribute(model, rng):
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.INTS and attr.ints:
                attr.ints[rng.randrange(len(attr.ints))] = rng.choice([0, -1, 3, 1000])
                return


MUTATIONS = [_drop_node, _reshape_initializer, _opset, _rewire, _op_type, _attribute]


def _bytes(data, rng):
    data = bytearray(data)
    if rng.random() < 0.5:
        return bytes(data[: rng.randrange(len(data))])
    for _ in range(rng.randrange(1, 20)):
        data[rng.randrange(len(data))] = rng.randrange(256)
    return bytes(data)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx")
    model = models.Grouped().eval()
    export_onnx(model, (torch.randn(2, 3, 8, 8),), folder / "m.onnx")
    return (folder / "m.onnx").read_bytes()


def fuzz_one(data, seed, folder):
    """One mutated file through prune_onnx; returns 'ok' or the error type name."""
    rng = random.Random(seed)
    src, dst = folder / f"f{seed}.onnx", folder / f"f{seed}_out.onnx"
    if rng.random() < 0.2:
        src.write_bytes(_bytes(data, rng))
    else:
        model = onnx.load_from_string(data)
        for _ in range(rng.randrange(1, 3)):
            rng.choice(MUTATIONS)(model, rng)
        src.write_bytes(model.SerializeToString())
    try:
        prune_onnx(src, dst, channels=0.3)
    except SecateursError as exc:
        assert not dst.exists(), f"seed {seed}: {type(exc).__name__} left {dst}"
        assert str(exc), f"seed {seed}: empty message"
        return type(exc).__name__
    import onnxruntime as ort

    session = ort.InferenceSession(str(dst))
    feeds = {i.name: np.random.default_rng(0).standard_normal(
        [d if isinstance(d, int) else 2 for d in i.shape]).astype(np.float32) for i in session.get_inputs()}
    session.run(None, feeds)
    return "ok"


def test_mutated_files_give_documented_errors_only(exported, tmp_path):
    outcomes = {}
    for seed in range(CASES):
        outcome = fuzz_one(exported, seed, tmp_path)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    assert set(outcomes) <= {"ok", "CheckpointError", "CaptureError", "VerificationError", "BudgetError",
                             "UnsupportedOpError"}, outcomes
    assert outcomes.get("ok", 0) < CASES  # the mutations do break files
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []
