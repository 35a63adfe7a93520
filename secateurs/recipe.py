"""Recipes: a YAML list of passes and their options, validated before anything runs.

A recipe names the same pass classes as the Python API, in order, with their constructor options::

    calib: {source: pydoc, samples: 16, seq_len: 64}
    seed: 0
    passes:
      - RemoveBlocks: {amount: 1, criterion: bi}
      - AnalyzeDependencies
      - ScoreChannels: {criterion: flap}
      - PruneChannels: {heads: 0.25, ffn: 0.3, bias_compensation: true}
      - AnalyzeDependencies
      - SparsifyWeights: {nm: "2:4", criterion: wanda}

A ``prune`` step takes the options of :func:`secateurs.prune` and expands into its passes; the command-line
flags are a one-step recipe of that kind. Calibration batches, loss functions, latency tables and the dense
reference model are supplied when the recipe is built, never written in the file. Every mistake (unknown pass
or option, a value the pass refuses, a pass whose required analysis no earlier step provides) is a
:class:`~secateurs.errors.RecipeError` naming the step.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import inspect
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from secateurs.errors import BudgetError, RecipeError, RecoveryError
from secateurs.passes import (
    AllocateBudget,
    AnalyzeDependencies,
    ChannelOptions,
    FactorizeARMOR,
    FactorizeLowRank,
    Pass,
    PruneChannels,
    PruneExpertNeurons,
    PruneExperts,
    ReconstructLayers,
    Recover,
    RecoverOptions,
    RemoveBlocks,
    RemoveSublayers,
    ScoreChannels,
    ScoreExperts,
    SparsifyWeights,
)

__all__ = ["PASSES", "Recipe", "Step", "build_passes", "load_recipe", "parse_recipe"]

PASSES: dict[str, type[Pass]] = {cls.__name__: cls for cls in (
    AnalyzeDependencies, ScoreChannels, AllocateBudget, PruneChannels, RemoveBlocks, RemoveSublayers, ScoreExperts,
    PruneExperts, PruneExpertNeurons, SparsifyWeights, FactorizeLowRank, FactorizeARMOR, ReconstructLayers,
    Recover)}
"""Pass classes a recipe may name."""

_INJECTED = {"self", "calib", "loss_fn", "latency", "dense", "options", "kwargs"}
_KIND_SUGAR = ("heads", "kv_groups", "ffn", "channels")
_TOP_KEYS = {"passes", "calib", "seed"}
# A recipe never chooses where files are written: options naming a path are refused (the CLI sets them).
_PATH_OPTIONS = {"latency_cache", "checkpoint_dir", "cache_dir", "cache_path"}
_CALIB_KEYS = {"source", "samples", "seq_len"}


@dataclasses.dataclass(frozen=True)
class Step:
    """One recipe step: a pass name (or ``prune``) and its options as written."""

    name: str
    options: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A validated recipe.

    Attributes:
        steps: The passes in order.
        calib: Calibration text settings (``source``: ``pydoc``, a file or ``none``; ``samples``; ``seq_len``).
        seed: Random seed for example inputs and sampling.
        source: Where the recipe came from (a file name, or ``flags``).

    """

    steps: tuple[Step, ...]
    calib: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    seed: int = 0
    source: str = "recipe"

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain data (what ``report.json`` records and ``parse_recipe`` reads back)."""
        return {"seed": self.seed, "calib": dict(self.calib),
                "passes": [{s.name: dict(s.options)} for s in self.steps]}


def _options_of(name: str) -> list[str]:
    if name == "prune":
        from secateurs.spec import path_options

        return [p for p in path_options("memory") if p not in _INJECTED]
    cls = PASSES[name]
    opts = [p for p in inspect.signature(cls.__init__).parameters if p not in _INJECTED]
    if cls is PruneChannels:
        opts = [f.name for f in dataclasses.fields(ChannelOptions)] + list(_KIND_SUGAR)
    if cls is Recover:
        opts = [f.name for f in dataclasses.fields(RecoverOptions)]
    return opts


def _owner_hint(option: str) -> str:
    owners = [n for n in ["prune", *PASSES] if option in _options_of(n)]
    return f"; it is an option of {', '.join(owners)}" if owners else ""


def _parse_step(index: int, raw: Any, where: str) -> Step:
    options: Any
    if isinstance(raw, str):
        name, options = raw, {}
    elif isinstance(raw, Mapping) and len(raw) == 1:
        name, options = next(iter(raw.items()))
        options = {} if options is None else options
    else:
        raise RecipeError(f"{where}: step {index} must be a pass name or a one-key mapping "
                          f"'PassName: {{option: value}}', got {raw!r}")
    if not isinstance(name, str) or (name not in PASSES and name != "prune"):
        close = difflib.get_close_matches(str(name), ["prune", *PASSES], n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; known passes: prune, {', '.join(PASSES)}"
        raise RecipeError(f"{where}: step {index}: unknown pass {name!r}{hint}")
    if not isinstance(options, Mapping):
        raise RecipeError(f"{where}: step {index} ({name}): options must be a mapping, got {options!r}")
    allowed = _options_of(name)
    for key in options:
        if key in _PATH_OPTIONS:
            raise RecipeError(f"{where}: step {index} ({name}): {key!r} names a file path; recipes cannot choose "
                              "where files are written (the command line sets it)")
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else _owner_hint(str(key))
            raise RecipeError(f"{where}: step {index} ({name}): {key!r} is not an option of {name}{hint} "
                              f"(options: {', '.join(allowed)})")
    return Step(name, dict(options))


def parse_recipe(data: Any, source: str = "recipe") -> Recipe:
    """Validate recipe ``data`` (already parsed YAML / JSON) and return it.

    Every pass is constructed once (without calibration data) so each option value is checked by the pass
    itself, and the requires / provides contract of the pass list is checked statically.

    Raises:
        RecipeError: The recipe is malformed; the message names the step and the option.

    """
    if not isinstance(data, Mapping):
        raise RecipeError(f"{source}: a recipe is a mapping with a 'passes' list, got {type(data).__name__}")
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise RecipeError(f"{source}: unknown top-level key(s) {sorted(unknown)}; allowed: {sorted(_TOP_KEYS)}")
    raw_steps = data.get("passes")
    if not isinstance(raw_steps, list) or not raw_steps:
        raise RecipeError(f"{source}: 'passes' must be a non-empty list of steps")
    calib = data.get("calib") or {}
    if not isinstance(calib, Mapping) or set(calib) - _CALIB_KEYS:
        raise RecipeError(f"{source}: 'calib' must be a mapping with keys among {sorted(_CALIB_KEYS)}, got {calib!r}")
    for key in ("samples", "seq_len"):
        if key in calib and (not isinstance(calib[key], int) or calib[key] < 1):
            raise RecipeError(f"{source}: calib.{key} must be a positive integer, got {calib[key]!r}")
    seed = data.get("seed", 0)
    if not isinstance(seed, int):
        raise RecipeError(f"{source}: seed must be an integer, got {seed!r}")
    recipe = Recipe(tuple(_parse_step(i + 1, raw, source) for i, raw in enumerate(raw_steps)), calib, seed, source)
    build_passes(recipe, None)  # every value checked by the pass that owns it
    return recipe


def load_recipe(path: str | os.PathLike[str]) -> Recipe:
    """Read and validate a YAML recipe file (``yaml.safe_load``: no Python objects are constructed).

    Raises:
        RecipeError: The file is missing, not YAML, or not a valid recipe.

    """
    import yaml

    file = Path(path)
    try:
        if file.stat().st_size > 1 << 20:
            raise RecipeError(f"recipe '{file}' is over 1 MiB; a recipe is a short YAML file")
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise RecipeError(f"cannot read recipe '{file}': {exc}") from exc
    except UnicodeDecodeError as exc:
        raise RecipeError(f"recipe '{file}' is not UTF-8 text (a binary file?): {exc}") from exc
    if "\x00" in text:
        raise RecipeError(f"recipe '{file}' contains NUL bytes (a binary file?)")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RecipeError(f"recipe '{file}' is not valid YAML: {exc}") from exc
    except RecursionError as exc:
        raise RecipeError(f"recipe '{file}' is nested too deeply to be a recipe") from exc
    depth, size = _extent(data, {}, set())
    if depth > 32:
        raise RecipeError(f"recipe '{file}' is nested more than 32 levels deep; a recipe is a list of steps")
    if size > 100_000:  # YAML aliases can describe a huge tree in a few lines ("billion laughs")
        raise RecipeError(f"recipe '{file}' expands to {size:,} values (through YAML aliases); a recipe is a "
                          "short list of steps")
    return parse_recipe(data, str(file))


def _extent(value: Any, memo: dict[int, tuple[int, int]], active: set[int], level: int = 0) -> tuple[int, int]:
    """(nesting depth, number of values once aliases are expanded) of parsed YAML, each node visited once.

    A node that contains itself (``&a [*a]``) counts as infinitely deep; the walk stops past 33 levels.
    """
    if not isinstance(value, (dict, list)):
        return 0, 1
    key = id(value)
    if key in memo:
        return memo[key]
    if key in active or level > 32:
        return 33, 1
    active.add(key)
    depth, size = 0, 1
    for item in (value.values() if isinstance(value, dict) else value):
        d, n = _extent(item, memo, active, level + 1)
        depth, size = max(depth, d), min(size + n, 1 << 62)
    active.discard(key)
    memo[key] = (depth + 1, size)
    return memo[key]


def _coerce(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
    if isinstance(out.get("nm"), str) and name != "prune":
        try:
            n, m = (int(v) for v in out["nm"].split(":"))
        except ValueError as exc:
            raise BudgetError(f"nm must look like '2:4', got {out['nm']!r}") from exc
        out["nm"] = (n, m)
    if name == "PruneChannels":
        kinds = tuple((k, float(out.pop(k))) for k in _KIND_SUGAR if k in out)
        if isinstance(out.get("hidden"), float):
            kinds += (("hidden", out.pop("hidden")),)
        if kinds:
            out["kind_ratios"] = tuple(out.get("kind_ratios", ())) + kinds
            out.setdefault("ratio", 0.0)
    return out


def build_passes(recipe: Recipe, model: nn.Module | None, *, calib: Iterable[Any] | None = None,
                 latency_cache: str | None = None) -> list[Pass]:
    """The recipe's passes, with calibration batches (and a dense copy of ``model`` where needed) supplied.

    Raises:
        RecipeError: A value is refused by its pass, or a pass's required analysis is missing.

    """
    from secateurs.api import plan_passes
    from secateurs.modeling.latency import LatencyTable

    passes: list[Pass] = []
    provided: set[type] = set()
    for index, step in enumerate(recipe.steps, 1):
        where = f"{recipe.source}: step {index} ({step.name})"
        try:
            options = _coerce(step.name, step.options)
            if step.name == "prune":
                # Validation runs without a model: a placeholder stands in for the dense copy ``reconstruct`` keeps.
                built = plan_passes(model if model is not None else nn.Identity(), calib=calib,
                                    latency_cache=latency_cache, **options)[0]
            else:
                cls = PASSES[step.name]
                params = inspect.signature(cls.__init__).parameters
                extra: dict[str, Any] = {}
                if "calib" in params:
                    extra["calib"] = calib
                if cls is AllocateBudget and options.get("unit") == "latency":
                    extra["latency"] = LatencyTable("torch", cache=latency_cache)
                if cls is ReconstructLayers:
                    extra["dense"] = copy.deepcopy(model) if model is not None else nn.Identity()
                if cls is Recover:
                    built = _recover(RecoverOptions(**options), model, calib)
                else:
                    built = [cls(**options, **extra)]
        except RecipeError:
            raise
        except (BudgetError, RecoveryError, TypeError, ValueError) as exc:
            raise RecipeError(f"{where}: {exc}") from exc
        for p in built:
            missing = [k for k in p.requires if k not in provided]
            if missing:
                providers = [n for n, c in PASSES.items() if missing[0] in c.provides]
                raise RecipeError(f"{where} needs {missing[0].__name__}, which "
                                  f"{' or '.join(providers) or 'no pass'} provides: add it before step {index}")
            provided = set() if p.transforms else provided | set(p.provides)
        passes += built
    return passes


def _recover(options: RecoverOptions, model: nn.Module | None, calib: Iterable[Any] | None) -> list[Pass]:
    """A :class:`Recover` pass: the dense model (copied now, before any pruning) teaches the pruned one.

    It trains on the calibration batches, a tenth held out for evaluation; causal LMs also get their own
    next-token labels.
    """
    if model is None:  # validation only: the options were checked by RecoverOptions
        return []
    batches = list(calib or [])
    if len(batches) < 2:
        raise RecoveryError("recovery training needs calibration text (at least two batches): give --calib "
                            "pydoc or a text file, and --calib-samples large enough")
    from secateurs.data import split_held_out, with_labels

    if type(model).__name__.endswith("ForCausalLM") and all("input_ids" in b for b in batches):
        batches = with_labels(batches)
    train, held = split_held_out(batches, 0.1)
    return [Recover(copy.deepcopy(model), train, eval_data=held, options=options)]
