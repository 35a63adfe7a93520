"""Command-line entry point (``secateurs``)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``secateurs`` command; returns the exit code (0 ok, 2 bad input, 3 verification failed)."""
    parser = argparse.ArgumentParser(prog="secateurs", description="Prune neural networks.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what each pass does")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="prune the bundled all-MiniLM-L6-v2 and measure embedding drift")
    demo.add_argument("--heads", type=float, default=0.25, help="fraction of attention heads to remove")
    demo.add_argument("--ffn", type=float, default=0.3, help="fraction of FFN neurons to remove")
    demo.add_argument("--importance", default="flap", help="l1, l2, maw, taylor, activation or flap")
    demo.add_argument("--no-bias-compensation", action="store_true", help="do not fold removed means into biases")
    demo.add_argument("--samples", type=int, default=32, help="calibration paragraphs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    from secateurs.errors import BudgetError, CaptureError, SecateursError, VerificationError

    try:
        if args.command == "demo":
            from secateurs.demo import run_demo

            print(run_demo(heads=args.heads, ffn=args.ffn, importance=args.importance,
                           bias_compensation=not args.no_bias_compensation, samples=args.samples))
    except (BudgetError, CaptureError) as exc:
        print(f"secateurs: error: {exc}", file=sys.stderr)
        return 2
    except VerificationError as exc:
        print(f"secateurs: verification failed: {exc}", file=sys.stderr)
        return 3
    except SecateursError as exc:
        print(f"secateurs: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
