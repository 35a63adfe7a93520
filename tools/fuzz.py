"""Long fuzz run: the property tests of tests/test_property.py with a bigger example budget.

Random networks (conv / grouped / depthwise / residual / cat / split / BN / flatten / attention heads) are
captured and pruned: dead channels must prune exactly, and random pipelines (width by a random criterion,
optionally 2:4) must pass the linter between passes, keep their output shapes and export to ONNX with ONNX
Runtime equal to PyTorch. Any counterexample is printed by hypothesis; add it to the tests as a named
regression test.

With ``--onnx N``, N mutated ONNX files (dropped nodes, cut initializers, wrong opsets, rewired inputs,
unknown op types, broken attributes, truncated or flipped bytes) go through ``prune_onnx``: each must succeed
(and run in ONNX Runtime) or raise one of the documented error types, leaving no output file.

Usage::

    python tools/fuzz.py --exact 500 --parity 100 --onnx 1000 [--seed 1]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import test_property as tp  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exact", type=int, default=300, help="dead-channel exactness cases")
    parser.add_argument("--parity", type=int, default=60, help="random pipeline + ONNX Runtime parity cases")
    parser.add_argument("--onnx", type=int, default=300, help="mutated ONNX files through prune_onnx")
    parser.add_argument("--seed", type=int, default=1, help="hypothesis seed (CI uses derandomized runs)")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    common = dict(deadline=None, derandomize=False, database=None, suppress_health_check=list(HealthCheck))
    start = time.perf_counter()

    @settings(max_examples=max(args.exact, 1), **common)
    @given(net=tp.nets, ratio=st.sampled_from([0.2, 0.4, 0.6]), seed=st.integers(0, 1000))
    def exact(net, ratio, seed):
        tp.check_exact(net, ratio, seed)

    with tempfile.TemporaryDirectory() as tmp:

        @settings(max_examples=max(args.parity, 1), **common)
        @given(net=tp.nets, ratio=st.sampled_from([0.0, 0.3, 0.5]), seed=st.integers(0, 1000),
               criterion=st.sampled_from(["l1", "l2", "maw", "activation"]), nm=st.booleans())
        def parity(net, ratio, seed, criterion, nm):
            tp.check_pipeline_parity(net, ratio, seed, criterion, nm, Path(tmp))

        import hypothesis

        if args.exact:
            hypothesis.seed(args.seed)(exact)()
            print(f"exactness: {args.exact} cases passed ({time.perf_counter() - start:.0f}s)")
        if args.parity:
            mid = time.perf_counter()
            hypothesis.seed(args.seed)(parity)()
            print(f"ONNX Runtime parity: {args.parity} cases passed ({time.perf_counter() - mid:.0f}s)")
        if args.onnx:
            import test_onnx_fuzz as of
            import torch

            from secateurs.backends.onnx import export_onnx

            import models

            mid = time.perf_counter()
            export_onnx(models.Grouped().eval(), (torch.randn(2, 3, 8, 8),), Path(tmp) / "m.onnx")
            data = (Path(tmp) / "m.onnx").read_bytes()
            outcomes: dict[str, int] = {}
            for i in range(args.onnx):
                outcome = of.fuzz_one(data, args.seed * 1_000_000 + i, Path(tmp))
                outcomes[outcome] = outcomes.get(outcome, 0) + 1
            allowed = {"ok", "CheckpointError", "CaptureError", "VerificationError", "BudgetError",
                       "UnsupportedOpError"}
            assert set(outcomes) <= allowed, outcomes
            print(f"mutated ONNX files: {args.onnx} cases, outcomes {outcomes} ({time.perf_counter() - mid:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
