"""Data-parallel calibration (secateurs.distributed): a 2-process torchrun run equals the 1-process run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from distributed_worker import SCENARIOS, run, stream

from secateurs import distributed
from secateurs.errors import BudgetError

WORKER = Path(__file__).with_name("distributed_worker.py")


def test_helpers_do_nothing_without_a_process_group():
    assert not distributed.is_distributed()
    assert distributed.rank() == 0 and distributed.world_size() == 1 and distributed.is_writer()
    assert not distributed.is_writer(1)
    calls = [1, 2, 3]
    assert distributed.shard(calls) == calls and distributed.shard(calls) is not calls
    t = torch.ones(3)
    values = {"a": t, ("b", 1): 2, "c": np.zeros(2)}
    out = distributed.all_reduce_sum(values)
    assert out == values and out is not values and out["a"] is t
    distributed.barrier()
    assert not distributed.init() or "RANK" in os.environ


@pytest.fixture(scope="module")
def torchrun_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
         str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_two_process_torchrun_equals_one_process(torchrun_out, scenario):
    from safetensors.torch import load_file

    meta = json.loads((torchrun_out / "meta.json").read_text())
    assert meta["world_size"] == 2
    ranks = [load_file(torchrun_out / f"{scenario}.rank{r}.safetensors") for r in (0, 1)]
    for k, v in ranks[0].items():  # every rank took the same decisions: identical models
        assert torch.equal(v, ranks[1][k]), k
    single, single_scores = run(scenario)
    scores = [json.loads((torchrun_out / f"{scenario}.rank{r}.json").read_text()) for r in (0, 1)]
    assert scores[0] == scores[1] and scores[0].keys() == single_scores.keys()
    for k, v in single_scores.items():  # block influence summed over the ranks' shares = over all batches
        assert scores[0][k] == pytest.approx(v, rel=1e-6, abs=1e-9), k
    for k, v in ranks[0].items():
        ref = single[k]
        assert v.shape == ref.shape, f"{scenario}: {k} kept {tuple(v.shape)} vs {tuple(ref.shape)} single-process"
        if k.endswith("proj.weight") and ("nm" in SCENARIOS[scenario] or "sparsity" in SCENARIOS[scenario]):
            assert torch.equal(v == 0, ref == 0), f"{scenario}: the masks of {k} differ"
        torch.testing.assert_close(v, ref, rtol=1e-5, atol=1e-6, msg=f"{scenario}: {k}")
    if "ffn" in SCENARIOS[scenario]:
        width = ranks[0]["model.layers.0.mlp.up_proj.weight"].shape[0]
        assert width < 128
    if "experts" in SCENARIOS[scenario]:  # routing counts summed over the ranks choose the experts
        assert ranks[0]["model.layers.0.mlp.gate.weight"].shape[0] == 3


def test_two_process_streaming_prune_equals_one_process(torchrun_out, tmp_path):
    import secateurs as sc

    stream(torchrun_out / "src", tmp_path / "single")
    assert sorted(p.name for p in torchrun_out.iterdir() if p.is_dir()) == ["src", "stream"]  # rank 0 wrote
    got, want = sc.load_pretrained(torchrun_out / "stream"), sc.load_pretrained(tmp_path / "single")
    assert got.config.intermediate_size == want.config.intermediate_size < 128
    assert got.config.num_hidden_layers == want.config.num_hidden_layers == 3  # the same block removed
    assert got.config.num_attention_heads == 2
    ranks = [json.loads((torchrun_out / f"stream.rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["calibration_batches"] for r in ranks] == [3, 2]  # each rank carried its own share of the 5
    assert all("1 calibration batches for 2 processes" in r["refused"] for r in ranks)
    assert not (torchrun_out / "one-batch").exists()
    for k, v in want.state_dict().items():
        assert torch.equal(got.state_dict()[k] == 0, v == 0), k
        torch.testing.assert_close(got.state_dict()[k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_statistics_of_different_shapes_are_refused():
    assert distributed._spec(torch.zeros(2), "k")[1] == (2,)
    with pytest.raises(BudgetError, match="boolean"):
        distributed._spec(torch.zeros(2, dtype=torch.bool), "mask")
    with pytest.raises(BudgetError, match="'name'"):
        distributed._spec("text", "name")
