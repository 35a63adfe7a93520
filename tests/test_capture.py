"""Frontend: capture succeeds on tuples and dicts, names parameters, refuses what it cannot trace."""

import pytest
import torch
from torch import nn

import secateurs as sc
from secateurs.errors import CaptureError
from secateurs.frontends import split_inputs

import models


def test_capture_maps_placeholders_to_parameter_names():
    graph = sc.capture(models.ConvBN(), (torch.randn(1, 3, 4, 4),))
    assert set(graph.params.values()) == {"conv1.weight", "conv1.bias", "bn1.weight", "bn1.bias",
                                          "conv2.weight", "conv2.bias"}
    assert {"bn1.running_mean", "bn1.running_var"} <= set(graph.buffers.values())
    assert graph.user_inputs == ["x"]
    assert len(graph.user_outputs) == 1


def test_capture_restores_training_mode():
    model = models.ConvBN().train()
    sc.capture(model, (torch.randn(2, 3, 4, 4),))
    assert model.training


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # control flow on tensor values
            return self.fc(x)
        return x


def test_untraceable_model_gets_a_clear_error():
    with pytest.raises(CaptureError, match="(?s)cannot capture DataDependent.*torch.where"):
        sc.capture(DataDependent(), (torch.randn(2, 4),))


def test_bad_inputs_and_non_modules_are_refused():
    with pytest.raises(CaptureError, match="example_inputs must be"):
        sc.capture(models.ConvBN(), 3.0)
    with pytest.raises(CaptureError, match="torch.nn.Module"):
        sc.capture(lambda x: x, (torch.randn(1),))


class Kw(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.out = nn.Linear(6, 2)

    def forward(self, input_ids=None, scale=None, use_cache=True):
        assert use_cache is False, "capture must pass use_cache=False"
        return self.out(torch.relu(self.fc(input_ids * scale)))


def test_dict_inputs_and_use_cache():
    args, kwargs = split_inputs(Kw(), {"input_ids": torch.randn(1, 4), "scale": torch.ones(1)})
    assert args == () and kwargs["use_cache"] is False
    model = Kw().eval()
    inputs = {"input_ids": torch.randn(3, 4), "scale": torch.ones(1)}
    report = sc.prune(model, inputs, ratio=0.5, round_to=1)
    assert model.fc.out_features == 3 and report.params_after < report.params_before
