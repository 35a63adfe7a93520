"""The fast capture: one recorded forward gives torch.export's graph, and refuses what it cannot record faithfully.

Oracle: ``torch.export`` itself. On zoo families of every kind, the recorded graph has the exported graph's ops
in the same order with the same shapes, the same placeholders (parameters, buffers, constants, inputs) and
outputs; the only differences allowed are nodes torch.export adds that compute nothing (``_assert_tensor_metadata``,
``contiguous`` of a contiguous tensor, unused ``getitem``).
"""

from __future__ import annotations

import importlib.util
import operator

import pytest
import torch
from torch import fx, nn

import secateurs as sc
from secateurs.errors import BudgetError, CaptureError
from secateurs.frontends import split_inputs
from secateurs.frontends.record import RecordError, record_call
from secateurs.frontends.torch_export import capture_call
from secateurs.ir.depgraph import analyze
from secateurs.ir.graph import tensor_shape

import models
from families import build

_NOTHING = {"aten._assert_tensor_metadata.default", "aten.contiguous.default"}
_FAMILIES = ["bert", "llama", "t5", "mixtral", "gpt2", "vit", "resnet", "swin", "deberta_v2", "mamba"]
if importlib.util.find_spec("torchvision") is not None:
    _FAMILIES += ["tv_resnet18", "tv_vit", "tv_swin", "tv_densenet121"]


def _ops(graph) -> list[tuple[str, tuple[int, ...] | None]]:
    return [(str(n.target), tensor_shape(n.meta.get("val"))) for n in graph.nodes()
            if n.op == "call_function" and str(n.target) not in _NOTHING
            and not (n.target is operator.getitem and not n.users)]


def _paths(graph) -> list[str]:
    return [str(list(s.values())[-1][0]) if (s := n.meta.get("nn_module_stack")) else ""
            for n in graph.nodes() if n.op == "call_function" and str(n.target) not in _NOTHING
            and not (n.target is operator.getitem and not n.users)]


@pytest.mark.parametrize("name", _FAMILIES)
def test_recorded_graph_is_the_exported_graph(name):
    model, inputs = build(name)
    args, kwargs = split_inputs(model, inputs)
    exported = capture_call(model, args, kwargs, "export")
    recorded = capture_call(model, args, kwargs, "record")
    assert recorded.capture == "record" and exported.capture == "export"
    assert _ops(recorded) == _ops(exported)
    assert [n.name for n in recorded.nodes() if n.op == "placeholder"] == \
        [n.name for n in exported.nodes() if n.op == "placeholder"]
    assert (recorded.params, recorded.buffers, recorded.constants) == \
        (exported.params, exported.buffers, exported.constants)
    assert recorded.user_outputs == exported.user_outputs
    assert _paths(recorded) == _paths(exported)  # the module that ran each op
    info_r, info_e = analyze(recorded), analyze(exported)
    groups = [(g.name, g.kind, g.size) for g in info_r.iter_groups()]
    assert groups == [(g.name, g.kind, g.size) for g in info_e.iter_groups()]
    assert sorted(f.reason for f in info_r.frozen) == sorted(f.reason for f in info_e.frozen)


def test_the_recorded_graph_runs_to_the_module_outputs():
    torch.manual_seed(0)
    model, inputs = build("llama")
    args, kwargs = split_inputs(model, inputs)
    graph = capture_call(model, args, kwargs, "record")
    out = fx.Interpreter(graph.interpreter_root(), graph=graph.fx_graph).run(*graph.flat_inputs())
    with torch.no_grad():
        want = model(*args, **kwargs).logits
    torch.testing.assert_close(out[0], want)
    torch.testing.assert_close(graph.outputs[0], want)


class WritesBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1  # state changed by a forward: recording it would change the model
        return self.fc(x)


class CatchesEverything(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        try:
            if x.sum() > 0:
                x = x * 2
        except Exception:  # noqa: BLE001 - code that swallows the recorder's refusal
            pass
        return self.fc(x)


def test_a_forward_that_writes_its_state_is_refused_before_the_write_and_exported():
    model = WritesBuffer()
    with pytest.raises(RecordError, match="writes into buffer 'calls'"):
        record_call(model, (torch.randn(2, 4),), {})
    assert float(model.calls) == 0.0  # refused before the op ran
    graph = sc.capture(model, (torch.randn(2, 4),))
    assert graph.capture == "export"
    assert float(model.calls) == 0.0


def test_python_reading_tensor_values_is_refused_even_when_the_model_catches_it():
    with pytest.raises(RecordError, match="reads tensor values"):
        record_call(CatchesEverything(), (torch.randn(2, 4),), {})
    with pytest.raises(CaptureError):
        capture_call(CatchesEverything(), (torch.randn(2, 4),), {}, "record")


def test_unknown_capture_method_is_refused():
    with pytest.raises(CaptureError, match="unknown capture method 'fx'"):
        capture_call(models.ConvBN(), (torch.randn(1, 3, 4, 4),), {}, "fx")


def test_meta_model_records_with_the_groups_of_the_real_one():
    import transformers as tf

    cfg = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128)
    torch.manual_seed(0)
    real = tf.LlamaForCausalLM(cfg)
    with torch.device("meta"):
        meta = tf.LlamaForCausalLM(cfg)
    ids = torch.randint(0, 128, (1, 8))
    g_real = sc.capture(real, {"input_ids": ids})
    g_meta = sc.capture(meta, {"input_ids": ids.to("meta")})
    assert g_meta.capture == "record"
    assert _ops(g_meta) == _ops(g_real)
    i_real, i_meta = analyze(g_real), analyze(g_meta)
    assert [(g.name, g.size) for g in i_meta.iter_groups()] == [(g.name, g.size) for g in i_real.iter_groups()]


def test_fast_and_full_verification_catch_the_same_hard_coded_size():
    x = (torch.randn(2, 3, 4, 4),)
    fast, full = models.HardCodedView().eval(), models.HardCodedView().eval()
    r_fast = sc.prune(fast, x, ratio=0.5, round_to=1)
    r_full = sc.prune(full, x, ratio=0.5, round_to=1, verify="full")
    assert r_fast.capture == "record" and r_fast.verification.startswith("fast: one forward of the pruned model")
    assert r_full.verification.startswith("full: a torch.export capture")
    for report in (r_fast, r_full):
        assert report.retries >= 1 and any("hard-coded" in f.reason for f in report.frozen)
    assert (fast.conv1.out_channels, fast.conv2.out_channels) == (full.conv1.out_channels, full.conv2.out_channels)
    assert "verified (fast: one forward of the pruned model replayed" in str(r_fast)


def test_verify_takes_its_documented_values_only():
    with pytest.raises(BudgetError, match="verify must be"):
        sc.prune(models.ConvBN(), (torch.randn(1, 3, 4, 4),), ratio=0.3, verify="always")
    report = sc.prune(models.ConvBN().eval(), (torch.randn(1, 3, 4, 4),), ratio=0.5, round_to=1, verify="off")
    assert report.verification.startswith("not verified") and report.params_after < report.params_before


def test_inspect_reads_no_weight_and_checks_the_stored_shapes(llama_dir, tmp_path):
    """Oracle: the same groups after every weight byte is overwritten (only headers are read), and a stored shape
    the config does not build is named."""
    import json
    import shutil
    import struct

    from secateurs.convert import inspect_checkpoint

    want = inspect_checkpoint(llama_dir)
    src = tmp_path / "garbage"
    shutil.copytree(llama_dir, src)
    path = src / "model.safetensors"
    raw = path.read_bytes()
    start = 8 + struct.unpack("<Q", raw[:8])[0]
    path.write_bytes(raw[:start] + b"\xff" * (len(raw) - start))  # NaN bit patterns everywhere
    assert inspect_checkpoint(src) == want
    header = json.loads(raw[8:start])
    header["lm_head.weight"]["shape"] = header["lm_head.weight"]["shape"][::-1]  # same bytes, wrong shape
    body = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + raw[start:])
    with pytest.raises(sc.CheckpointError, match="'lm_head.weight' is stored as"):
        inspect_checkpoint(src)
