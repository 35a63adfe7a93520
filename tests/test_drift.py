"""The end-of-pipeline output check: shapes kept, drift measured, thresholds enforced."""

import pytest
import torch
from torch import nn

import secateurs as sc
from secateurs.errors import VerificationError
from secateurs.passes.drift import OutputDrift, check_drift, measure_drift, snapshot_outputs

import models


def test_ratio_zero_has_no_drift_and_pruning_some():
    model = models.ConvBN().eval()
    x = (torch.randn(2, 3, 8, 8),)
    report = sc.prune(model, x, ratio=0.0)
    assert report.drift == OutputDrift(1, pytest.approx(1.0), 0.0, 0.0)
    report = sc.prune(models.Grouped().eval(), (torch.randn(2, 3, 8, 8),), ratio=0.5, round_to=1)
    assert report.drift is not None and report.drift.rel_error > 0 and report.drift.cosine < 1
    assert sc.prune(models.ConvBN().eval(), x, ratio=0.3, round_to=1, check_outputs=False).drift is None


def test_changed_shapes_and_broken_models_are_refused():
    lin = nn.Linear(4, 3)
    x = torch.randn(2, 4)
    dense = snapshot_outputs(lin, (x,), {})
    with pytest.raises(VerificationError, match=r"output #0 changed from \(2, 3\)"):
        measure_drift(nn.Linear(4, 2), (x,), {}, dense)
    with pytest.raises(VerificationError, match="no longer runs"):
        measure_drift(nn.Linear(5, 3), (x,), {}, dense)
    nan = nn.Linear(4, 3)
    with torch.no_grad():
        nan.weight.fill_(float("nan"))
    with pytest.raises(VerificationError, match="NaN"):
        measure_drift(nan, (x,), {}, dense)


def test_thresholds():
    drift = OutputDrift(1, 0.95, 0.2, 0.5)
    check_drift(drift, min_cosine=0.9, max_rel_error=0.3)
    with pytest.raises(VerificationError, match="0.9500 is below the threshold 0.99"):
        check_drift(drift, min_cosine=0.99)
    with pytest.raises(VerificationError, match="exceeds the threshold 0.1"):
        check_drift(drift, max_rel_error=0.1)
