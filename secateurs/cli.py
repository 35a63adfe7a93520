"""Command-line entry point (``secateurs``).

Exit codes: 0 ok, 2 bad input (missing or malformed source, bad option or recipe, existing output, missing
backend), 3 verification failed (a rewritten or exported model does not match), 130 interrupted (nothing is
left half-written). Every subcommand takes ``--quiet`` (print nothing on success), ``--json`` (print one JSON
document on standard output, errors included) and ``-v`` (log what each pass does). Progress bars go to
standard error when it is a terminal.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from secateurs.cli_parser import _parser

__all__ = ["main"]

EXIT_OK, EXIT_BAD_INPUT, EXIT_VERIFICATION, EXIT_INTERRUPTED = 0, 2, 3, 130
LOADS_WITH = {"from_pretrained": "loads with: plain from_pretrained (every layer the same size: transformers, vLLM, "
                                 "SGLang, TensorRT-LLM; docs/deploying.md)",
              "load_pretrained": "loads with: secateurs.load_pretrained (per-layer sizes recorded in secateurs.json; "
                                 "serving engines cannot read it: docs/deploying.md)",
              "decilm": "loads with: DeciLM / Nemotron-NAS loaders (block_configs: vLLM, SGLang, TensorRT-LLM) and "
                        "secateurs.load_pretrained (docs/deploying.md)"}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``secateurs`` command and return its exit code (see the module docstring)."""
    try:
        return _main(list(sys.argv[1:] if argv is None else argv))
    except KeyboardInterrupt:  # Ctrl-C while starting up (imports, argument parsing): nothing was written yet
        print("secateurs: interrupted; nothing was written", file=sys.stderr)
        return EXIT_INTERRUPTED


def _parse(argv: list[str]) -> argparse.Namespace:
    """The parsed command line; an unknown flag is refused with the closest flag of its command."""
    import difflib

    parser = _parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        sub = parser._subparsers._group_actions[0].choices[args.command]  # type: ignore[union-attr,index]
        flags = [f for f in sub._option_string_actions if f.startswith("--")]
        close = next((difflib.get_close_matches(u.split("=")[0], flags, n=1) for u in unknown if u.startswith("-")),
                     [])
        sub.error(f"unrecognized arguments: {' '.join(unknown)}" + (f" (did you mean {close[0]}?)" if close else ""))
    return args


def _main(argv: list[str]) -> int:
    try:
        args = _parse(argv)
    except SystemExit as exc:  # argparse printed the usage and the error on standard error
        if exc.code == EXIT_BAD_INPUT and "--json" in argv:
            print(json.dumps({"error": "invalid command line (see standard error)", "exit_code": EXIT_BAD_INPUT}))
        raise
    level = logging.INFO if args.verbose else logging.ERROR if args.quiet or args.json else logging.WARNING
    logging.basicConfig(level=level, format="%(name)s: %(message)s", force=True)
    if level == logging.WARNING:  # recovery training's periodic evaluation lines are part of normal output
        logging.getLogger("secateurs.passes.distill").setLevel(logging.INFO)
    from secateurs.errors import BackendUnavailableError, SecateursError, VerificationError
    from secateurs.progress import reporting, tqdm_renderer

    commands: dict[str, Callable[[argparse.Namespace], Any]] = {
        "demo": _demo, "prune": _prune, "export": _export, "engine": _engine, "inspect": _inspect, "bench": _bench}
    from secateurs.distributed import init, is_writer

    init()  # joins torchrun's process group when launched by torchrun; a no-op otherwise
    if not is_writer():  # under torchrun only the writing rank prints
        args.quiet = True
    quiet = args.quiet or args.json or not is_writer()
    try:
        with reporting(None if quiet else tqdm_renderer(disable=None)):
            result = commands[args.command](args)
    except KeyboardInterrupt:
        return _fail(args, "interrupted; nothing was left half-written", EXIT_INTERRUPTED)
    except VerificationError as exc:
        return _fail(args, f"verification failed: {exc}", EXIT_VERIFICATION)
    except (SecateursError, BackendUnavailableError) as exc:
        return _fail(args, f"error: {exc}", EXIT_BAD_INPUT)
    if args.json and is_writer():
        print(json.dumps(result, indent=1, default=str))
    return EXIT_OK


def _fail(args: argparse.Namespace, message: str, code: int) -> int:
    print(f"secateurs: {message}", file=sys.stderr)
    if getattr(args, "json", False):
        print(json.dumps({"error": message, "exit_code": code}))
    return code


def _say(args: argparse.Namespace, text: str) -> None:
    if not (args.quiet or args.json):
        print(text)


def _demo(args: argparse.Namespace) -> dict[str, Any]:
    from secateurs.demo import run_demo

    result = run_demo(args.out, heads=args.heads, ffn=args.ffn, nm=None if args.nm == "none" else args.nm,
                      importance=args.importance, bias_compensation=not args.no_bias_compensation,
                      samples=args.samples, onnx=not args.no_onnx)
    _say(args, result.summary)
    return result.data


def _flag_options(args: argparse.Namespace) -> tuple[dict[str, Any], list[Any]]:
    """The ``prune`` step options and any extra steps the flags ask for."""
    from secateurs.errors import BudgetError
    from secateurs.spec import PruneSpec, from_flags

    options = from_flags(args)
    extra: list[Any] = []
    if args.low_rank is not None:
        extra = ["AnalyzeDependencies", {"FactorizeLowRank": {"energy": args.low_rank}}]
    if args.recover is not None:
        extra.append({"Recover": {"steps": args.recover, "mode": args.recover_mode or "full",
                                  "eval_every": max(1, args.recover // 5)}})
    elif args.recover_mode is not None:
        raise BudgetError("--recover-mode needs --recover STEPS")
    spec = PruneSpec(**options)
    structure = _structure_flags()
    if not structure & set(options) and not extra:
        raise BudgetError("nothing to prune: give --recipe or at least one of --channels --heads --kv-groups --ffn "
                          "--hidden --experts --layers --sublayers --sparsity --nm --low-rank")
    if not structure & set(options) and options:  # e.g. --criterion with only --low-rank: no pass would read it
        spec.check(steps=())
    return spec.given(), extra


def _structure_flags() -> set[str]:
    """The options that ask for a pruning step and have a flag (the schema's ``structure`` options)."""
    from secateurs.spec import OPTIONS

    return {name for name, opt in OPTIONS.items() if opt.step == "structure" and opt.flag}
# Flags of the prune command that are not pruning options (secateurs.spec), with the paths that take them.
_DRIVER_FLAGS = {"recipe": ("memory",), "low_rank": ("memory",), "recover": ("memory",), "recover_mode": ("memory",),
                 "min_cosine": ("memory",), "max_rel_error": ("memory",), "calib": ("memory", "stream"),
                 "calib_samples": ("memory", "stream"), "seq_len": ("memory", "stream"), "seed": ("memory",),
                 "expert_layout": ("memory", "stream"), "format": ("memory",)}


def _refuse_flags(args: argparse.Namespace, path: str, what: str) -> dict[str, Any]:
    """The pruning options of the flags, checked for ``path``.

    A flag the path does not take is refused with the list of those it does take.
    """
    from secateurs.errors import BudgetError
    from secateurs.spec import OPTIONS, PruneSpec, from_flags, path_options

    options = from_flags(args)
    unsupported = [f"--{f.replace('_', '-')}" for f, paths in _DRIVER_FLAGS.items()
                   if path not in paths and getattr(args, f) is not None]
    unsupported += [OPTIONS[o].flag or o for o in options if path not in OPTIONS[o].paths]
    unsupported += ["--no-verify"] if args.no_verify and path == "onnx" else []
    unsupported += [f"--device {args.device}"] if args.device != "cpu" else []
    if unsupported:
        takes = [flag for o in path_options(path) if (flag := OPTIONS[o].flag)]
        takes += [f"--{f.replace('_', '-')}" for f, paths in _DRIVER_FLAGS.items() if path in paths]
        raise BudgetError(f"{what} supports {' '.join(takes)} only, not {' '.join(unsupported)}")
    return PruneSpec.parse(options, path=path, where=what).given()


def _prune(args: argparse.Namespace) -> dict[str, Any]:
    from secateurs.errors import BudgetError
    from secateurs.recipe import load_recipe, parse_recipe

    if Path(args.src).suffix == ".onnx":
        return _prune_onnx(args)
    if args.input_shape:
        raise BudgetError("--input-shape applies to ONNX sources; a checkpoint's example inputs come from its config "
                          "(--seq-len)")
    if args.stream:
        return _prune_stream(args)
    if args.recipe:
        from secateurs.spec import OPTIONS, from_flags

        used = [OPTIONS[o].flag or o for o in from_flags(args)]
        used += [f"--{f.replace('_', '-')}" for f in ("low_rank", "recover", "recover_mode") if getattr(args, f) is not None]
        if used:
            raise BudgetError(f"--recipe replaces the pruning flags; remove {' '.join(used)} or put them in the recipe")
        recipe = load_recipe(args.recipe)
    else:
        options, extra = _flag_options(args)
        recipe = parse_recipe({"seed": args.seed or 0, "calib": {},
                               "passes": ([{"prune": options}] if options else []) + extra}, "flags")
    from secateurs.convert import prune_checkpoint
    from secateurs.errors import MemoryShortfall

    try:
        report, data = prune_checkpoint(args.src, args.out, recipe, calib=args.calib, samples=args.calib_samples,
                                        seq_len=args.seq_len, seed=args.seed, overwrite=args.overwrite,
                                        dry_run=args.dry_run, device=args.device, verify=not args.no_verify,
                                        min_cosine=args.min_cosine, max_rel_error=args.max_rel_error,
                                        expert_layout=args.expert_layout or "source", format=args.format or "hf")
    except MemoryShortfall as exc:  # refused before any weight was read
        if not args.dry_run or args.recipe:
            raise
        # a checkpoint larger than memory is planned the way it can be pruned: streamed
        _say(args, f"{exc.reason}: planned one block at a time, as --stream --dry-run plans it")
        try:
            return {**_prune_stream(args), "streamed_because": exc.reason}
        except BudgetError as stream_exc:
            raise BudgetError(f"{exc.reason}, and --stream cannot plan this run: {stream_exc}") from stream_exc
    _say(args, str(report))
    _say(args, LOADS_WITH[data["loads_with"]] + (" (--format decilm would write it in a format serving engines load)"
                                                  if data["loads_with"] == "load_pretrained"
                                                  and data["decilm_loadable"] else ""))
    _say(args, "dry run: nothing written" if args.dry_run else
         f"wrote {args.out} (report: {Path(args.out) / 'report.html'})")
    return data


def _prune_stream(args: argparse.Namespace) -> dict[str, Any]:
    import dataclasses

    from secateurs.distributed import is_writer
    from secateurs.errors import BudgetError
    from secateurs.stream import StreamOptions

    given = _refuse_flags(args, "stream", "--stream")
    if args.out is None and not args.dry_run:
        raise BudgetError("--stream needs --out (or --dry-run)")
    from secateurs.convert import _tokenizer
    from secateurs.stream import resolve_defaults

    tokenizer = _tokenizer(Path(args.src)) if args.calib != "none" else None
    options = StreamOptions(**given, expert_layout=args.expert_layout or "source")
    # the in-memory defaults: flap with calibration text, weights only without a tokenizer or with --calib none
    options = resolve_defaults(options, calibrated=tokenizer is not None)
    if not (options.width or options.hidden or options.experts or options.layers or options.sparse):
        raise BudgetError("nothing to prune: give at least one of --heads --kv-groups --ffn --hidden --experts "
                          "--layers --sparsity --nm")
    if options.experts or options.expert_neurons:  # the option that selects nothing is the error to report first
        from secateurs.modeling.structure import find_moe_blocks
        from secateurs.streaming.blocks import _meta_model

        skeleton = _meta_model(Path(args.src))[0]
        if not find_moe_blocks(skeleton):
            raise BudgetError(f"--experts selects nothing: {type(skeleton).__name__} has no mixture-of-experts "
                              "block")
    batches = None
    if options.calibrated:
        from secateurs.data import text_batches

        if tokenizer is None or args.calib == "none":
            raise BudgetError("depth, experts, the cfsp allocator, activation / flap importance and wanda / sparsegpt "
                              "need calibration text and the checkpoint's tokenizer files (--calib pydoc or a file)")
        batches = text_batches(tokenizer, args.calib or "pydoc", samples=args.calib_samples or 16,
                               seq_len=args.seq_len or 64, batch_size=min(8, args.calib_samples or 16))
    from secateurs.stream import prune_checkpoint as stream_prune

    report = stream_prune(args.src, args.out, options, calib=batches, overwrite=args.overwrite, dry_run=args.dry_run)
    if is_writer():
        _say(args, report.summary())
    data = dataclasses.asdict(report)
    data["path"] = None if report.path is None else str(report.path)
    return data


def _prune_onnx(args: argparse.Namespace) -> dict[str, Any]:
    from secateurs.errors import BudgetError, CheckpointError

    try:
        from secateurs.onnx_prune import prune_onnx
    except ImportError as exc:
        raise BudgetError(f"pruning ONNX files needs the 'onnx' extra (pip install 'secateurs[onnx]'): {exc}") from exc
    given = _refuse_flags(args, "onnx", "an ONNX source")
    if not any(getattr(args, f) is not None for f in ("channels", "heads", "kv_groups", "ffn", "hidden")):
        raise BudgetError("nothing to prune: give at least one of --channels --heads --kv-groups --ffn --hidden")
    if args.out is None and not args.dry_run:
        raise BudgetError("an output .onnx file is required (or --dry-run)")
    if args.out is not None:
        from secateurs.backends.files import guard_source

        guard_source(args.src, args.out, "--out")
    if args.out is not None and Path(args.out).exists() and not args.overwrite and not args.dry_run:
        raise CheckpointError(f"output file '{args.out}' exists; pass --overwrite to replace it")
    result = prune_onnx(args.src, None if args.dry_run else args.out, input_shapes=_shapes(args), **given)
    _say(args, str(result))
    return result.to_dict()


def _shapes(args: argparse.Namespace) -> dict[str, tuple[int, ...]] | None:
    from secateurs.errors import BudgetError

    shapes: dict[str, tuple[int, ...]] = {}
    for name, shape in args.input_shape or []:
        if name in shapes:
            raise BudgetError(f"--input-shape gives '{name}' twice")
        shapes[name] = shape
    return shapes or None


def _export(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from secateurs.backends.checkpoint import load_pretrained
    from secateurs.backends.files import guard_source
    from secateurs.backends.onnx import export_onnx
    from secateurs.convert import example_and_calib
    from secateurs.errors import CheckpointError
    from secateurs.progress import stage

    src, out = Path(args.src), Path(args.onnx)
    if not src.is_dir():
        raise CheckpointError(f"source '{src}' is not a checkpoint folder")
    guard_source(src, out, "--onnx")
    if out.exists() and not args.overwrite:
        raise CheckpointError(f"'{out}' exists; pass --overwrite to replace it")
    model = load_pretrained(src).eval()
    example, _ = example_and_calib(model, src, "none", 2, args.seq_len, 0)
    dtype = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    with stage("exporting ONNX"):
        half = args.dtype != "fp32"
        result = export_onnx(model, example, out, exporter=args.exporter, verify=args.verify,
                             atol=args.atol if args.atol is not None else 2e-2 if half else 1e-4,
                             rtol=args.rtol if args.rtol is not None else 2e-2 if half else 1e-3, dtype=dtype)
    data = {"onnx": str(result.path), "exporter": result.exporter, "verified": args.verify,
            "max_abs_error": result.max_abs_error, "max_rel_error": result.max_rel_error}
    _say(args, f"wrote {result.path}" + (f" (ONNX Runtime vs PyTorch: max abs error {result.max_abs_error:.2e}, "
                                         f"max rel error {result.max_rel_error:.2e})" if args.verify else ""))
    return data


def _engine(args: argparse.Namespace) -> dict[str, Any]:
    from secateurs.backends.files import guard_source
    from secateurs.backends.tensorrt import build_engine
    from secateurs.errors import CheckpointError
    from secateurs.progress import stage

    out = args.out or str(Path(args.onnx).with_suffix(".engine"))
    guard_source(args.onnx, out, "--out")
    if Path(out).exists() and not args.overwrite:
        raise CheckpointError(f"'{out}' exists; pass --overwrite to replace it")
    with stage("building TensorRT engine"):
        build = build_engine(args.onnx, out, fp16=args.fp16, sparse=args.sparse, timing_cache=args.timing_cache,
                             batch=(1, 1, args.max_batch))
    data = {"engine": str(build.path), "seconds": build.build_seconds, "precision": build.precision,
            "sparse_eligible": list(build.sparse_eligible), "sparse_layers": list(build.sparse_layers)}
    _say(args, f"wrote {build.path} in {build.build_seconds:.1f}s ({build.precision}); "
               f"{len(build.sparse_layers)} of {len(build.sparse_eligible)} 2:4-eligible layers run sparse kernels")
    return data


def _inspect(args: argparse.Namespace) -> dict[str, Any]:
    if Path(args.src).suffix == ".onnx":
        from secateurs.onnx_prune import inspect_onnx

        data = inspect_onnx(args.src, input_shapes=_shapes(args))
    else:
        from secateurs.convert import inspect_checkpoint
        from secateurs.errors import BudgetError

        if args.input_shape:
            raise BudgetError("--input-shape applies to ONNX sources")
        data = inspect_checkpoint(args.src)
    if not (args.quiet or args.json):
        print(f"params {data['params']:,}, FLOPs {data['flops']:,.0f} on the example inputs")
        print(f"{len(data['groups'])} prunable groups:")
        for g in data["groups"]:
            print(f"  {g['kind']:<10} {g['size']:>6}  {g['name']}")
        print(f"{len(data['frozen'])} frozen groups:")
        for f in data["frozen"]:
            print(f"  x{f['size']:<6} {', '.join(f['members'][:2])}: {f['reason']}")
        for layer in data.get("layers", []):
            print(f"  layer {layer['name']:<28} params {layer['params']:>12,}  FLOPs {layer['flops']:>14,.0f}")
    return data


def _bench(args: argparse.Namespace) -> dict[str, Any]:
    from secateurs.bench import compare_latency

    result = compare_latency(args.src, args.dst, runtime=args.runtime, batch=args.batch, seq_len=args.seq_len,
                             runs=args.runs, warmup=args.warmup, threads=args.threads)
    report = Path(args.dst) / "report.json"
    if report.is_file():  # a folder written by `secateurs prune`: its report gains the measured latency
        from secateurs.report import write_report

        data = json.loads(report.read_text())
        data.update(latency_before=result["dense_s"], latency_after=result["pruned_s"],
                    latency_runtime=f"{args.runtime}, batch {args.batch}")
        write_report(args.dst, data)
        result["report"] = str(Path(args.dst) / "report.html")
    _say(args, f"{args.runtime}, batch {args.batch}: dense {1e3 * result['dense_s']:.2f} ms, pruned "
               f"{1e3 * result['pruned_s']:.2f} ms, speed-up {result['speedup']:.2f}x")
    return result


if __name__ == "__main__":
    sys.exit(main())
