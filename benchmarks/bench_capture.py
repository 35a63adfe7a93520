"""Benchmark: secateurs vs Torch-Pruning on a zoo of small models.

For every model in the zoo this script measures the wall-clock time of one complete pruning call
at a fixed channel ratio (default 30%):

* secateurs: ``secateurs.prune(model, example_inputs, ratio)`` -- capture (torch.export),
  dependency analysis, importance scoring, the pruning plan, the in-place rewrite and its
  verification;
* Torch-Pruning (optional, ``import torch_pruning``): building ``tp.pruner.MetaPruner`` (its
  dependency-graph trace) plus ``pruner.step()``, with ``GroupMagnitudeImportance(p=2)``, default
  settings, and the final classifier / lm_head ignored.

Both tools get an identical copy of the same seeded model (``copy.deepcopy`` of one built once),
in the same process. Each call is repeated ``--repeat`` times on a fresh copy and the minimum time is
kept. After pruning, each result is checked: the pruned model must run on the example inputs, its
main output (the tensor, ``logits`` or ``last_hidden_state``) must have the dense model's shape, and
its parameter count must have dropped. Any exception, per model per tool, is a failure; its first
line is printed.

The table shows both times, their ratio (secateurs / Torch-Pruning; below 1 means secateurs is
faster), the parameter reduction and the verdict of each tool; a summary gives how many models each
tool handled correctly and the geometric-mean time ratio over the models where both calls returned.

Usage::

    python benchmarks/bench_capture.py [--models hf_resnet,hf_bert] [--ratio 0.3] [--repeat 3]
                                       [--threads 1] [--timeout 60]

Only CPU is used, with one torch thread by default (``--threads``); the zoo is small, so the whole run
takes about a minute on two cores. A call still running after ``--timeout`` seconds is abandoned and
counted as a failure (SIGALRM, so POSIX only).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import logging
import math
import os
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import secateurs as sc  # noqa: E402

try:
    import torch_pruning as tp
except ImportError:  # optional dependency
    tp = None

warnings.filterwarnings("ignore")
logging.getLogger("secateurs").setLevel(logging.ERROR)

SEED = 0
NUM_LABELS = 10
VOCAB = 256
LABELS: dict[str, Any] = {"num_labels": NUM_LABELS}  # PretrainedConfig kwarg (not in the typed signatures)

ExampleInputs = tuple[torch.Tensor, ...] | dict[str, torch.Tensor]


# --------------------------------------------------------------------------------------------- own models


class SmallResNet(nn.Module):
    """ResNet-style CNN: stem, two stages of basic blocks (residual adds, BatchNorm), a projection."""

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.down: nn.Module = nn.Identity()
            if stride != 1 or cin != cout:
                self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            return torch.relu(y + self.down(x))

    def __init__(self, num_classes: int = NUM_LABELS) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.layer1 = nn.Sequential(self.Block(32, 32, 1), self.Block(32, 32, 1))
        self.layer2 = nn.Sequential(self.Block(32, 64, 2), self.Block(64, 64, 1))
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class GroupedCNN(nn.Module):
    """CNN with a grouped conv, a depthwise-separable block and a two-branch channel concat."""

    def __init__(self, num_classes: int = NUM_LABELS) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU())
        self.grouped = nn.Sequential(nn.Conv2d(32, 64, 3, 1, 1, groups=4), nn.BatchNorm2d(64), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(64, 64, 3, 1, 1, groups=64), nn.BatchNorm2d(64), nn.ReLU())
        self.pw = nn.Sequential(nn.Conv2d(64, 64, 1), nn.BatchNorm2d(64), nn.ReLU())
        self.branch_a = nn.Sequential(nn.Conv2d(64, 32, 1), nn.ReLU())
        self.branch_b = nn.Sequential(nn.Conv2d(64, 48, 3, 1, 1), nn.ReLU())
        self.fuse = nn.Sequential(nn.Conv2d(80, 64, 1), nn.BatchNorm2d(64), nn.ReLU())
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pw(self.dw(self.grouped(self.stem(x))))
        x = torch.cat([self.branch_a(x), self.branch_b(x)], dim=1)
        x = self.fuse(x)
        return self.fc(x.mean(dim=(2, 3)))


class SmallMLP(nn.Module):
    """Three-layer MLP with LayerNorm and GELU."""

    def __init__(self, din: int = 128, hidden: int = 256, num_classes: int = NUM_LABELS) -> None:
        super().__init__()
        self.fc1 = nn.Linear(din, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.gelu(self.norm(self.fc1(x)))
        x = nn.functional.gelu(self.fc2(x))
        return self.fc3(x)


# --------------------------------------------------------------------------------------------- zoo


@dataclasses.dataclass
class Case:
    """One zoo entry: a dense model, its example inputs, and the names of its output head(s)."""

    model: nn.Module
    inputs: ExampleInputs
    heads: list[str]


def _image(size: int) -> tuple[torch.Tensor]:
    return (torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(SEED + 1)),)


def _pixel(size: int) -> dict[str, torch.Tensor]:
    return {"pixel_values": _image(size)[0]}


def _tokens(seq: int = 16) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (2, seq), generator=torch.Generator().manual_seed(SEED + 1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _hf_resnet() -> Case:
    from transformers import ResNetConfig, ResNetForImageClassification

    cfg = ResNetConfig(embedding_size=32, hidden_sizes=[32, 64, 128], depths=[1, 1, 1], layer_type="bottleneck",
                       **LABELS)
    return Case(ResNetForImageClassification(cfg), _pixel(64), ["classifier.1"])


def _hf_convnext() -> Case:
    from transformers import ConvNextConfig, ConvNextForImageClassification

    cfg = ConvNextConfig(num_stages=2, hidden_sizes=[32, 64], depths=[1, 1], **LABELS)
    return Case(ConvNextForImageClassification(cfg), _pixel(64), ["classifier"])


def _hf_mobilenetv2() -> Case:
    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification

    cfg = MobileNetV2Config(image_size=64, depth_multiplier=0.35, **LABELS)
    return Case(MobileNetV2ForImageClassification(cfg), _pixel(64), ["classifier"])


def _hf_vit() -> Case:
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=128, **LABELS)
    return Case(ViTForImageClassification(cfg), _pixel(32), ["classifier"])


def _hf_swin() -> Case:
    from transformers import SwinConfig, SwinForImageClassification

    cfg = SwinConfig(image_size=32, patch_size=2, embed_dim=32, depths=[1, 1], num_heads=[2, 4], window_size=4,
                     **LABELS)
    return Case(SwinForImageClassification(cfg), _pixel(32), ["classifier"])


def _hf_bert() -> Case:
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=64)
    return Case(BertModel(cfg), _tokens(), [])


def _hf_gpt2() -> Case:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4, bos_token_id=VOCAB - 1,
                     eos_token_id=VOCAB - 1)
    return Case(GPT2LMHeadModel(cfg), _tokens(), ["lm_head"])


def _hf_llama() -> Case:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return Case(LlamaForCausalLM(cfg), _tokens(), ["lm_head"])


def _own_resnet() -> Case:
    return Case(SmallResNet(), _image(32), ["fc"])


def _own_grouped() -> Case:
    return Case(GroupedCNN(), _image(32), ["fc"])


def _own_mlp() -> Case:
    return Case(SmallMLP(), (torch.randn(4, 128, generator=torch.Generator().manual_seed(SEED + 1)),), ["fc3"])


ZOO: dict[str, Callable[[], Case]] = {
    "resnet_cnn": _own_resnet,
    "grouped_cnn": _own_grouped,
    "mlp": _own_mlp,
    "hf_resnet": _hf_resnet,
    "hf_convnext": _hf_convnext,
    "hf_mobilenetv2": _hf_mobilenetv2,
    "hf_vit": _hf_vit,
    "hf_swin": _hf_swin,
    "hf_bert": _hf_bert,
    "hf_gpt2": _hf_gpt2,
    "hf_llama_gqa": _hf_llama,
}


def _full_resnet50() -> Case:
    from transformers import ResNetConfig, ResNetForImageClassification

    return Case(ResNetForImageClassification(ResNetConfig(**LABELS)), _pixel(224), ["classifier.1"])


def _full_bert_base() -> Case:
    from transformers import BertConfig, BertForSequenceClassification

    return Case(BertForSequenceClassification(BertConfig(**LABELS)), _tokens(128), ["classifier"])


def _full_vit_b16() -> Case:
    from transformers import ViTConfig, ViTForImageClassification

    return Case(ViTForImageClassification(ViTConfig(**LABELS)), _pixel(224), ["classifier"])


# Real-size architectures (default Hugging Face configs, random weights): run with --full.
FULL: dict[str, Callable[[], Case]] = {
    "resnet50": _full_resnet50,
    "bert_base": _full_bert_base,
    "vit_b16": _full_vit_b16,
}
ALL = {**ZOO, **FULL}


def build(name: str) -> Case:
    """Build a zoo entry with a fixed seed, in eval mode."""
    torch.manual_seed(SEED)
    case = ALL[name]()
    case.model.eval()
    return case


# --------------------------------------------------------------------------------------------- running


def run_model(model: nn.Module, inputs: ExampleInputs) -> Any:
    with torch.no_grad():
        return model(**inputs) if isinstance(inputs, dict) else model(*inputs)


def main_tensor(out: Any) -> torch.Tensor:
    """The main output tensor: the tensor itself, ``logits``, ``last_hidden_state`` or the first element."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        value = getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(out, dict):
        return main_tensor(next(iter(out.values())))
    if isinstance(out, (tuple, list)):
        return main_tensor(out[0])
    raise TypeError(f"no tensor in output of type {type(out).__name__}")


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:160]


@dataclasses.dataclass
class Outcome:
    """What one tool did on one model."""

    seconds: float | None = None  # min time of the pruning call; None if it raised
    params_after: int | None = None
    ok: bool = False
    verdict: str = "-"
    error: str | None = None
    note: str = ""


def prune_secateurs(model: nn.Module, case: Case, ratio: float) -> str:
    report = sc.prune(model, case.inputs, ratio=ratio)
    return f"frozen={len(report.frozen)} retries={report.retries}"


def prune_tp(model: nn.Module, case: Case, ratio: float) -> str:
    assert tp is not None
    modules = dict(model.named_modules())
    ignored = [modules[h] for h in case.heads]
    imp = tp.importance.GroupMagnitudeImportance(p=2)
    pruner = tp.pruner.MetaPruner(model, case.inputs, importance=imp, pruning_ratio=ratio, ignored_layers=ignored)
    pruner.step()
    return ""


class CallTimeout(Exception):
    """A pruning call ran past ``--timeout`` seconds."""


def _alarm(signum: int, frame: Any) -> None:
    raise CallTimeout


def call_with_timeout(fn: Callable[[], str], seconds: float) -> str:
    """Run ``fn``, raising :class:`CallTimeout` after ``seconds`` (SIGALRM; no limit where unavailable)."""
    if seconds <= 0 or not hasattr(signal, "setitimer"):
        return fn()
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return fn()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def measure(tool: Callable[[nn.Module, Case, float], str], case: Case, dense_shape: torch.Size, dense_params: int,
            ratio: float, repeat: int, timeout: float) -> Outcome:
    """Time ``tool`` on fresh copies ``repeat`` times (min), then check the last pruned copy."""
    out = Outcome()
    times = []
    model = None
    for _ in range(repeat):
        model = copy.deepcopy(case.model)
        start = time.perf_counter()
        try:
            out.note = call_with_timeout(functools.partial(tool, model, case, ratio), timeout)
        except CallTimeout:
            out.error = f"pruning call still running after {timeout:g}s, abandoned"
            out.verdict = "FAIL timeout"
            return out
        except Exception as exc:  # noqa: BLE001 - every failure is a result here
            out.error = first_line(exc)
            out.verdict = "FAIL prune"
            return out
        times.append(time.perf_counter() - start)
    out.seconds = min(times)
    assert model is not None
    out.params_after = n_params(model)
    try:
        shape = main_tensor(run_model(model, case.inputs)).shape
    except Exception as exc:  # noqa: BLE001
        out.error = "pruned model does not run: " + first_line(exc)
        out.verdict = "FAIL run"
        return out
    if shape != dense_shape:
        out.verdict = "FAIL shape"
        out.error = f"output shape {tuple(shape)} != dense {tuple(dense_shape)}"
    elif out.params_after >= dense_params:
        out.verdict = "FAIL nochg"
        out.error = "no parameters removed"
    else:
        out.ok = True
        out.verdict = "ok"
    return out


# --------------------------------------------------------------------------------------------- report


def fmt_time(s: float | None) -> str:
    return "-" if s is None else f"{s:7.3f}"


def fmt_drop(after: int | None, before: int) -> str:
    return "-" if after is None else f"{100 * (1 - after / before):5.1f}%"


def _git_rev() -> str:
    """`` (git abc1234[+dirty])`` for the checkout this script lives in, or ``""``."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "secateurs"], cwd=root, capture_output=True,
                               text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return f" (git {rev}{'+dirty' if dirty else ''})" if rev else ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(ZOO), help="comma-separated subset of: " + ", ".join(ALL))
    parser.add_argument("--full", action="store_true", help="the real-size models: " + ", ".join(FULL))
    parser.add_argument("--ratio", type=float, default=0.3, help="channel pruning ratio (default 0.3)")
    parser.add_argument("--repeat", type=int, default=3, help="timed calls per tool per model, min kept (default 3)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: the tensors are tiny, both tools are Python-bound, "
                             "and OpenMP stalls on a shared machine would swamp the timings; 0 keeps torch's default)")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds before one pruning call counts as hung (default 60; 0 disables)")
    args = parser.parse_args()

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    names = list(FULL) if args.full else [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in ALL]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {list(ALL)}")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except ImportError:
        hf = [n for n in names if n.startswith("hf_") or n in FULL]
        if hf:
            print(f"note: transformers is not installed; skipping {', '.join(hf)}")
        names = [n for n in names if not n.startswith("hf_")]

    tools: dict[str, Callable[[nn.Module, Case, float], str]] = {"secateurs": prune_secateurs}
    if tp is None:
        print("note: torch_pruning is not installed (pip install torch-pruning); reporting secateurs only")
    else:
        tools["torch-pruning"] = prune_tp

    print(f"secateurs {sc.__version__}{_git_rev()}" + ("" if tp is None else f", torch-pruning {tp.__version__}")
          + f", torch {torch.__version__}")
    print(f"ratio={args.ratio}  repeat={args.repeat} (min time kept)  timeout={args.timeout:g}s per call  "
          f"threads={torch.get_num_threads()}  seed={SEED}")
    print()

    # One untimed call per tool first, so one-off start-up costs (torch.export / dynamo initialisation,
    # lazy imports) do not land on whichever model happens to come first.
    warm = build("mlp")
    for fn in tools.values():
        try:
            fn(copy.deepcopy(warm.model), warm, args.ratio)
        except Exception as exc:  # noqa: BLE001
            print(f"note: warm-up call failed: {first_line(exc)}")

    rows: list[tuple[str, int, dict[str, Outcome]]] = []
    for name in names:
        try:
            case = build(name)
            dense_shape = main_tensor(run_model(case.model, case.inputs)).shape
        except Exception as exc:  # noqa: BLE001
            print(f"[{name}] could not build: {first_line(exc)}")
            continue
        dense_params = n_params(case.model)
        results = {tool: measure(fn, case, dense_shape, dense_params, args.ratio, args.repeat, args.timeout)
                   for tool, fn in tools.items()}
        rows.append((name, dense_params, results))
        for tool, o in results.items():
            extra = f" ({o.note})" if o.note else ""
            msg = f"  {o.error}" if o.error else ""
            took = "" if o.seconds is None else f" {o.seconds:.3f}s"
            print(f"[{name}] {tool}: {o.verdict}{took}{extra}{msg}", flush=True)

    has_tp = "torch-pruning" in tools
    header = f"{'model':<16} {'params':>9} | {'sc time':>7} {'sc -par':>7} {'sc':<12}"
    if has_tp:
        header += f" | {'tp time':>7} {'tp -par':>7} {'tp':<12} | {'sc/tp':>6}"
    header = header.rstrip()
    print()
    print(header)
    print("-" * len(header))
    ratios = []
    for name, dense_params, results in rows:
        s = results["secateurs"]
        line = (f"{name:<16} {dense_params:>9,} | {fmt_time(s.seconds):>7} {fmt_drop(s.params_after, dense_params):>7}"
                f" {s.verdict:<12}")
        if has_tp:
            t = results["torch-pruning"]
            ratio = "-"
            if s.seconds is not None and t.seconds is not None:
                ratios.append(s.seconds / t.seconds)
                ratio = f"{ratios[-1]:6.2f}"
            line += (f" | {fmt_time(t.seconds):>7} {fmt_drop(t.params_after, dense_params):>7} {t.verdict:<12}"
                     f" | {ratio:>6}")
        print(line.rstrip())
    print("-" * len(header))
    legend = "times in seconds (min of --repeat); -par = parameters removed; sc = secateurs"
    print(legend + ("; tp = torch-pruning; sc/tp = secateurs time / torch-pruning time" if has_tp else ""))
    failures = [(name, tool, o.error) for name, _, results in rows for tool, o in results.items() if o.error]
    if failures:
        print()
        print("failures:")
        for name, tool, error in failures:
            print(f"  {name} [{tool}]: {error}")
    print()

    m = len(rows)
    n_sc = sum(r["secateurs"].ok for _, _, r in rows)
    if has_tp:
        n_tp = sum(r["torch-pruning"].ok for _, _, r in rows)
        print(f"correct on {n_sc}/{m} models (secateurs) vs {n_tp}/{m} (torch-pruning)")
        if ratios:
            geo = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
            print(f"geometric-mean time ratio secateurs/torch-pruning: {geo:.2f}x "
                  f"(over {len(ratios)} models where both pruning calls returned)")
        else:
            print("geometric-mean time ratio secateurs/torch-pruning: n/a (no model where both calls returned)")
    else:
        print(f"correct on {n_sc}/{m} models (secateurs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
