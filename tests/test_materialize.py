"""Backend: the rewritten module saves / reloads, re-exports, and a snapshot rolls back bit-exactly."""

import copy

import numpy as np
import torch

import secateurs as sc
from secateurs.backends import apply_keep, check_module_attributes
from secateurs.ir import analyze

import models
from helpers import call


def test_state_dict_round_trip_and_attributes():
    model = models.Grouped().eval()
    x = (torch.randn(1, 3, 6, 6),)
    sc.prune(model, x, ratio=0.5, round_to=1)
    assert check_module_attributes(model) == []
    rebuilt = copy.deepcopy(model)
    for p in rebuilt.parameters():
        p.data.zero_()
    rebuilt.load_state_dict(model.state_dict())
    assert torch.equal(call(rebuilt, x), call(model, x))


def test_snapshot_restore_is_bit_exact():
    model = models.Attention().eval()
    x = (torch.randn(2, 7, 24),)
    ref = call(model, x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    graph = sc.capture(model, x)
    info = analyze(graph)
    keep = {g.id: np.arange(g.size) % 2 == 0 for g in info.iter_groups()}
    snap = apply_keep(graph, info, keep)
    assert model.q.out_features < 30
    snap.restore()
    assert model.q.out_features == 30 and model.up.out_features == 40
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert torch.equal(call(model, x), ref)


def test_attribute_lint_names_the_module():
    model = models.ConvBN()
    model.conv2.in_channels = 5
    problems = check_module_attributes(model)
    assert problems and "conv2" in problems[0] and "in_channels" in problems[0]
