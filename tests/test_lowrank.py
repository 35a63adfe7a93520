"""Low-rank factorization: full rank is exact, energy / budget choose ranks, whitening beats plain."""

import copy

import pytest
import torch
from torch import nn

import secateurs as sc
from secateurs.errors import BudgetError
from secateurs.passes import AnalyzeDependencies, FactorizeLowRank, LowRankLinear


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(48, 96)
        self.fc2 = nn.Linear(96, 48)
        self.out = nn.Linear(48, 4)

    def forward(self, x):
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _apply(model, x, **kw):
    graph = sc.capture(model, (x,))
    AnalyzeDependencies()(graph)
    return FactorizeLowRank(**kw)(graph)


def test_full_rank_reproduces_outputs():
    torch.manual_seed(0)
    model = MLP().eval()
    x = torch.randn(16, 48)
    ref = model(x)
    result = _apply(model, x, energy=1.0, only_if_smaller=False)
    assert isinstance(model.fc1, LowRankLinear) and model.fc1.rank == 48
    assert not isinstance(model.out, LowRankLinear)  # the output layer is left alone
    torch.testing.assert_close(model(x), ref, atol=1e-4, rtol=1e-4)
    assert result.modified


def test_energy_threshold_picks_the_rank():
    torch.manual_seed(0)
    model = MLP().eval()
    with torch.no_grad():  # make fc1 exactly rank 6
        model.fc1.weight.copy_(torch.randn(96, 6) @ torch.randn(6, 48))
    x = torch.randn(16, 48)
    ref = model(x)
    _apply(model, x, energy=0.999999, ignore=("fc2",))
    assert isinstance(model.fc1, LowRankLinear) and model.fc1.rank == 6
    torch.testing.assert_close(model(x), ref, atol=1e-4, rtol=1e-4)


def test_parameter_budget_is_met():
    torch.manual_seed(0)
    model = MLP().eval()
    x = torch.randn(16, 48)
    result = _apply(model, x, param_ratio=0.5)
    record = result.record
    assert record.params_after <= 0.5 * record.params_before
    assert record.params_after > 0.4 * record.params_before  # not much more than asked
    assert model(x).shape == (16, 4)


def test_whitened_beats_plain_on_the_calibration_outputs():
    torch.manual_seed(0)
    dense = MLP().eval()
    # inputs with very uneven channel scales: activation-aware truncation should keep what matters
    x = torch.randn(256, 48) * torch.logspace(-2, 1, 48)
    errs = {}
    for method in ("plain", "whitened"):
        model = copy.deepcopy(dense)
        _apply(model, x, rank=8, method=method, calib=[(x,)], ignore=("fc2",))
        assert model.fc1.rank == 8
        with torch.no_grad():
            errs[method] = float((model.fc1(x) - dense.fc1(x)).pow(2).sum())
    assert errs["whitened"] < errs["plain"]


def test_bad_options():
    with pytest.raises(BudgetError, match="method"):
        FactorizeLowRank(method="qr")
    with pytest.raises(BudgetError, match="energy"):
        FactorizeLowRank(energy=0.0)
    with pytest.raises(BudgetError, match="param_ratio"):
        FactorizeLowRank(param_ratio=1.0)
