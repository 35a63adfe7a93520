"""Training-free recovery: least squares on kept weights, bias shift, BatchNorm statistics."""

import copy

import torch
from torch import nn

import secateurs as sc
from secateurs.passes import AnalyzeDependencies, ReconstructLayers, SparsifyWeights, check_nm


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(32, 64)
        self.bn = nn.BatchNorm1d(64)
        self.fc2 = nn.Linear(64, 32)
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.bn(self.fc1(x))))))


def test_least_squares_and_bias_shift_reduce_the_layer_error_and_keep_the_pattern():
    torch.manual_seed(0)
    dense = Net().eval()
    x = torch.randn(256, 32)
    model = copy.deepcopy(dense)
    graph = sc.capture(model, (x,))
    AnalyzeDependencies()(graph)
    SparsifyWeights(nm=(2, 4), criterion="magnitude")(graph)
    result = ReconstructLayers(dense, calib=[(x,)], norms=False)(graph)
    for name, before, after in result.record.layers:
        assert after < before, name
    assert check_nm(model, 2, 4, ["fc1", "fc2"]) == []
    with torch.no_grad():
        err = (model(x) - dense(x)).norm()
        plain = copy.deepcopy(dense)
        g2 = sc.capture(plain, (x,))
        AnalyzeDependencies()(g2)
        SparsifyWeights(nm=(2, 4), criterion="magnitude")(g2)
        assert err < (plain(x) - dense(x)).norm()


def test_batchnorm_statistics_are_re_estimated_on_calibration_data():
    torch.manual_seed(0)
    dense = Net().eval()
    model = copy.deepcopy(dense)
    x = torch.randn(128, 32)
    graph = sc.capture(model, (x,))
    result = ReconstructLayers(dense, calib=[(x[:64],), (x[64:],)], weights=False, biases=False)(graph)
    assert result.record.norms == 1
    with torch.no_grad():
        h = model.fc1(x)
    torch.testing.assert_close(model.bn.running_mean, h.mean(0), atol=1e-5, rtol=1e-4)
    assert not model.training and not model.bn.training


def test_full_support_refit_is_exact():
    torch.manual_seed(0)
    dense = Net().eval()
    model = copy.deepcopy(dense)
    with torch.no_grad():
        model.fc2.weight.add_(0.1 * torch.randn_like(model.fc2.weight))  # perturbed, nothing pruned
    x = torch.randn(512, 32)
    graph = sc.capture(model, (x,))
    ReconstructLayers(dense, calib=[(x,)], norms=False, damp=1e-9)(graph)
    torch.testing.assert_close(model.fc2.weight, dense.fc2.weight, atol=1e-4, rtol=1e-3)
