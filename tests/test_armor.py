"""ARMOR-style sparse factorization: never worse than its 2:4 starting point, S stays 2:4, module is exact."""

import copy

import pytest
import torch
from torch import nn

import secateurs as sc
from secateurs.errors import BudgetError
from secateurs.passes import AnalyzeDependencies, ArmorLinear, FactorizeARMOR, fit_armor
from secateurs.passes.sparse_masks import _nm_mask, _sparsegpt


def _proxy(w, x, approx):
    y = x @ w.t()
    return float((x @ approx.t() - y).pow(2).sum() / y.pow(2).sum())


@pytest.mark.parametrize("init", ["sparsegpt", "wanda"])
def test_proxy_loss_no_worse_than_sparsegpt_and_wanda(init):
    torch.manual_seed(0)
    w = torch.randn(32, 64, dtype=torch.float64)
    x = torch.randn(256, 64, dtype=torch.float64) * torch.linspace(0.2, 3, 64)
    a, s, b, start, final = fit_armor(w, x, init=init, steps=80)
    sgpt, _ = _sparsegpt(w, x.t() @ x, 0.5, (2, 4))
    wanda = w * _nm_mask(w.abs() * x.pow(2).sum(0).sqrt(), 2, 4)
    assert final <= start + 1e-12
    assert final <= _proxy(w, x, sgpt) + 1e-9 and final <= _proxy(w, x, wanda) + 1e-9
    assert final < _proxy(w, x, sgpt)  # the block-diagonal factors do help
    zeros = (s.reshape(32, -1, 4) == 0).sum(-1)
    assert bool((zeros >= 2).all())
    approx = torch.block_diag(*a) @ s @ torch.block_diag(*b)
    assert _proxy(w, x, approx) == pytest.approx(final, rel=1e-9)


def test_armor_linear_computes_a_s_b_and_the_pass_rewrites_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    dense = copy.deepcopy(model)
    x = torch.randn(64, 16)
    graph = sc.capture(model, (x,))
    AnalyzeDependencies()(graph)
    result = FactorizeARMOR(calib=[(x,)], steps=30)(graph)
    assert isinstance(model[0], ArmorLinear) and isinstance(model[2], ArmorLinear)
    assert isinstance(model[4], nn.Linear)  # output layer stays
    layer = model[0]
    a, b = torch.block_diag(*layer.a_blocks), torch.block_diag(*layer.b_blocks)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ (a @ layer.sparse @ b).t() + layer.bias, atol=1e-5, rtol=1e-5)
    assert all(final <= start for _, start, final in result.record.layers)
    assert model(x).shape == dense(x).shape


def test_armor_shape_errors():
    with pytest.raises(BudgetError, match="divisible"):
        fit_armor(torch.randn(6, 8), torch.randn(10, 8))
    with pytest.raises(BudgetError, match="init"):
        fit_armor(torch.randn(8, 8), torch.randn(10, 8), init="random")
