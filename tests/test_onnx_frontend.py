"""ONNX frontend: prune .onnx files directly.

Oracles: the same kept channels and the same outputs as ``secateurs.prune`` on the PyTorch module (ONNX Runtime
on the pruned file == the pruned module); bit-identical outputs at ratio 0; exact outputs when the removed
channels are dead; typed errors and no file left behind on malformed input.
"""

import copy
import json
import re

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytest.importorskip("onnx_ir")

import onnx  # noqa: E402
import onnx_ir  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import secateurs as sc  # noqa: E402
from secateurs.backends.onnx import export_onnx  # noqa: E402
from secateurs.errors import BudgetError, CaptureError, CheckpointError, UnsupportedOpError, VerificationError  # noqa: E402
from secateurs.frontends.onnx_model import load_onnx  # noqa: E402
from secateurs.ir.onnx_depgraph import analyze_onnx  # noqa: E402
from secateurs.ir.onnx_rules import ONNX_RULES, OnnxOpRuleTable  # noqa: E402
from secateurs.onnx_prune import prune_onnx  # noqa: E402

import helpers  # noqa: E402
import models  # noqa: E402
from zoo import build  # noqa: E402


# ----------------------------------------------------------------------------------------------- helpers
def _run(path, inputs):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    if isinstance(inputs, dict):
        feeds = {n: inputs[n].numpy() for n in names}
    else:
        feeds = {n: t.numpy() for n, t in zip(names, inputs, strict=True)}
    return session.run(None, feeds)


def _torch(model, inputs):
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, dict) else model(*inputs)
    return [t.numpy() for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _sizes(changes):
    return sorted((c.before, c.after) for c in changes)


def _jitter(model):
    """Make every parameter distinct: freshly initialised biases and norms are all 0 / 1, and exporters merge
    equal initializers (the frontend unties them, but distinct values also make the l2 ranking meaningful)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _assert_same(got, want, atol=1e-4):
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, atol=atol, rtol=1e-4)


def _parity(tmp_path, model, inputs, src=None, **options):
    """Prune the PyTorch module and its ONNX export with the same options; return both reports."""
    dst = tmp_path / "pruned.onnx"
    if src is None:
        src = tmp_path / "model.onnx"
        export_onnx(model, inputs, src)
    pruned = copy.deepcopy(model)
    report = sc.prune(pruned, inputs, importance="l2", round_to=1, **options)
    onnx_report = prune_onnx(src, dst, importance="l2", round_to=1, **options)
    return pruned, report, onnx_report, dst


SMALL = {
    "Grouped": (torch.randn(2, 3, 8, 8),),  # grouped + depthwise conv: the group attribute is rewritten
    "FlattenHead": (torch.randn(2, 3, 4, 4),),  # conv channels x H x W flattened into a Gemm
    "UNetish": (torch.randn(2, 3, 8, 8),),  # GroupNorm (Reshape + InstanceNormalization), ConvTranspose, Concat
    "Seq1d": (torch.randint(0, 20, (2, 9)),),  # embedding Gather, Conv1d, LayerNorm
    "Attention": (torch.randn(2, 7, 24),),  # GQA: Expand-based repeat of KV heads, head product refinement
    "FusedQKV": (torch.randn(2, 7, 24),),  # one linear for q, k, v split with Split
    "FusedQKVTimm": (torch.randn(2, 7, 24),),  # (3, heads, head_dim) reshape + Transpose + Gather
    "InterleavedGLU": (torch.randn(2, 7, 24),),  # gate / up interleaved: strided Slice
    "PositionOps": (torch.randn(2, 5, 6),),  # TopK, CumSum, Trilu: positions frozen, channels pass
    "IndexOps": (torch.randn(2, 5, 6),),  # Gather, GatherElements, Slice, BatchNormalization, Gemm
}


@pytest.fixture(scope="module")
def bert_onnx(tmp_path_factory):
    """A tiny BERT with distinct parameters and its ONNX export (made once for the module)."""
    torch.manual_seed(0)
    model, inputs = build("bert")
    _jitter(model)
    path = tmp_path_factory.mktemp("bert") / "bert.onnx"
    export_onnx(model, inputs, path)
    return model, inputs, path


# ------------------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("name", sorted(SMALL))
def test_small_models_match_the_pytorch_path(name, tmp_path):
    model = getattr(models, name)().eval()
    inputs = SMALL[name]
    pruned, report, onnx_report, dst = _parity(tmp_path, model, inputs, ratio=0.5)
    assert onnx_report.changes, "something was pruned"
    assert _sizes(onnx_report.changes) == _sizes(report.changes)
    _assert_same(_run(dst, inputs), _torch(pruned, inputs))
    assert onnx_report.params_after < onnx_report.params_before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "pruned.onnx"]


def test_channels_a_constant_of_the_analysis_ties_are_frozen_and_reported(tmp_path):
    """An index tensor computed from sizes and constants has a literal C: the channels it meets are listed."""
    model = models.ShapeIndexGather().eval()
    inputs = (torch.randn(2, 5, 6),)
    src = tmp_path / "model.onnx"
    export_onnx(model, inputs, src)
    report = sc.prune(copy.deepcopy(model), inputs, ratio=0.5, round_to=1)
    assert _sizes(report.changes) == [(8, 4)]  # PyTorch re-derives the index's shape from h
    info = analyze_onnx(load_onnx(src))
    assert info.groups == {}
    tied = [f for f in info.frozen if "computed from sizes and constants" in f.reason]
    assert [f.size for f in tied] == [8], info.frozen
    with pytest.raises(BudgetError, match="selects no prunable group.*computed from sizes and constants"):
        prune_onnx(src, tmp_path / "pruned.onnx", ratio=0.5, round_to=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_a_structure_ratio_that_selects_nothing_in_an_onnx_file_is_refused(tmp_path):
    """As in memory: --channels on a file whose groups are all FFN neurons is an error, nothing written."""
    model = models.IndexOps().eval()
    inputs = (torch.randn(2, 5, 6),)
    src = tmp_path / "model.onnx"
    export_onnx(model, inputs, src)
    with pytest.raises(BudgetError, match=r"channels=0.5 \(--channels\) selects no group.*use ffn="):
        prune_onnx(src, tmp_path / "pruned.onnx", channels=0.5, round_to=1)
    with pytest.raises(BudgetError, match="removes no channel"):
        prune_onnx(src, tmp_path / "pruned.onnx", ffn=0.05, round_to=8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


@pytest.mark.parametrize("target", ["params", "flops"])
@pytest.mark.parametrize("name", sorted(SMALL))
def test_params_and_flops_targets_are_met_on_the_onnx_graph_as_in_pytorch(name, target, tmp_path):
    """A params / FLOPs budget is costed on the ONNX graph itself; it is met, and the plan is the PyTorch path's."""
    model = getattr(models, name)().eval()
    inputs = SMALL[name]
    pruned, report, onnx_report, dst = _parity(tmp_path, model, inputs, ratio=0.3, target=target)
    assert onnx_report.changes and _sizes(onnx_report.changes) == _sizes(report.changes)
    before, after = ((onnx_report.params_before, onnx_report.params_after) if target == "params"
                     else (onnx_report.flops_before, onnx_report.flops_after))
    assert after <= 0.7 * before
    _assert_same(_run(dst, inputs), _torch(pruned, inputs))


@pytest.mark.parametrize(("allocate", "unit"), [("global", "channels"), ("lamp", "params"), ("dp", "flops"),
                                              ("owl", "channels")])
def test_the_budget_allocators_run_on_an_onnx_file_as_on_the_module(allocate, unit, tmp_path, bert_onnx):
    """The same AllocateBudget pass and cost model over the ONNX graph: the per-group widths equal the PyTorch
    path's, the budget is met, and the file runs and matches the pruned module."""
    model, inputs, src = bert_onnx
    pruned, report, onnx_report, dst = _parity(tmp_path, model, inputs, src, ffn=0.4, allocate=allocate,
                                               budget_unit=unit)
    assert onnx_report.changes and _sizes(onnx_report.changes) == _sizes(report.changes)
    widths = {c.after for c in onnx_report.changes}
    if allocate != "global":  # global ranks raw scores: equal layers may still get equal widths
        assert len(widths) > 1 or unit == "channels", "a layer-adaptive allocation"
    ffn = [c for c in onnx_report.changes if c.kind == "ffn"]  # the ONNX report names each group's structure
    assert {c.kind for c in onnx_report.changes} == {c.kind for c in report.changes} == {"ffn"}
    removed = sum(c.before - c.after for c in ffn) / sum(c.before for c in ffn)
    assert removed == pytest.approx(0.4, abs=0.05)
    _assert_same(_run(dst, inputs), _torch(pruned, inputs))


def test_allocators_that_run_the_model_are_refused_for_an_onnx_file(tmp_path, bert_onnx):
    _, _, src = bert_onnx
    with pytest.raises(BudgetError, match="ecoflap.*cannot run in an ONNX file.*choose from global, lamp, owl, dp"):
        prune_onnx(src, tmp_path / "out.onnx", ffn=0.4, allocate="ecoflap")
    # the pass itself refuses too, for a pipeline built by hand
    from secateurs.passes import AllocateBudget, PassManager
    from secateurs.passes.onnx_dependencies import AnalyzeOnnxDependencies
    from secateurs.passes.onnx_importance import ScoreOnnxChannels

    with pytest.raises(BudgetError, match="the cfsp allocator runs the model"):
        PassManager([AnalyzeOnnxDependencies(), ScoreOnnxChannels(), AllocateBudget(0.3, "cfsp")])(load_onnx(src))
    with pytest.raises(BudgetError, match="latency_backend"):
        prune_onnx(src, tmp_path / "out.onnx", ffn=0.4, allocate="dp", budget_unit="latency", latency_backend="torch")
    assert not (tmp_path / "out.onnx").exists()


def test_a_latency_budget_on_an_onnx_file_is_timed_in_onnx_runtime(tmp_path, bert_onnx):
    """budget_unit='latency': every MatMul / Gemm a group slices is timed alone in ONNX Runtime (cached), the
    DP allocator spends the budget by measured time, and ``speedup`` reports the whole file's latency."""
    _, _, src = bert_onnx
    cache = tmp_path / "latency.json"
    report = prune_onnx(src, tmp_path / "out.onnx", ffn=0.5, allocate="dp", budget_unit="latency",
                        latency_cache=str(cache))
    assert report.changes and report.params_after < report.params_before
    entries = json.loads(cache.read_text())
    assert entries and all(k.startswith("onnxruntime|") and "|onnx|" in k for k in entries)
    assert all(v > 0 for v in entries.values())
    again = prune_onnx(src, tmp_path / "again.onnx", ffn=0.5, allocate="dp", budget_unit="latency",
                       latency_cache=str(cache))
    assert json.loads(cache.read_text()) == entries  # nothing new measured: the same layers, the same plan
    assert _sizes(again.changes) == _sizes(report.changes)
    try:
        fast = prune_onnx(src, tmp_path / "fast.onnx", speedup=1.01, latency_cache=str(cache))
    except BudgetError as exc:  # this tiny model's prunable layers are a few % of its time: ask for half of that
        prunable, total = map(float, re.search(r"take ([\d.]+) ms of ([\d.]+) ms", str(exc)).groups())
        fast = prune_onnx(src, tmp_path / "fast.onnx", speedup=1 / (1 - 0.5 * prunable / total),
                          latency_cache=str(cache))
    assert fast.latency_before and fast.latency_after and "ONNX Runtime CPU" in str(fast)


def test_bert_heads_and_ffn_match_the_pytorch_path(tmp_path, bert_onnx):
    model, inputs, src = bert_onnx
    pruned, report, onnx_report, dst = _parity(tmp_path, model, inputs, src, heads=0.5, ffn=0.5)
    assert _sizes(onnx_report.changes) == _sizes(report.changes) == [(4, 2), (4, 2), (96, 48), (96, 48)]
    _assert_same(_run(dst, inputs), _torch(pruned, inputs))
    # The batch and sequence axes stay dynamic: another batch size and a longer sequence run and match.
    longer = {k: torch.cat([v, v[:, :5]], 1).repeat(2, 1) for k, v in inputs.items()}
    _assert_same(_run(dst, longer), _torch(pruned, longer))


def test_llama_gqa_heads_kv_groups_ffn_and_hidden_match(tmp_path):
    model, inputs = build("llama")
    _jitter(model)
    src = tmp_path / "llama.onnx"
    export_onnx(model, inputs, src)
    pruned, report, onnx_report, dst = _parity(tmp_path, model, inputs, src, heads=0.5, kv_groups=0.5, ffn=0.5)
    assert _sizes(onnx_report.changes) == _sizes(report.changes)
    assert (2, 1) in _sizes(onnx_report.changes) and (4, 2) in _sizes(onnx_report.changes)
    _assert_same(_run(dst, inputs), _torch(pruned, inputs))
    # Hidden size (RMSNorm, embeddings, residual stream) only on request, as in the PyTorch path.
    assert any("hidden size" in f.reason for f in onnx_report.frozen)
    pruned, report, onnx_report, dst = _parity(tmp_path, model, inputs, src, hidden=0.25)
    assert _sizes(onnx_report.changes) == _sizes(report.changes) == [(64, 48)]
    _assert_same(_run(dst, inputs), _torch(pruned, inputs))


def test_attention_heads_come_from_the_reshape_product(bert_onnx):
    info = analyze_onnx(load_onnx(bert_onnx[2]))
    heads = [g for g in info.iter_groups() if g.kind == "heads"]
    assert [g.size for g in heads] == [4, 4]
    for g in heads:
        assert g.stride == 16  # head_dim rows per head in q / k / v / output weights
        names = {m.name for m in g.members}
        assert any(n.endswith("attention.self.query.weight") for n in names)
        assert any(n.endswith("attention.output.dense.weight") for n in names)
    assert any("attention head_dim" in f.reason for f in info.frozen)
    assert {g.kind for g in info.iter_groups()} == {"heads", "ffn"}  # hidden is frozen by the graph output
    assert info.unsupported == []


def test_resnet_with_dead_channels_matches_exactly(tmp_path):
    # The exporter folds BatchNorm into the convolutions, so l2 scores of live channels differ from the PyTorch
    # path (which scores conv weight, BN weight and bias separately) and kept indices may differ. With a dead
    # subset of exactly the pruned size, both paths must remove precisely the dead channels: same sizes and
    # the pruned ONNX equals both the pruned module and the unpruned model.
    model, inputs = build("resnet")
    helpers.make_dead(model, inputs, 0.5)
    reference = _torch(model, inputs)
    pruned, report, onnx_report, dst = _parity(tmp_path, model, inputs, ratio=0.5)
    assert _sizes(onnx_report.changes) == _sizes(report.changes)
    assert len(onnx_report.changes) == 7
    got = _run(dst, inputs)
    _assert_same(got, _torch(pruned, inputs), atol=1e-5)
    _assert_same(got, reference, atol=1e-5)


@pytest.mark.parametrize("name", ["HardCodedView", "CatSplit"])
def test_size_literals_in_the_graph_are_rewritten(name, tmp_path):
    # A literal channel count (reshape to 16, split into [5, 7]) makes the PyTorch path freeze those groups: the
    # model's Python code cannot change. In the ONNX file the literal is part of the graph and is rewritten, so
    # more groups are pruned; dead channels make the result exactly checkable.
    model = getattr(models, name)().eval()
    inputs = (torch.randn(2, 3, 4, 4),)
    helpers.make_dead(model, inputs, 0.5)
    src = tmp_path / "m.onnx"
    export_onnx(model, inputs, src)
    torch_report = sc.prune(copy.deepcopy(model), inputs, ratio=0.5, importance="l2", round_to=1)
    report = prune_onnx(src, tmp_path / "p.onnx", ratio=0.5, importance="l2", round_to=1)
    assert len(report.changes) > len(torch_report.changes)
    _assert_same(_run(tmp_path / "p.onnx", inputs), _run(src, inputs), atol=1e-5)


def test_slice_bounds_follow_the_kept_channels(tmp_path):
    """Conv(8) sliced into [2:6] and [-2:] (negative bound) for two consumers; dead channels make it exact."""
    rng = np.random.default_rng(0)
    w1, b1 = rng.standard_normal((8, 3, 1, 1)), rng.standard_normal(8)
    w2, w3 = rng.standard_normal((4, 4, 1, 1)), rng.standard_normal((4, 2, 1, 1))
    # Segments (0-1 | 2-5 | 6-7) are three groups; at ratio 0.5 they keep 1, 2 and 1: kill exactly that many.
    for ch in (0, 3, 5, 7):
        w1[ch], b1[ch] = 0.0, 0.0
    w2[:, [1, 3]] = 0.0  # columns of channels 3 and 5 (positions 1 and 3 of the [2:6] slice)
    w3[:, 1] = 0.0  # channel 7 (position 1 of the [-2:] slice)
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in
             [("w1", w1), ("b1", b1), ("w2", w2), ("w3", w3)]]
    inits += [numpy_helper.from_array(np.array(v, dtype=np.int64), n) for n, v in
              [("s_a", [2]), ("e_a", [6]), ("s_b", [-2]), ("e_b", [2**62]), ("axis", [1])]]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"]),
        helper.make_node("Slice", ["c1", "s_a", "e_a", "axis"], ["a"]),
        helper.make_node("Slice", ["c1", "s_b", "e_b", "axis"], ["b"]),
        helper.make_node("Conv", ["a", "w2"], ["ya"]),
        helper.make_node("Conv", ["b", "w3"], ["yb"]),
        helper.make_node("Add", ["ya", "yb"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, 4, 4])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(tmp_path / "s.onnx"))
    report = prune_onnx(tmp_path / "s.onnx", tmp_path / "p.onnx", ratio=0.5, round_to=1)
    assert _sizes(report.changes) == [(2, 1), (2, 1), (4, 2)]
    x = (torch.randn(3, 3, 4, 4),)
    _assert_same(_run(tmp_path / "p.onnx", x), _run(tmp_path / "s.onnx", x), atol=1e-5)
    bounds = {t.name: numpy_helper.to_array(t).tolist() for t in onnx.load(str(tmp_path / "p.onnx")).graph.initializer}
    slices = [n for n in onnx.load(str(tmp_path / "p.onnx")).graph.node if n.op_type == "Slice"]
    assert [bounds[n.input[1]] + bounds[n.input[2]] for n in slices] == [[1, 3], [-1, 2**62]]


def test_ignored_modules_stay_whole(tmp_path):
    model = models.Grouped().eval()
    export_onnx(model, SMALL["Grouped"], tmp_path / "g.onnx")
    # Every group of this model reaches gconv, so nothing is left to prune: refused as in memory, nothing written.
    with pytest.raises(BudgetError, match="selects no prunable group.*ignored by the user"):
        prune_onnx(tmp_path / "g.onnx", tmp_path / "p.onnx", ratio=0.5, round_to=1, ignore=["gconv"])
    assert not (tmp_path / "p.onnx").exists()


def test_ratio_zero_is_bit_identical(tmp_path, bert_onnx):
    _, inputs, src = bert_onnx
    dst = tmp_path / "same.onnx"
    report = prune_onnx(src, dst, ratio=0.0)
    assert report.changes == [] and report.params_after == report.params_before
    for got, want in zip(_run(dst, inputs), _run(src, inputs), strict=True):
        assert np.array_equal(got, want)
    # Untied copies of merged initializers are merged again: the file does not grow.
    assert len(onnx.load(str(dst)).graph.initializer) <= len(onnx.load(str(src)).graph.initializer)


def test_old_opset_is_converted(tmp_path):
    model = models.Grouped().eval()
    inputs = SMALL["Grouped"]
    export_onnx(model, inputs, tmp_path / "old.onnx", exporter="legacy", opset=11)
    pruned = copy.deepcopy(model)
    report = sc.prune(pruned, inputs, ratio=0.5, importance="l2", round_to=1)
    onnx_report = prune_onnx(tmp_path / "old.onnx", tmp_path / "new.onnx", ratio=0.5, round_to=1, importance="l2")
    assert _sizes(onnx_report.changes) == _sizes(report.changes)
    _assert_same(_run(tmp_path / "new.onnx", inputs), _torch(pruned, inputs))
    assert any(op.domain in ("", "ai.onnx") and op.version >= 13 for op in onnx.load(str(tmp_path / "new.onnx")).opset_import)


# ---------------------------------------------------------------------------------------- refusals / safety
def test_missing_and_malformed_files_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="nope.onnx"):
        prune_onnx(tmp_path / "nope.onnx", tmp_path / "out.onnx")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(bytes(range(256)) * 7)
    with pytest.raises(CheckpointError, match="garbage.onnx"):
        prune_onnx(garbage, tmp_path / "out.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["garbage.onnx"]


def _scan8_model(path):
    body = helper.make_graph(
        [helper.make_node("Add", ["s", "xi"], ["s2"]), helper.make_node("Identity", ["s2"], ["yi"])], "body",
        [helper.make_tensor_value_info("s", TensorProto.FLOAT, [1]),
         helper.make_tensor_value_info("xi", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("s2", TensorProto.FLOAT, [1]),
         helper.make_tensor_value_info("yi", TensorProto.FLOAT, [1])])
    scan = helper.make_node("Scan", ["lens", "init", "x"], ["final", "ys"], body=body, num_scan_inputs=1)
    graph = helper.make_graph(
        [scan], "g",
        [helper.make_tensor_value_info("lens", TensorProto.INT32, [2]),
         helper.make_tensor_value_info("init", TensorProto.FLOAT, [2, 1]),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, 1])],
        [helper.make_tensor_value_info("final", TensorProto.FLOAT, [2, 1]),
         helper.make_tensor_value_info("ys", TensorProto.FLOAT, [2, 5, 1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 8)])
    model.ir_version = 3
    onnx.save(model, str(path))


def test_unconvertible_opset_is_refused(tmp_path):
    _scan8_model(tmp_path / "scan8.onnx")
    with pytest.raises(CaptureError, match=r"scan8.onnx.*opset 8"):
        prune_onnx(tmp_path / "scan8.onnx", tmp_path / "out.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan8.onnx"]


def _custom_op_model(path):
    """x -> Conv(8) -> acme::Mystery -> Conv(8) -> Relu -> Conv(4): the op in the middle has no rule."""
    rng = np.random.default_rng(0)

    def init(name, *shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1"),
        helper.make_node("Mystery", ["c1"], ["m"], domain="acme", name="mystery"),
        helper.make_node("Conv", ["m", "w2", "b2"], ["c2"], name="conv2"),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu"),
        helper.make_node("Conv", ["r2", "w3", "b3"], ["y"], name="conv3"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 4, 4])],
        [init("w1", 8, 3, 1, 1), init("b1", 8), init("w2", 8, 8, 1, 1), init("b2", 8), init("w3", 4, 8, 1, 1),
         init("b3", 4)],
        value_info=[helper.make_tensor_value_info("m", TensorProto.FLOAT, ["batch", 8, 4, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("acme", 1)])
    onnx.save(model, str(path))


def test_an_onnx_rule_table_given_to_the_analysis_adds_a_rule_without_touching_the_built_in_one(tmp_path):
    from secateurs.ir.depgraph import DependencyInfo
    from secateurs.passes.onnx_dependencies import AnalyzeOnnxDependencies

    src = tmp_path / "custom.onnx"
    _custom_op_model(src)
    graph = load_onnx(src)
    AnalyzeOnnxDependencies()(graph)
    assert sorted(g.size for g in graph.analysis(DependencyInfo).iter_groups()) == [8]  # conv2 -> conv3 only
    table = ONNX_RULES.copy()
    table.register(["Mystery"], lambda ctx, node: ctx.same_dims(node.inputs[0], node.outputs[0]), domain="acme")
    AnalyzeOnnxDependencies(table)(graph)
    info = graph.analysis(DependencyInfo)
    assert sorted(g.size for g in info.iter_groups()) == [8, 8] and not info.unsupported
    assert ("acme", "Mystery") not in ONNX_RULES and ("acme", "Mystery") in table


def test_unknown_op_freezes_what_it_touches_and_is_reported(tmp_path):
    src = tmp_path / "custom.onnx"
    _custom_op_model(src)
    # ONNX Runtime cannot run the custom op, so the rewrite could not be verified: refused as bad input up front.
    with pytest.raises(CheckpointError, match="custom op acme::Mystery"):
        prune_onnx(src, tmp_path / "out.onnx", ratio=0.5, round_to=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["custom.onnx"]
    report = prune_onnx(src, tmp_path / "out.onnx", ratio=0.5, round_to=1, verify=False)
    assert report.unsupported_ops == ["mystery (acme::Mystery)"]
    touched = [f for f in report.frozen if "unsupported op acme::Mystery" in f.reason]
    assert {m for f in touched for m in f.members} == {"b1[0]", "w1[0]", "w2[1]"}
    assert _sizes(report.changes) == [(8, 4)]  # conv2 -> conv3 channels are free
    out = onnx.load(str(tmp_path / "out.onnx"))
    shapes = {t.name: list(t.dims) for t in out.graph.initializer}
    assert shapes["w1"] == [8, 3, 1, 1] and shapes["w2"] == [4, 8, 1, 1] and shapes["w3"] == [4, 4, 1, 1]
    assert [n.op_type for n in out.graph.node].count("Mystery") == 1


def test_size_arithmetic_freezes_the_sizes_it_reads(tmp_path):
    """A Reshape whose target is computed from a channel count (``C // 2``) must not let that count change."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((8, 3, 1, 1)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((4, 8, 1, 1)).astype(np.float32), "w2")
    consts = [numpy_helper.from_array(np.array(v, dtype=np.int64), n) for n, v in
              [("one", [1]), ("two", [2]), ("minus", [-1]), ("half", 2), ("back", [1, 8, 4, 4])]]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"]),
        helper.make_node("Shape", ["c1"], ["shp"], start=1, end=2),
        helper.make_node("Div", ["shp", "half"], ["h"]),
        helper.make_node("Concat", ["one", "two", "h", "minus"], ["target"], axis=0),
        helper.make_node("Reshape", ["c1", "target"], ["r"]),
        helper.make_node("Relu", ["r"], ["rr"]),
        helper.make_node("Reshape", ["rr", "back"], ["b"]),
        helper.make_node("Conv", ["b", "w2"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4, 4])], [w1, w2, *consts])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(tmp_path / "m.onnx"))
    info = analyze_onnx(load_onnx(tmp_path / "m.onnx"))
    assert not info.groups
    assert any("size read by arithmetic" in f.reason and "w1[0]" in f.members for f in info.frozen)


def test_bad_options_and_inputs_are_refused(tmp_path):
    model = models.ConvBN().eval()
    export_onnx(model, (torch.randn(1, 3, 4, 4),), tmp_path / "m.onnx")
    with pytest.raises(BudgetError, match="taylor"):
        prune_onnx(tmp_path / "m.onnx", tmp_path / "o.onnx", importance="taylor")
    with pytest.raises(BudgetError, match="ratio"):
        prune_onnx(tmp_path / "m.onnx", tmp_path / "o.onnx", ratio=1.5)
    with pytest.raises(CaptureError, match="'nope'"):
        prune_onnx(tmp_path / "m.onnx", tmp_path / "o.onnx", input_shapes={"nope": [1]})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_a_failed_check_leaves_the_destination_untouched(tmp_path, monkeypatch):
    model = models.ConvBN().eval()
    export_onnx(model, (torch.randn(1, 3, 4, 4),), tmp_path / "m.onnx")
    before = (tmp_path / "m.onnx").read_bytes()

    def broken(*_args, **_kwargs):
        raise VerificationError("simulated failure")

    monkeypatch.setattr("secateurs.backends.onnx_file.run_onnx", broken)
    (tmp_path / "o.onnx").write_bytes(b"old output")
    with pytest.raises(VerificationError, match="simulated"):
        prune_onnx(tmp_path / "m.onnx", tmp_path / "o.onnx", ratio=0.5, round_to=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "o.onnx"]
    assert (tmp_path / "m.onnx").read_bytes() == before
    assert (tmp_path / "o.onnx").read_bytes() == b"old output"
    with pytest.raises(CheckpointError, match="is the source itself"):  # in place would risk the source
        prune_onnx(tmp_path / "m.onnx", tmp_path / "m.onnx", ratio=0.5)


def _from_text(text, path, **arrays):
    """An ONNX model from the text format; ``arrays`` become initializers (declared as inputs in the text)."""
    model = onnx.parser.parse_model(text)
    for name, array in arrays.items():
        model.graph.initializer.append(numpy_helper.from_array(array.astype(np.float32), name))
    keep = [i for i in model.graph.input if i.name not in arrays]
    del model.graph.input[:]
    model.graph.input.extend(keep)
    onnx.save(model, str(path))
    return path


def test_golden_mlp_block_with_norms(tmp_path):
    rng = np.random.default_rng(0)
    path = _from_text(
        """
        <ir_version: 8, opset_import: ["" : 18, "com.microsoft" : 1]>
        block (float[N, 16] x, float[32, 16] w1, float[32] b1, float[32, 16] w2, float[16] b2, float[16] s,
               float[16] t) => (float[N, 16] y) {
            h = Gemm <transB = 1> (x, w1, b1)
            e = Erf (h)
            a = Mul (h, e)
            o = MatMul (a, w2)
            ob = Add (o, b2)
            r = Add (ob, x)
            n = com.microsoft.SimplifiedLayerNormalization <axis = -1> (r, s)
            y = LayerNormalization <axis = -1> (n, s, t)
        }
        """,
        tmp_path / "block.onnx",
        w1=rng.standard_normal((32, 16)), b1=rng.standard_normal(32), w2=rng.standard_normal((32, 16)),
        b2=rng.standard_normal(16), s=rng.standard_normal(16), t=rng.standard_normal(16),
    )
    info = analyze_onnx(load_onnx(path))
    groups = {(g.kind, g.size): sorted(f"{m.name}[{m.dim}]" for m in g.members) for g in info.iter_groups()}
    assert groups == {("ffn", 32): ["b1[0]", "w1[0]", "w2[0]"]}
    assert info.unsupported == []
    # The residual stream (16) is the graph input and output: frozen, with every tensor along it named.
    assert [(f.size, f.reason) for f in info.frozen] == [(16, "graph input at graph")]
    assert {"w1[1]", "w2[1]", "b2[0]", "s[0]", "t[0]"} <= set(info.frozen[0].members)


def test_rule_table_refuses_bad_registrations():
    table = OnnxOpRuleTable()
    table.register(["Relu"], lambda ctx, node: None)
    with pytest.raises(UnsupportedOpError, match="already has a rule"):
        table.register(["Relu"], lambda ctx, node: None)
    with pytest.raises(UnsupportedOpError, match="not an ONNX op type"):
        table.register(["Not an op"], lambda ctx, node: None)
    assert ("", "Relu") in table and ("com.acme", "Relu") not in table
    for op in ("Conv", "Gemm", "MatMul", "Reshape", "Transpose", "Softmax", "LayerNormalization", "Split", "Slice",
               "Concat", "Gather", "BatchNormalization", "ReduceMean", "GlobalAveragePool", "Expand", "Gelu"):
        assert ONNX_RULES.get("", op) is not None, op


def test_the_pruned_file_is_compared_with_the_masked_dense_file(tmp_path, monkeypatch):
    """The check runs and can fail: compared with the unmasked dense file, a real pruning differs."""
    model = models.ConvBN().eval()
    export_onnx(model, (torch.randn(1, 3, 4, 4),), tmp_path / "m.onnx")
    prune_onnx(tmp_path / "m.onnx", tmp_path / "ok.onnx", ratio=0.5, round_to=1)  # masked dense == pruned
    monkeypatch.setattr("secateurs.onnx_prune.masked_model", lambda dense, masks: dense)
    with pytest.raises(VerificationError, match="removed channels zeroed"):
        prune_onnx(tmp_path / "m.onnx", tmp_path / "o.onnx", ratio=0.5, round_to=1)
    assert not (tmp_path / "o.onnx").exists()


# ------------------------------------------------------------------------------- masked check, hidden size
class _NormNet(torch.nn.Module):
    """A residual stream of width 32 through two normalisations of one kind, then a classifier."""

    def __init__(self, norm):
        super().__init__()
        self.inp = torch.nn.Linear(16, 32)
        self.n1, self.n2 = norm(32), norm(32)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.GELU(), torch.nn.Linear(48, 32))
        self.head = torch.nn.Linear(32, 10)

    def forward(self, x):
        h = self.inp(x)
        h = h + self.mlp(self.n1(h))
        return self.head(self.n2(h))


def _norm_onnx(tmp_path, norm):
    torch.manual_seed(0)
    model = _NormNet(norm).eval()
    _jitter(model)
    inputs = (torch.randn(3, 5, 16),)
    src = tmp_path / "norm.onnx"
    export_onnx(model, inputs, src)
    return model, inputs, src


def _spy_cuts(monkeypatch):
    import secateurs.onnx_prune as op

    seen = []
    real = op.cut_expect

    def spy(*args, **kwargs):
        expect, why = real(*args, **kwargs)
        seen.append((len(args[2]), expect is not None, why))
        return expect, why

    monkeypatch.setattr(op, "cut_expect", spy)
    return seen


@pytest.mark.parametrize("norm", [torch.nn.LayerNorm, torch.nn.RMSNorm])
def test_a_pruned_hidden_size_is_checked_through_its_normalisations(tmp_path, monkeypatch, norm):
    """The masked check runs with the norms' statistics taken from the pruned run: it passes on a right rewrite
    (which equals the PyTorch path's)."""
    model, inputs, src = _norm_onnx(tmp_path, norm)
    seen = _spy_cuts(monkeypatch)
    pruned, report, onnx_report, dst = _parity(tmp_path, model, inputs, src, hidden=0.25)
    assert _sizes(onnx_report.changes) == _sizes(report.changes) and (32, 24) in _sizes(onnx_report.changes)
    _assert_same(_run(dst, inputs), _torch(pruned, inputs))
    assert seen and seen[0][0] >= 2 and seen[0][1] and seen[0][2] is None, seen


@pytest.mark.parametrize("norm", [torch.nn.LayerNorm, torch.nn.RMSNorm])
@pytest.mark.parametrize("where", ["inp.weight", "n2.weight"])
def test_a_wrong_rewrite_around_a_pruned_norm_is_caught(tmp_path, monkeypatch, norm, where):
    """A rewrite bug planted after pruning (a kept weight before a norm, or a norm's own scale, changed): every
    shape is right; the masked check sees it at the value entering the norm, or at the outputs, and nothing is
    written (the check used to be skipped whenever the hidden size was pruned)."""
    import secateurs.passes.onnx_channels as oc

    _, _, src = _norm_onnx(tmp_path, norm)
    real = oc._Rewriter.apply

    def planted(self):
        real(self)
        for name, value in self.graph.graph.initializers.items():
            if self.graph.display_name(name) == where:
                array = value.const_value.numpy().copy()
                array.reshape(-1)[0] += 3.0
                value.const_value = onnx_ir.tensor(array, name=name)
                return
        raise AssertionError(f"no initializer {where}")

    monkeypatch.setattr(oc._Rewriter, "apply", planted)
    with pytest.raises(VerificationError, match="entering the normalisation" if where == "inp.weight" else "output"):
        prune_onnx(src, tmp_path / "p.onnx", hidden=0.25, round_to=1, importance="l2")
    assert not (tmp_path / "p.onnx").exists()


def _hand_norm(tmp_path, op, opset):
    """x @ W1 -> ``op`` over the 32 hidden channels (scale g) -> @ W2, built by hand (no exporter writes these)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((16, 32)).astype(np.float32), "W1"),
             numpy_helper.from_array((1 + 0.1 * rng.standard_normal(32)).astype(np.float32), "g"),
             numpy_helper.from_array(rng.standard_normal((32, 10)).astype(np.float32), "W2")]
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
             helper.make_node(op, ["h", "g"], ["n"], name="norm", axis=-1, epsilon=1e-5),
             helper.make_node("MatMul", ["n", "W2"], ["y"], name="mm2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 10])], inits)
    path = tmp_path / f"{op}.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), path)
    return path


def test_rms_normalization_is_cut_with_a_unit_scale_side_node(tmp_path, monkeypatch):
    """Opset 23's RMSNormalization over a pruned hidden size: the check runs (and sees a wrong scale)."""
    import secateurs.passes.onnx_channels as oc

    src = _hand_norm(tmp_path, "RMSNormalization", 23)
    seen = _spy_cuts(monkeypatch)
    report = prune_onnx(src, tmp_path / "p.onnx", hidden=0.25, round_to=1)
    assert _sizes(report.changes) == [(32, 24)] and seen == [(1, True, None)]
    real = oc._Rewriter.apply

    def planted(self):  # the norm's kept scale changed after the rewrite: the outputs differ
        real(self)
        value = self.graph.graph.initializers["g"]
        value.const_value = onnx_ir.tensor(value.const_value.numpy() * 1.5, name="g")

    monkeypatch.setattr(oc._Rewriter, "apply", planted)
    with pytest.raises(VerificationError, match="output"):
        prune_onnx(src, tmp_path / "q.onnx", hidden=0.25, round_to=1)
    assert not (tmp_path / "q.onnx").exists()


# ------------------------------------------------------------------------------ fused attention (opset 23)
_D, _H, _KV, _HD, _S = 24, 6, 2, 4, 7


def _fused_attention_file(path):
    """q / k / v projections -> Reshape -> Transpose -> ONNX ``Attention`` (GQA: 6 query, 2 kv heads) -> out."""
    rng = np.random.default_rng(0)
    weights = {n: (rng.standard_normal((_D, h * _HD)) * 0.3).astype(np.float32)
               for n, h in (("q", _H), ("k", _KV), ("v", _KV))}
    weights["o"] = (rng.standard_normal((_H * _HD, _D)) * 0.3).astype(np.float32)
    nodes = []
    for n, h in (("q", _H), ("k", _KV), ("v", _KV)):
        nodes += [helper.make_node("MatMul", ["x", f"w{n}"], [f"{n}p"]),
                  helper.make_node("Reshape", [f"{n}p", f"shape_{n}"], [f"{n}r"]),
                  helper.make_node("Transpose", [f"{n}r"], [f"{n}t"], perm=[0, 2, 1, 3])]
    nodes += [helper.make_node("Attention", ["qt", "kt", "vt"], ["a"]),
              helper.make_node("Transpose", ["a"], ["at"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["at", "shape_o"], ["ar"]),
              helper.make_node("MatMul", ["ar", "wo"], ["y"])]
    inits = [numpy_helper.from_array(w, f"w{n}") for n, w in weights.items()]
    inits += [numpy_helper.from_array(np.array(s, np.int64), f"shape_{n}")
              for n, s in (("q", [0, 0, _H, _HD]), ("k", [0, 0, _KV, _HD]), ("v", [0, 0, _KV, _HD]),
                           ("o", [0, 0, _H * _HD]))]
    graph = helper.make_graph(nodes, "fused", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", _S, _D])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", _S, _D])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)]), str(path))
    return weights


class _SdpaTwin(torch.nn.Module):
    """The same attention in PyTorch: scaled_dot_product_attention with GQA."""

    def __init__(self, weights):
        super().__init__()
        for n, w in weights.items():
            layer = torch.nn.Linear(*w.shape, bias=False)
            layer.weight.data = torch.from_numpy(w.T.copy())
            setattr(self, n, layer)

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = (getattr(self, n)(x).view(b, s, -1, _HD).transpose(1, 2) for n in "qkv")
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return self.o(a.transpose(1, 2).reshape(b, s, -1))


@pytest.mark.parametrize("options", [{"heads": 0.5}, {"kv_groups": 0.5}])
def test_a_fused_onnx_attention_node_is_pruned_like_sdpa(options, tmp_path):
    """ONNX ``Attention`` and ATen's sdpa decode onto one attention family: the same groups and widths, and the
    pruned file computes what the pruned PyTorch twin computes."""
    weights = _fused_attention_file(tmp_path / "fused.onnx")
    twin = _SdpaTwin(weights).eval()
    x = torch.randn(2, _S, _D)
    _assert_same(_run(tmp_path / "fused.onnx", (x,)), _torch(twin, (x,)))
    info = analyze_onnx(load_onnx(tmp_path / "fused.onnx"))
    kinds = sorted((g.kind, g.size) for g in info.iter_groups())
    assert kinds == [("heads", 3), ("kv_groups", 2)], kinds
    assert any("attention head_dim" in f.reason for f in info.frozen) and not info.unsupported
    report = sc.prune(twin, (x,), importance="l2", round_to=1, **options)
    onnx_report = prune_onnx(tmp_path / "fused.onnx", tmp_path / "pruned.onnx", importance="l2", round_to=1,
                             **options)
    assert onnx_report.changes and _sizes(onnx_report.changes) == _sizes(report.changes)
    _assert_same(_run(tmp_path / "pruned.onnx", (x,)), _torch(twin, (x,)))
    assert onnx_report.flops_after < onnx_report.flops_before


def test_an_onnx_attention_node_in_its_3d_form_is_frozen_and_reported(tmp_path):
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal((_D, _D)) * 0.3).astype(np.float32), n)
             for n in ("wq", "wk", "wv", "wo")]
    nodes = [helper.make_node("MatMul", ["x", f"w{n}"], [n]) for n in "qkv"]
    nodes += [helper.make_node("Attention", ["q", "k", "v"], ["a"], q_num_heads=6, kv_num_heads=6),
              helper.make_node("MatMul", ["a", "wo"], ["y"])]
    graph = helper.make_graph(nodes, "packed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, _S, _D])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, _S, _D])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)]), str(tmp_path / "p.onnx"))
    info = analyze_onnx(load_onnx(tmp_path / "p.onnx"))
    assert info.groups == {} and any("3-D form" in f.reason for f in info.frozen), info.frozen
    assert any("3-D form" in u for u in info.unsupported)  # reported, and the analysis went on
    with pytest.raises(BudgetError, match="selects no prunable group"):
        prune_onnx(tmp_path / "p.onnx", tmp_path / "out.onnx", ratio=0.5)


# ------------------------------------------------------------------------------ multi-tensor indexing
class _PickRows(torch.nn.Module):
    """``h[rows, picks]``: two index tensors at once (aten.index.Tensor), channels trail the indexed block."""

    def __init__(self, w1, w2, picks):
        super().__init__()
        self.a, self.b = torch.nn.Linear(6, 32, bias=False), torch.nn.Linear(32, 4, bias=False)
        self.a.weight.data, self.b.weight.data = torch.from_numpy(w1.T.copy()), torch.from_numpy(w2.T.copy())
        self.register_buffer("picks", torch.from_numpy(picks))

    def forward(self, x):
        h = self.a(x)
        rows = torch.arange(h.shape[0]).unsqueeze(1)
        return self.b(torch.relu(h[rows, self.picks]))


def test_gather_nd_and_multi_tensor_indexing_decode_onto_one_family(tmp_path):
    """ONNX GatherND and ATen's ``x[i, j]`` freeze the indexed dims and let the trailing channels through: the
    same FFN group, the same widths, and the pruned file computes what the pruned module computes."""
    rng = np.random.default_rng(0)
    w1, w2 = rng.standard_normal((6, 32)).astype(np.float32), rng.standard_normal((32, 4)).astype(np.float32)
    picks = np.array([[0, 4, 2], [1, 1, 3]], np.int64)  # per batch row, three of the five positions
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]),
             helper.make_node("Unsqueeze", ["picks", "axis_last"], ["idx"]),
             helper.make_node("GatherND", ["h", "idx"], ["g"], batch_dims=1),
             helper.make_node("Relu", ["g"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["y"])]
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
             numpy_helper.from_array(picks, "picks"), numpy_helper.from_array(np.array([-1], np.int64), "axis_last")]
    graph = helper.make_graph(nodes, "nd", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 4])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(tmp_path / "nd.onnx"))
    twin = _PickRows(w1, w2, picks).eval()
    x = torch.randn(2, 5, 6)
    _assert_same(_run(tmp_path / "nd.onnx", (x,)), _torch(twin, (x,)))
    info = analyze_onnx(load_onnx(tmp_path / "nd.onnx"))
    assert [(g.kind, g.size) for g in info.iter_groups()] == [("ffn", 32)] and not info.unsupported
    report = sc.prune(twin, (x,), importance="l2", round_to=1, ffn=0.5)
    onnx_report = prune_onnx(tmp_path / "nd.onnx", tmp_path / "pruned.onnx", importance="l2", round_to=1, ffn=0.5)
    assert _sizes(onnx_report.changes) == _sizes(report.changes) == [(32, 16)]
    _assert_same(_run(tmp_path / "pruned.onnx", (x,)), _torch(twin, (x,)))


def test_tensor_parallel_sizes_on_an_onnx_file(tmp_path, bert_onnx):
    """As in memory: heads and FFN neurons planned shardable over the ranks, and the report says tp bound them."""
    _, _, src = bert_onnx
    plain = prune_onnx(src, None, heads=0.3, ffn=0.3, round_to=1)
    report = prune_onnx(src, None, heads=0.3, ffn=0.3, round_to=1, tensor_parallel=2)
    assert all(c.after % 2 for c in plain.changes), plain.changes  # 4 -> 3 heads, 96 -> 67 neurons
    assert report.changes and all(c.after % 2 == 0 for c in report.changes), report.changes
    assert {c.bound for c in report.changes} == {"tp=2"}
