"""Command-line entry point (``secateurs``)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``secateurs`` command; returns the exit code (0 ok, 2 bad input, 3 verification failed).

    Subcommands: ``demo`` (the main job on the bundled MiniLM), ``prune SRC --out DST`` (checkpoint to
    checkpoint, with ``report.json``), ``inspect SRC`` (dependency groups and frozen parts).
    """
    parser = argparse.ArgumentParser(prog="secateurs", description="Prune neural networks.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what each pass does")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="prune the bundled all-MiniLM-L6-v2 and measure embedding drift")
    demo.add_argument("--heads", type=float, default=0.25, help="fraction of attention heads to remove")
    demo.add_argument("--ffn", type=float, default=0.3, help="fraction of FFN neurons to remove")
    demo.add_argument("--importance", default="flap", help="l1, l2, maw, taylor, activation or flap")
    demo.add_argument("--no-bias-compensation", action="store_true", help="do not fold removed means into biases")
    demo.add_argument("--samples", type=int, default=32, help="calibration paragraphs")
    pr = sub.add_parser("prune", help="prune a Hugging Face checkpoint folder into a new one")
    pr.add_argument("src", help="checkpoint folder (config.json + safetensors)")
    pr.add_argument("--out", help="output folder (written atomically; refused if it exists)")
    pr.add_argument("--channels", type=float, help="fraction of conv channels to remove")
    pr.add_argument("--heads", type=float, help="fraction of attention heads to remove")
    pr.add_argument("--kv-groups", type=float, help="fraction of GQA KV groups to remove")
    pr.add_argument("--ffn", type=float, help="fraction of MLP / GLU neurons to remove")
    pr.add_argument("--hidden", type=float, help="fraction of the hidden size to remove")
    pr.add_argument("--experts", type=float, help="fraction of MoE experts to remove")
    pr.add_argument("--layers", type=float, help="blocks to remove: a count >= 1 or a fraction")
    pr.add_argument("--sublayers", type=float, help="attention / MLP sublayers to remove: a count or a fraction")
    pr.add_argument("--depth-criterion", default="bi", help="bi, angular or greedy")
    pr.add_argument("--sparsity", type=float, help="unstructured weight sparsity")
    pr.add_argument("--nm", help="N:M weight sparsity, e.g. 2:4")
    pr.add_argument("--criterion", default="l2", help="width importance: l1, l2, maw, taylor, activation, flap")
    pr.add_argument("--sparsity-criterion", default="magnitude", help="magnitude, wanda, sparsegpt, ...")
    pr.add_argument("--allocate", help="width budget allocator: global, lamp, owl, dp, ecoflap, cfsp")
    pr.add_argument("--calib", default="pydoc", help="calibration text: pydoc, a .txt / .jsonl file, or none")
    pr.add_argument("--calib-samples", type=int, default=16, help="calibration texts")
    pr.add_argument("--seq-len", type=int, default=64, help="tokens per calibration text")
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--dry-run", action="store_true", help="plan and report, write nothing")
    pr.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    pr.add_argument("--json", action="store_true", help="print the report as JSON")
    pr.add_argument("--quiet", action="store_true", help="print nothing on success")
    ins = sub.add_parser("inspect", help="show the dependency groups of a checkpoint and what is frozen")
    ins.add_argument("src")
    ins.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    from secateurs.errors import BudgetError, CaptureError, SecateursError, VerificationError

    try:
        if args.command == "demo":
            from secateurs.demo import run_demo

            print(run_demo(heads=args.heads, ffn=args.ffn, importance=args.importance,
                           bias_compensation=not args.no_bias_compensation, samples=args.samples))
        elif args.command == "prune":
            _prune(args)
        elif args.command == "inspect":
            _inspect(args)
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


def _prune(args: argparse.Namespace) -> None:
    import json

    from secateurs.convert import prune_checkpoint

    structural = {"channels": args.channels, "heads": args.heads, "kv_groups": args.kv_groups, "ffn": args.ffn,
                  "experts": args.experts, "layers": args.layers, "sublayers": args.sublayers,
                  "sparsity": args.sparsity, "nm": args.nm}
    options = {k: v for k, v in structural.items() if v is not None}
    if args.hidden is not None:
        options["hidden"] = args.hidden
    if not options:
        from secateurs.errors import BudgetError

        raise BudgetError("nothing to prune: give at least one of --channels --heads --kv-groups --ffn --hidden "
                          "--experts --layers --sublayers --sparsity --nm")
    if args.layers is not None and args.layers >= 1:
        options["layers"] = int(args.layers)
    if args.sublayers is not None and args.sublayers >= 1:
        options["sublayers"] = int(args.sublayers)
    options.update(importance=args.criterion, sparsity_criterion=args.sparsity_criterion,
                   depth_criterion=args.depth_criterion)
    if args.allocate:
        options["allocate"] = args.allocate
    report, data = prune_checkpoint(args.src, args.out, calib=args.calib, samples=args.calib_samples,
                                    seq_len=args.seq_len, seed=args.seed, overwrite=args.overwrite,
                                    dry_run=args.dry_run, **options)
    if args.json:
        print(json.dumps(data, indent=1, default=str))
    elif not args.quiet:
        print(report)
        print("dry run: nothing written" if args.dry_run else f"wrote {args.out} (report.json inside)")


def _inspect(args: argparse.Namespace) -> None:
    import json

    from secateurs.convert import inspect_checkpoint

    data = inspect_checkpoint(args.src)
    if args.json:
        print(json.dumps(data, indent=1))
        return
    print(f"params {data['params']:,}, FLOPs {data['flops']:,.0f} on the example inputs")
    print(f"{len(data['groups'])} prunable groups:")
    for g in data["groups"]:
        print(f"  {g['kind']:<10} {g['size']:>6}  {g['name']}")
    print(f"{len(data['frozen'])} frozen groups:")
    for f in data["frozen"]:
        print(f"  x{f['size']:<6} {', '.join(f['members'][:2])}: {f['reason']}")


if __name__ == "__main__":
    sys.exit(main())
