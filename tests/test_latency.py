"""Latency budgets: measured per-layer table, cached; a speed-up target is met on the real model."""

import json

import pytest
import torch
from torch import nn

import secateurs as sc
from secateurs.backends.latency import LatencyTable
from secateurs.errors import BudgetError
from secateurs.passes import AllocateBudget


class Wide(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(256, 1024)
        self.down = nn.Linear(1024, 256)
        self.small_up = nn.Linear(256, 64)
        self.small_down = nn.Linear(64, 256)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x))) + self.small_down(torch.relu(self.small_up(x)))


def test_table_is_cached_and_reused(tmp_path):
    cache = tmp_path / "lat.json"
    model = Wide().eval()
    x = torch.randn(64, 256)
    table = LatencyTable(cache=cache, repeats=3)
    t_full = table.layer(model.up, (64, 256), 0, 1024)
    t_half = table.layer(model.up, (64, 256), 0, 512)
    assert t_full > 0 and t_half > 0 and table.measured == 2
    table.save()
    again = LatencyTable(cache=cache, repeats=3)
    assert again.layer(model.up, (64, 256), 0, 1024) == t_full and again.measured == 0
    assert len(json.loads(cache.read_text())) == 2
    assert model(x).shape == (64, 256)


def test_speedup_target_is_reached(tmp_path, monkeypatch):
    # Fixed timings (measured ones made the plan depend on the machine): the model takes 10 ms, a neuron of the
    # wide branch 8 us and one of the small branch 2 us, so 1.4x (2.86 ms removed) must come from the wide one.
    model = Wide().eval()
    sizes = {"up": 8e-6, "small_up": 2e-6}

    def costs(self, graph, info, groups):
        return {g: next(v for k, v in sizes.items() if any(m.name == f"{k}.weight" for m in info.groups[g].members))
                for g in groups}

    monkeypatch.setattr(LatencyTable, "model_latency", lambda self, graph: 10e-3 * (
        1 - sum(sizes[k] * (v - getattr(graph.module, k).out_features) for k, v in (("up", 1024), ("small_up", 64)))
        / 10e-3))
    monkeypatch.setattr(LatencyTable, "group_costs", costs)
    x = (torch.randn(256, 256),)
    report = sc.prune(model, x, speedup=1.4, latency_cache=str(tmp_path / "lat.json"), round_to=8, min_keep=0.05)
    assert report.latency_before == pytest.approx(10e-3)
    assert model.up.out_features < 1024 and model.up.out_features / 1024 <= model.small_up.out_features / 64
    assert report.latency_before / report.latency_after >= 1.4 and "latency" in str(report)
    assert (tmp_path / "lat.json").is_file()


def test_unreachable_speedup_and_bad_options(tmp_path, monkeypatch):
    model = Wide().eval()
    # fixed timings, not measured ones (a unit test must not depend on the machine's speed): the model takes
    # 10 ms and its prunable layers save at most 5 ms, so a 50x speed-up (9.8 ms removed) is out of reach
    monkeypatch.setattr(LatencyTable, "model_latency", lambda self, graph: 10e-3)
    monkeypatch.setattr(LatencyTable, "group_costs",
                        lambda self, graph, info, groups: {g: 5e-3 / (len(groups) * info.groups[g].size) for g in groups})
    with pytest.raises(BudgetError, match=r"speed-up needs 9\.80 ms removed, but the prunable layers take 5\.00 ms"):
        sc.prune(model, (torch.randn(8, 256),), speedup=50.0, latency_cache=str(tmp_path / "l.json"))
    with pytest.raises(BudgetError, match="LatencyTable"):
        AllocateBudget(0.3, "dp", unit="latency")
    with pytest.raises(BudgetError, match="speedup"):
        AllocateBudget(0.3, "dp", speedup=1.5)
    with pytest.raises(BudgetError, match="backend"):
        LatencyTable(backend="tensorrt")


def test_onnxruntime_backend_times_layers_and_the_model(tmp_path):
    pytest.importorskip("onnxruntime")
    model = Wide().eval()
    table = LatencyTable("onnxruntime", cache=tmp_path / "ort.json", repeats=3)
    assert table.layer(model.up, (64, 256), 0, 1024) > 0
    report = sc.prune(model, (torch.randn(64, 256),), speedup=1.3, latency_backend="onnxruntime",
                      latency_cache=str(tmp_path / "ort.json"), round_to=8)
    assert report.latency_before and report.latency_after and model.up.out_features < 1024
    keys = json.loads((tmp_path / "ort.json").read_text())
    assert all(k.startswith("onnxruntime|") for k in keys)
