"""ScoreChannels: each criterion ranks channels the way its definition says."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

import secateurs as sc
from secateurs.passes import AnalyzeDependencies, ChannelScores, ScoreChannels


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _model():
    m = TwoLayer().eval()
    with torch.no_grad():
        m.fc1.weight.copy_(torch.ones(6, 4))
        m.fc1.bias.zero_()
        m.fc2.weight.copy_(torch.ones(3, 6))
        m.fc1.weight[2].mul_(10)        # channel 2 has large weights
        m.fc2.weight[:, 4] = 0.0        # channel 4 feeds nothing
        m.fc1.weight[5, 0] = 50.0       # channel 5 has one huge weight
    return m


def _scores(model, criterion, **kw):
    graph = sc.capture(model, (torch.randn(5, 4),))
    AnalyzeDependencies()(graph)
    ScoreChannels(criterion, **kw)(graph)
    (scores,) = graph.analysis(ChannelScores).scores.values()
    return scores


def test_l1_l2_sum_over_the_group():
    m = _model()
    l1 = _scores(m, "l1")
    # channel c: fc1 row (4 weights) + fc1 bias + fc2 column (3 weights)
    assert l1[0] == pytest.approx(4 + 3)
    assert l1[2] == pytest.approx(40 + 3)
    assert l1[4] == pytest.approx(4)
    l2 = _scores(m, "l2")
    assert l2[0] == pytest.approx(np.sqrt(4 + 3))
    assert np.argmin(l2) == 4


def test_maw_is_the_max_abs_weight():
    maw = _scores(_model(), "maw")
    assert maw[5] == pytest.approx(50) and maw[2] == pytest.approx(10) and maw[0] == pytest.approx(1)


def test_activation_uses_input_rms_times_weight_column_norm():
    m = _model()
    x = torch.ones(8, 4)
    scores = _scores(m, "activation", calib=[(x,)])
    h = torch.relu(m.fc1(x))
    expected = h.pow(2).mean(0).sqrt() * m.fc2.weight.norm(dim=0)
    np.testing.assert_allclose(scores, expected.detach().numpy(), rtol=1e-5)
    assert scores[4] == 0


def test_taylor_is_weight_times_gradient():
    m = _model()
    x = torch.randn(8, 4)
    scores = _scores(m, "taylor", calib=[(x,)], loss_fn=lambda out: out.sum())
    m.zero_grad()
    m(x).sum().backward()
    expected = ((m.fc1.weight * m.fc1.weight.grad).abs().sum(1) + (m.fc1.bias * m.fc1.bias.grad).abs()
                + (m.fc2.weight * m.fc2.weight.grad).abs().sum(0))
    np.testing.assert_allclose(scores, expected.detach().numpy(), rtol=1e-5)


def test_empty_calibration_and_bad_custom_scores_are_refused():
    with pytest.raises(sc.BudgetError, match="calibration data is empty"):
        _scores(_model(), "activation", calib=[])
    with pytest.raises(sc.BudgetError, match="shape"):
        _scores(_model(), lambda g, i, grp: np.ones(2))


class ConstantChannels(nn.Module):
    """fc1 channels 0-2 have zero weights: relu(bias) is a constant the consumer can absorb."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 3)
        with torch.no_grad():
            self.fc1.weight[:3] = 0
            self.fc1.bias[:3] = torch.tensor([0.5, 1.0, 2.0])

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_flap_finds_constant_channels_and_bias_compensation_is_exact():
    x = torch.randn(16, 4)
    model = ConstantChannels().eval()
    plain = copy.deepcopy(model)
    ref = model(x)
    scores = _scores(model, "flap", calib=[(x,)])
    assert set(np.argsort(scores)[:3]) == {0, 1, 2} and np.allclose(scores[:3], 0)
    report = sc.prune(model, (x,), ratio=3 / 8, importance="flap", calib=[(x,)], bias_compensation=True,
                      round_to=1, min_keep=0.0)
    assert model.fc1.out_features == 5 and report.compensated_biases == 1
    torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)
    sc.prune(plain, (x,), ratio=3 / 8, importance="flap", calib=[(x,)], round_to=1, min_keep=0.0,
             bias_compensation=False)  # flap compensates by default
    assert not torch.allclose(plain(x), ref, atol=1e-3)  # without compensation the constants are lost


def test_bias_compensation_needs_statistics():
    with pytest.raises(sc.BudgetError, match="bias_compensation .* needs importance 'flap' or 'activation'"):
        sc.prune(ConstantChannels(), (torch.randn(2, 4),), ratio=0.3, importance="l2", bias_compensation=True)


def test_taylor_uses_the_language_modelling_loss_of_hf_models():
    from zoo import build

    model, inputs = build("llama")
    graph = sc.capture(model, inputs)
    AnalyzeDependencies()(graph)
    ScoreChannels("taylor")(graph)
    auto = graph.analysis(ChannelScores).scores
    labels = inputs["input_ids"]
    ScoreChannels("taylor", loss_fn=lambda out: out.loss, calib=[{**inputs, "labels": labels}])(graph)
    explicit = graph.analysis(ChannelScores).scores
    for gid in auto:
        np.testing.assert_allclose(auto[gid], explicit[gid], rtol=1e-5)
