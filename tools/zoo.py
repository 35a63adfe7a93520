"""Run the coverage zoo (``tests/families.py``) and print the table of docs/coverage.md (the README has a digest).

    python tools/zoo.py                 # every family whose package is installed
    python tools/zoo.py vit swin -v     # some, with the frozen reasons
    python tools/zoo.py --torch-pruning # with a column for Torch-Pruning ([bench] extra) under the same oracles

Each family: bit-identical at ratio 0; at ``ratio=0.3`` at least 5% of the parameters removed with the output
shape kept; the pruned model exported to ONNX and run in ONNX Runtime (``export_onnx`` refuses a mismatch);
transformers models saved with ``save_pretrained`` and reloaded (``plain``: transformers' own ``from_pretrained``
loads it; ``secateurs``: ``secateurs.load_pretrained`` does, per-layer sizes the config cannot state).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from families import FAMILIES, check  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="families to run (default: all)")
    parser.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime parity check")
    parser.add_argument("-v", action="store_true", help="print every frozen reason")
    parser.add_argument("--torch-pruning", action="store_true",
                        help="add a column: Torch-Pruning under the same oracles (tools/torch_pruning_zoo.py)")
    args = parser.parse_args()
    peer = None
    if args.torch_pruning:
        from torch_pruning_zoo import run_peer

        peer = run_peer
    warnings.filterwarnings("ignore")
    names = args.names or list(FAMILIES)
    failed = 0
    extra = " Torch-Pruning |" if peer else ""
    print(f"| family | source | kind | removed at 0.3 | groups pruned | frozen (groups) | ONNX Runtime | reload |{extra} s |")
    print("|---|---|---|---|---|---|---|---|---|" + ("---|" if peer else ""))
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            fam = FAMILIES[name]
            if fam.source in ("torchvision", "timm") and importlib.util.find_spec(fam.source) is None:
                print(f"| {name} | {fam.source} | {fam.kind} | not run: {fam.source} is not installed | | | | |"
                      f"{' |' if peer else ''} |")
                continue
            try:
                out = check(name, None if args.no_onnx else tmp)
            except Exception as exc:  # noqa: BLE001 - a table row per failure
                failed += 1
                print(f"| {name} | {fam.source} | {fam.kind} | **fails**: {type(exc).__name__}: "
                      f"{str(exc).splitlines()[0][:160]} | | | | |{' |' if peer else ''} |")
                if args.v:
                    traceback.print_exc()
                continue
            failed += bool(out.problems)
            frozen = ", ".join(f"{k} ({n})" for k, n in sorted(out.frozen.items()))
            onnx = fam.onnx or ("not run" if out.onnx_error is None else f"equal ({out.onnx_error:.0e})")
            verdict = f"{100 * out.removed:.1f}%" + (f" **{'; '.join(out.problems)}**" if out.problems else "")
            theirs = f" {peer(name).verdict} |" if peer else ""
            print(f"| {name} | {fam.source} | {fam.kind} | {verdict} | {', '.join(out.pruned) or '-'} | {frozen} | "
                  f"{onnx} | {out.reload or '-'} |{theirs} {out.seconds:.0f} |", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
