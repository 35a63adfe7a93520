"""Property test: random networks of conv / linear / add / cat / split / grouped / depthwise / flatten / heads.

Every generated network is captured, a random fraction of every group's channels is made dead, and pruning
exactly those channels must leave the outputs equal (atol 1e-5) with output shapes preserved.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import secateurs as sc
from secateurs.errors import BudgetError

from helpers import call, dead_importance, make_dead

OPS = ["conv", "grouped", "depthwise", "residual", "cat", "split", "bn"]


class RandomNet(nn.Module):
    """A chain of blocks chosen from OPS, then flatten or pool, then one or two linears."""

    def __init__(self, plan: list[tuple[str, int]], channels: int, head: str, heads_block: bool):
        super().__init__()
        self.plan = plan
        self.blocks = nn.ModuleList()
        c = 4
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        c = channels
        for op, width in plan:
            if op == "conv":
                block = nn.ModuleDict({"a": nn.Conv2d(c, width, 3, padding=1)})
                c = width
            elif op == "grouped":
                g = 2 if c % 2 == 0 else 1
                block = nn.ModuleDict({"a": nn.Conv2d(c, 2 * g * (width // (2 * g) + 1), 3, padding=1, groups=g)})
                c = block["a"].out_channels
            elif op == "depthwise":
                block = nn.ModuleDict({"a": nn.Conv2d(c, c, 3, padding=1, groups=c)})
            elif op == "residual":
                block = nn.ModuleDict({"a": nn.Conv2d(c, width, 1), "b": nn.Conv2d(width, c, 3, padding=1)})
            elif op == "cat":
                block = nn.ModuleDict({"a": nn.Conv2d(c, width, 1), "b": nn.Conv2d(c, width + 3, 3, padding=1)})
                c = 2 * width + 3
            elif op == "split":
                block = nn.ModuleDict({"a": nn.Conv2d(c, 2 * width, 1), "l": nn.Conv2d(width, width, 1),
                                       "r": nn.Conv2d(width, width, 3, padding=1)})
                c = width
            else:
                block = nn.ModuleDict({"a": nn.BatchNorm2d(c)})
            self.blocks.append(block)
        self.head_kind = head
        self.c = c
        feat = c * 16 if head == "flatten" else c
        self.fc1 = nn.Linear(feat, 12)
        self.heads_block = heads_block
        if heads_block:
            self.q = nn.Linear(12, 12)
            self.k = nn.Linear(12, 12)
            self.v = nn.Linear(12, 12)
            self.o = nn.Linear(12, 12)
        self.fc2 = nn.Linear(12, 5)

    def forward(self, x):
        x = F.relu(self.stem(x))
        for (op, _), block in zip(self.plan, self.blocks):
            if op == "residual":
                x = x + block["b"](F.relu(block["a"](x)))
            elif op == "cat":
                x = torch.cat([block["a"](x), F.relu(block["b"](x))], 1)
            elif op == "split":
                left, right = block["a"](x).chunk(2, dim=1)
                x = F.relu(block["l"](left)) + block["r"](right)
            else:
                x = block["a"](x)
                x = F.relu(x) if op != "bn" else x
        if self.head_kind == "flatten":
            x = F.adaptive_avg_pool2d(x, 4).flatten(1)
        else:
            x = x.mean((2, 3))
        h = F.gelu(self.fc1(x))
        if self.heads_block:
            b = h.shape[0]
            q = self.q(h).view(b, 1, -1, 3).transpose(1, 2)
            k = self.k(h).view(b, 1, -1, 3).transpose(1, 2)
            v = self.v(h).view(b, 1, -1, 3).transpose(1, 2)
            a = F.scaled_dot_product_attention(q, k, v)
            h = h + self.o(a.transpose(1, 2).reshape(b, 1, -1)).squeeze(1)
        return self.fc2(h)


def _randomise(model: nn.Module) -> None:
    for mod in model.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-1, 1)
            mod.running_var.uniform_(0.5, 2)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.uniform_(-0.5, 0.5)


nets = st.builds(
    RandomNet,
    plan=st.lists(st.tuples(st.sampled_from(OPS), st.integers(2, 9)), min_size=1, max_size=5),
    channels=st.integers(3, 10),
    head=st.sampled_from(["flatten", "pool"]),
    heads_block=st.booleans(),
)


EXACT_EXAMPLES = 40  # CI budget; tools/fuzz.py runs more
PARITY_EXAMPLES = 8


def check_exact(net, ratio, seed):
    """Dead channels prune exactly; shapes and counts as planned."""
    torch.manual_seed(seed)
    net = net.eval()
    _randomise(net)
    x = (torch.randn(2, 3, 8, 8),)
    dead, _ = make_dead(net, x, ratio, seed=seed)
    ref = call(net, x)
    report = sc.prune(net, x, ratio=ratio, importance=dead_importance(dead), round_to=1, min_keep=0.0)
    out = call(net, x)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    assert report.retries == 0, [f.reason for f in report.frozen]
    removed = sum(c.before - c.after for c in report.changes)
    assert removed == sum(len(v) for v in dead.values())
    if dead:
        assert report.params_after < report.params_before


def check_pipeline_parity(net, ratio, seed, criterion, nm, tmp):
    """A random pipeline (width by a criterion, optionally 2:4) -> lint between passes (PassManager) -> the
    rewritten model exports to ONNX and ONNX Runtime equals PyTorch; masks are permanent first."""
    from secateurs.backends.onnx import export_onnx
    from secateurs.passes import remove_masks

    torch.manual_seed(seed)
    net = net.eval()
    _randomise(net)
    x = (torch.randn(2, 3, 8, 8),)
    try:
        width = {"importance": criterion, "round_to": 1} if ratio > 0 or not nm else {}  # read by width pruning only
        report = sc.prune(net, x, ratio=ratio, nm="2:4" if nm else None, **width)
    except BudgetError as exc:  # the documented refusal: no layer has input channels in groups of 4
        assert nm and "no layer can be 2:4 sparse" in str(exc), exc
        return
    assert report.drift is not None and report.drift.outputs == 1
    remove_masks(net)
    result = export_onnx(net, x, tmp / f"fuzz_{seed}.onnx", atol=1e-4, rtol=1e-3)
    assert result.max_abs_error < 1e-4


@settings(max_examples=EXACT_EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(net=nets, ratio=st.sampled_from([0.2, 0.4, 0.6]), seed=st.integers(0, 3))
def test_random_networks_prune_dead_channels_exactly(net, ratio, seed):
    check_exact(net, ratio, seed)


@settings(max_examples=PARITY_EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(net=nets, ratio=st.sampled_from([0.0, 0.3, 0.5]), seed=st.integers(0, 3),
       criterion=st.sampled_from(["l1", "l2", "maw", "activation"]), nm=st.booleans())
def test_random_pipelines_export_and_match_onnx_runtime(net, ratio, seed, criterion, nm, tmp_path_factory):
    check_pipeline_parity(net, ratio, seed, criterion, nm, tmp_path_factory.mktemp("fuzz"))
