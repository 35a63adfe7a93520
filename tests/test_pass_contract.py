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
