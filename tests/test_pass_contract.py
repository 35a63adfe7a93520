"""The pass manager's contract: every transform runs in one transaction (rolled back bit-exactly when the pass
or its checks fail, Ctrl-C included), and each pass's ``ensures`` is checked after it."""

import pytest
import torch
from torch import nn

import secateurs as sc
from secateurs.errors import PassContractError
from secateurs.modeling.rewrite import Snapshot
from secateurs.passes import AnalyzeDependencies, PassManager, PruneChannels, ScoreChannels
from secateurs.passes.base import Pass, PassResult, module_fingerprint, transaction
from secateurs.passes.channels import PruneRecord, cost_as_predicted
from secateurs.passes.sparsity import SparsifyWeights, SparsityRecord, nm_pattern_holds

from models import MLP


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model, state):
    return set(model.state_dict()) == set(state) and all(torch.equal(v, state[k])
                                                          for k, v in model.state_dict().items())


class _Fail(Pass):
    """Replaces a weight through the transaction, then fails (or is interrupted)."""

    transforms = True
    transactional = True

    def __init__(self, error: BaseException, record: bool = True):
        self.error, self.record = error, record

    def run(self, graph):
        snap = transaction()
        owner = graph.module.a
        if self.record:
            snap.record(owner, "param", "weight", owner._parameters["weight"])
        owner._parameters["weight"] = nn.Parameter(torch.zeros(3, 16))
        raise self.error


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_a_failing_transform_is_rolled_back_bit_exactly(error):
    model = MLP()
    graph = sc.capture(model, (torch.randn(2, 16),))
    state, fingerprint = _state(model), module_fingerprint(model)
    with pytest.raises(type(error)):
        PassManager([_Fail(error)])(graph)
    assert _same(model, state) and module_fingerprint(model) == fingerprint


def test_a_change_left_out_of_the_transaction_is_named():
    model = MLP()
    graph = sc.capture(model, (torch.randn(2, 16),))
    with pytest.raises(PassContractError, match=r"_Fail failed \(RuntimeError: boom\) and rolling it back did not "
                                                r"restore the model"):
        PassManager([_Fail(RuntimeError("boom"), record=False)])(graph)


def test_a_pass_called_alone_gets_its_own_snapshot():
    first, second = transaction(), transaction()
    assert isinstance(first, Snapshot) and first is not second


def test_ensures_is_checked_and_a_failure_rolls_back():
    class Shrink(PruneChannels):
        """PruneChannels whose record claims a cost the model does not have."""

        def run(self, graph):
            result = super().run(graph)
            record = result.record
            record.predicted_params += 1
            return result

    model = MLP()
    graph = sc.capture(model, (torch.randn(2, 16),))
    state = _state(model)
    with pytest.raises(PassContractError, match=r"Shrink did not ensure what it promises: cost_as_predicted: the "
                                                r"plan predicted [\d,]+ parameters, the rewritten model has"):
        PassManager([AnalyzeDependencies(), ScoreChannels("l2"), Shrink(ratio=0.5, round_to=1)])(graph)
    assert _same(model, state) and model.a.out_features == 64  # rolled back, attributes too
    result = PassManager([AnalyzeDependencies(), ScoreChannels("l2"), PruneChannels(ratio=0.5, round_to=1)])(graph)
    assert model.a.out_features == 32 and cost_as_predicted(graph, result.results[-1][1]) == []
    assert isinstance(result.results[-1][1].record, PruneRecord)


def test_the_nm_pattern_is_ensured_on_every_listed_layer():
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    graph = sc.capture(model, (torch.randn(2, 16),))
    result = PassManager([AnalyzeDependencies(), SparsifyWeights(nm=(2, 4))])(graph)
    done = result.results[-1][1]
    assert isinstance(done.record, SparsityRecord) and done.record.layers
    assert nm_pattern_holds(graph, done) == []
    with torch.no_grad():
        model[0].weight_orig.fill_(1.0) if hasattr(model[0], "weight_orig") else model[0].weight.fill_(1.0)
        if hasattr(model[0], "weight_mask"):
            model[0].weight_mask.fill_(1.0)
        model(torch.randn(1, 16))  # masks are re-applied on the forward
    broken = nm_pattern_holds(graph, PassResult(graph, True, done.record))
    assert broken and "layer '0'" in broken[0] and "fewer than 2 zeros" in broken[0]


# ------------------------------------------------------------------ weight-editing transforms roll back too
def _failing(cls):
    """``cls`` with a check that always fails after it ran: the manager must roll its whole work back."""

    def always_fails(before, result):
        return ["forced failure"]

    return type(f"Failing{cls.__name__}", (cls,), {"ensures": (*cls.ensures, always_fails)})


def _convnet():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)).eval()


def _weight_passes():
    from secateurs.passes.armor import FactorizeARMOR
    from secateurs.passes.distill import Recover
    from secateurs.passes.lowrank import FactorizeLowRank
    from secateurs.passes.recover import ReconstructLayers
    from secateurs.passes.training.options import RecoverOptions

    x = torch.randn(4, 3, 4, 4)
    return {
        "magnitude-masks": lambda m: SparsifyWeights(0.5),
        "magnitude-zeros": lambda m: SparsifyWeights(0.5, keep_masks=False),
        "global": lambda m: SparsifyWeights(0.5, criterion="global_magnitude", keep_masks=False),
        "sparsegpt-2:4": lambda m: SparsifyWeights(nm=(2, 4), criterion="sparsegpt", keep_masks=False, block=4),
        "wanda": lambda m: SparsifyWeights(0.5, criterion="wanda", calib=[(torch.randn(4, 3, 4, 4),)]),
        "lowrank": lambda m: FactorizeLowRank(rank=2),
        "armor": lambda m: FactorizeARMOR(steps=2, block=4),
        "reconstruct": lambda m: ReconstructLayers(_convnet(), calib=[(x,)]),
        "recover-full": lambda m: Recover(_convnet(), [(x,)], options=RecoverOptions(steps=2, lr=1e-2)),
        "recover-lora": lambda m: Recover(_convnet(), [(x,)], options=RecoverOptions(
            steps=2, lr=1e-2, mode="lora", lora_backend="native", lora_rank=2)),
    }


@pytest.mark.parametrize("name", list(_weight_passes()))
@pytest.mark.parametrize("spill", [False, True])
def test_a_weight_editing_transform_whose_check_fails_is_rolled_back_bit_exactly(name, spill, monkeypatch, tmp_path):
    """Sparsity (masks attached or weights zeroed), low-rank, ARMOR, reconstruction and recovery training edit
    tensors in place or replace layers: a failing check afterwards leaves the model exactly as it was, also when
    the copies go to disk (``SECATEURS_ROLLBACK_MEMORY`` = 0), and nothing is left in the temporary folder."""
    import secateurs.modeling.rewrite as rewrite

    if spill:
        monkeypatch.setattr(rewrite, "ROLLBACK_MEMORY", 0)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    model = _convnet()
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        out = model(x)
    graph = sc.capture(model, (x,))
    state, fingerprint = _state(model), module_fingerprint(model)
    built = _weight_passes()[name](model)
    failing = _failing(type(built))
    failing_pass = failing.__new__(failing)
    failing_pass.__dict__.update(built.__dict__)
    with pytest.raises(PassContractError, match="did not ensure what it promises: always_fails: forced failure"):
        PassManager([AnalyzeDependencies(), failing_pass])(graph)
    assert _same(model, state) and module_fingerprint(model) == fingerprint
    with torch.no_grad():
        assert torch.equal(model(x), out)
    assert list(tmp_path.iterdir()) == []  # the spilled copies are gone


def test_the_same_transforms_keep_their_change_when_the_checks_pass():
    """The oracle above can fail: each pass really changes the model when nothing goes wrong."""
    for name, make in _weight_passes().items():
        model = _convnet()
        x = torch.randn(2, 3, 4, 4)
        state = _state(model)
        graph = sc.capture(model, (x,))
        PassManager([AnalyzeDependencies(), make(model)])(graph)
        assert not _same(model, state), name


class _EditsInPlace(Pass):
    transforms = True
    transactional = True

    def run(self, graph):
        with torch.no_grad():
            graph.module.a.weight.mul_(0.5)  # not copied into the transaction first
        raise RuntimeError("boom")


def test_an_in_place_edit_left_out_of_the_transaction_is_named():
    model = MLP()
    graph = sc.capture(model, (torch.randn(2, 16),))
    with pytest.raises(PassContractError, match=r"tensors edited in place without a copy: a\.weight"):
        PassManager([_EditsInPlace()])(graph)


def test_a_weight_editing_pass_called_alone_rolls_itself_back(monkeypatch):
    from secateurs.passes.lowrank import FactorizeLowRank

    model = MLP()
    graph = sc.capture(model, (torch.randn(2, 16),))
    AnalyzeDependencies()(graph)
    state, fingerprint = _state(model), module_fingerprint(model)

    def broken(*args, **kwargs):
        raise RuntimeError("capture failed")

    monkeypatch.setattr("secateurs.passes.lowrank.capture_call", broken)
    with pytest.raises(RuntimeError, match="capture failed"):
        FactorizeLowRank(rank=2, only_if_smaller=False)(graph)
    assert _same(model, state) and module_fingerprint(model) == fingerprint


def test_analyses_are_dropped_after_a_transform_that_changed_the_model():
    from secateurs.ir.depgraph import DependencyInfo

    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    graph = sc.capture(model, (torch.randn(2, 16),))
    result = PassManager([AnalyzeDependencies(), SparsifyWeights(0.5, keep_masks=False)])(graph)
    assert result.graph is graph and DependencyInfo not in graph.analyses
    # a pass that needs it after must be preceded by the analysis again
    with pytest.raises(PassContractError, match="SparsifyWeights requires DependencyInfo"):
        PassManager([SparsifyWeights(0.5, keep_masks=False)])(graph)


def test_a_graph_no_dialect_covers_is_refused():
    with pytest.raises(PassContractError, match="not dict"):
        PassManager([AnalyzeDependencies()])({})


# ------------------------------------------------------------------------------ the same manager on ONNX
def _onnx_mlp(path):
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def init(name, *shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"), helper.make_node("Add", ["h", "b1"], ["hb"]),
         helper.make_node("Relu", ["hb"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2")],
        "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [init("w1", 16, 32), init("b1", 32), init("w2", 32, 4)])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))


def test_the_pass_manager_runs_onnx_passes_and_rolls_a_failing_onnx_rewrite_back(tmp_path):
    pytest.importorskip("onnx_ir")
    import onnx_ir as ir

    from secateurs.frontends.onnx_model import load_onnx
    from secateurs.passes.onnx_base import onnx_invariants
    from secateurs.passes.onnx_channels import OnnxPruneRecord, PruneOnnxChannels
    from secateurs.passes.onnx_dependencies import AnalyzeOnnxDependencies
    from secateurs.passes.onnx_importance import ScoreOnnxChannels

    _onnx_mlp(tmp_path / "m.onnx")
    graph = load_onnx(tmp_path / "m.onnx")
    before = ir.to_proto(graph.model).SerializeToString()
    shapes = dict(graph.shapes)
    with pytest.raises(PassContractError, match="FailingPruneOnnxChannels did not ensure"):
        PassManager([AnalyzeOnnxDependencies(), ScoreOnnxChannels("l2"),
                     _failing(PruneOnnxChannels)(ratio=0.5, round_to=1)])(graph)
    assert ir.to_proto(graph.model).SerializeToString() == before and graph.shapes == shapes
    assert not graph.analyses and onnx_invariants(graph) == []
    result = PassManager([AnalyzeOnnxDependencies(), ScoreOnnxChannels("l2"),
                          PruneOnnxChannels(ratio=0.5, round_to=1)])(graph)
    record = result.record(OnnxPruneRecord)
    assert result.modified and graph.graph.initializers["w1"].const_value.shape == (16, 16)
    assert record.params_after < record.params_before and onnx_invariants(graph) == []


def test_onnx_invariants_name_what_is_broken(tmp_path):
    pytest.importorskip("onnx_ir")
    import numpy as np
    import onnx_ir as ir

    from secateurs.frontends.onnx_model import load_onnx
    from secateurs.passes.onnx_base import onnx_invariants

    _onnx_mlp(tmp_path / "m.onnx")
    graph = load_onnx(tmp_path / "m.onnx")
    graph.graph.initializers["w2"].const_value = ir.tensor(np.zeros((8, 4), np.float32))
    problems = onnx_invariants(graph)
    assert any("initializer 'w2': declared shape" in p for p in problems)


# ------------------------------------------------------------------------------ freeze-and-retry, once
class _Flaky(Pass):
    """Replaces a weight, then asks for a retry ``fails`` times before it keeps its change."""

    transforms = True
    transactional = True

    def __init__(self, fails, max_retries=3):
        self.fails, self.max_retries, self.seen = fails, max_retries, []

    def run(self, graph):
        owner = graph.module.a
        self.seen.append((self.attempt, owner.weight.shape[0], float(owner.weight.sum())))
        transaction().record(owner, "param", "weight", owner._parameters["weight"])
        owner._parameters["weight"] = nn.Parameter(torch.full_like(owner.weight, float(self.attempt)))
        if self.attempt < self.fails:
            raise sc.passes.base.Retry(f"attempt {self.attempt} contradicted")
        return PassResult(graph, True, self.attempt)


def test_the_manager_rolls_back_and_reruns_a_pass_that_asks_for_a_retry():
    model = MLP()
    graph = sc.capture(model, (torch.randn(2, 16),))
    start = float(model.a.weight.sum())
    flaky = _Flaky(fails=2)
    result = PassManager([flaky])(graph)
    # every attempt started from the restored model, and the third one's change was kept
    assert [a for a, _, _ in flaky.seen] == [0, 1, 2] and all(s == start for _, _, s in flaky.seen)
    assert result.results[-1][1].record == 2 and torch.equal(model.a.weight, torch.full((64, 16), 2.0))


def test_a_pass_that_keeps_asking_is_refused_with_the_model_restored():
    from secateurs.errors import VerificationError

    model = MLP()
    graph = sc.capture(model, (torch.randn(2, 16),))
    state, fingerprint = _state(model), module_fingerprint(model)
    flaky = _Flaky(fails=10, max_retries=2)
    with pytest.raises(VerificationError, match=r"_Flaky: the rewritten model kept contradicting the plan after 2 "
                                                r"retries \(attempt 2 contradicted\); the model was restored"):
        flaky(graph)  # called alone: the same transaction and retries as under a manager
    assert len(flaky.seen) == 3 and _same(model, state) and module_fingerprint(model) == fingerprint


def test_no_room_for_a_rollback_copy_warns_and_the_rollback_names_the_edit(monkeypatch, caplog):
    """A full temporary disk does not stop the pass; if it then fails, the rollback says what it could not undo."""
    import secateurs.modeling.rewrite as rewrite

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(rewrite, "ROLLBACK_MEMORY", 0)
    monkeypatch.setattr(rewrite.torch, "save", full)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    graph = sc.capture(model, (torch.randn(2, 16),))
    failing = _failing(SparsifyWeights)(0.5, keep_masks=False)
    with pytest.raises(PassContractError, match=r"tensors edited in place without a copy: 0\.weight"):
        PassManager([AnalyzeDependencies(), failing])(graph)
    assert "no room to keep a rollback copy" in caplog.text
