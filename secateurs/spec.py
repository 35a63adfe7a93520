"""One option schema for every path: :class:`PruneSpec`.

``secateurs.prune(**options)``, recipes' ``prune`` step, the command-line flags, the streamed
``prune_checkpoint`` and ``prune_onnx`` all build a :class:`PruneSpec` and check it with
:meth:`PruneSpec.check` for their path (``memory``, ``stream`` or ``onnx``). The checks live here once:

- every option's name (unknown names get "did you mean"), its value (fractions, choices, ``"2:4"``), and whether
  the path takes it (:data:`OPTIONS` says which paths do, and which CLI flag spells it);
- a criterion typed into another step's option (``importance="sparsegpt"``) names the option meant;
- an option that no step of the plan reads is refused (``sparsity_criterion`` without ``sparsity`` / ``nm``),
  never ignored; so are combinations no pass can honour (``bias_compensation`` with a weight criterion);
- the defaults (:meth:`PruneSpec.resolved`): ``flap`` with bias compensation when there is calibration data,
  the best weight-only criterion (:data:`WEIGHT_DEFAULT`) otherwise; sizes rounded to multiples of 8.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from secateurs.errors import BudgetError, did_you_mean
from secateurs.passes.allocate import ALLOCATORS, UNITS
from secateurs.passes.channel_plan import check_tensor_parallel, check_verify
from secateurs.passes.channels import SCOPES, TARGETS
from secateurs.passes.criteria import (
    NEEDS,
    WeightCriterion,
    channel_criterion,
    criteria_names,
    needed,
    step_criteria,
    step_criterion,
)
from secateurs.passes.sparsity import SPARSITY_ALLOCATORS

__all__ = ["OPTIONS", "PATHS", "WEIGHT_DEFAULT", "Option", "PruneSpec", "from_flags", "path_options", "spell"]

WEIGHT_DEFAULT = "l2"
"""The width criterion used without calibration data (the best weight-only one measured, benchmarks/README.md)."""

PATHS = ("memory", "stream", "onnx")
_PATH_NAME = {"memory": "secateurs.prune", "stream": "a streamed prune (--stream, block by block)",
              "onnx": "an ONNX file"}
_NEEDS = {"memory": NEEDS, "stream": ("weights", "calibration"), "onnx": ("weights",)}
_ALL, _MS, _MO = PATHS, ("memory", "stream"), ("memory", "onnx")
BIAS_COMPENSATING = ("flap", "activation")  # the criteria that measure the calibration means biases absorb


@dataclasses.dataclass(frozen=True)
class Option:
    """One option of :class:`PruneSpec`.

    Attributes:
        step: What reads it: ``structure`` (an amount that asks for a step), ``width``, ``sparse``, ``depth``,
            ``experts`` or ``run`` (the whole prune).
        paths: The paths that take it.
        flag: Its command-line flag, or None when it is Python / recipe only.
        choices: The values it takes, per path (a path not listed takes the ``memory`` ones).
        why: Per path, why the values missing there are missing.
        criteria: For a criterion option, the step whose registered criteria it takes
            (:mod:`secateurs.passes.criteria`): each path offers those its needs allow.
        fraction: Its value is a fraction in [0, 1) (an amount to remove).

    """

    step: str
    paths: tuple[str, ...]
    flag: str | None = None
    choices: Mapping[str, tuple[str, ...]] | None = None
    why: Mapping[str, str] | None = None
    criteria: str | None = None
    fraction: bool = False


_SPARSE_ONLY = tuple(a for a in SPARSITY_ALLOCATORS if a not in ALLOCATORS)  # allocate= values only sparsity reads
OPTIONS: dict[str, Option] = {
    "ratio": Option("structure", _MO, fraction=True),
    "heads": Option("structure", _ALL, "--heads", fraction=True),
    "kv_groups": Option("structure", _ALL, "--kv-groups", fraction=True),
    "ffn": Option("structure", _ALL, "--ffn", fraction=True),
    "channels": Option("structure", _MO, "--channels", fraction=True),
    "hidden": Option("structure", _ALL, "--hidden"),
    "layers": Option("structure", _MS, "--layers"),
    "sublayers": Option("structure", ("memory",), "--sublayers"),
    "experts": Option("structure", _MS, "--experts", fraction=True),
    "expert_neurons": Option("structure", _MS, fraction=True),
    "sparsity": Option("structure", _MS, "--sparsity", fraction=True),
    "nm": Option("structure", _MS, "--nm"),
    "importance": Option("width", _ALL, "--criterion", criteria="channels"),
    "scope": Option("width", _ALL, "--scope", {"memory": SCOPES}),
    "target": Option("width", _MO, None, {"memory": TARGETS}),
    "min_keep": Option("width", _ALL),
    "round_to": Option("width", _ALL, "--round-to"),
    "tensor_parallel": Option("width", _ALL, "--tp"),
    "uniform": Option("width", _ALL, "--uniform"),
    "loss_fn": Option("width", ("memory",)),
    "bias_compensation": Option("width", _MS, "--bias-compensation"),
    "allocate": Option("width", _ALL, "--allocate", {"memory": (*ALLOCATORS, *_SPARSE_ONLY),
                                                      "stream": ("global", "lamp", "owl", "dp", "cfsp"),
                                                      "onnx": ("global", "lamp", "owl", "dp")},
                       {"stream": "ecoflap, tyr and unipruning need the whole model's loss (unipruning backpropagates "
                                  "it)",
                        "onnx": "ecoflap, cfsp, tyr and unipruning run the model (its loss, its blocks' activations)"}),
    "budget_unit": Option("width", _ALL, None, {"memory": UNITS, "stream": ("channels", "params"), "onnx": UNITS},
                          {"stream": "flops and latency are measured on the whole model"}),
    "speedup": Option("width", _MO),
    "latency_cache": Option("width", _MO),
    "latency_backend": Option("width", _MO, None, {"memory": ("torch", "onnxruntime"), "onnx": ("onnxruntime",)},
                              {"onnx": "an ONNX file is timed in ONNX Runtime"}),
    "ignore": Option("width", _MO),  # width and sparsity both read it
    "depth_criterion": Option("depth", _MS, "--depth-criterion", criteria="depth"),
    "expert_importance": Option("experts", _MS, criteria="experts"),
    "sparsity_criterion": Option("sparse", _MS, "--sparsity-criterion", criteria="sparsity"),
    "sequential": Option("sparse", ("memory",)),
    "owl": Option("sparse", ("memory",)),
    "sparsity_allocate": Option("sparse", ("memory",), None, {"memory": SPARSITY_ALLOCATORS}),
    "reconstruct": Option("sparse", ("memory",)),
    "verify": Option("run", ("memory",), "--verify-rewrite"),
}
"""Every option: which step reads it, which paths take it, its CLI flag and its values."""

_SWITCHES = ("sequential", "owl", "reconstruct", "uniform")  # False is the same as not given
_STEP_NAME = {"width": "width pruning (ratio= or heads= / kv_groups= / ffn= / channels= / hidden=; --heads --ffn ...)",
              "sparse": "weight sparsity (sparsity= / nm=; --sparsity --nm)",
              "depth": "depth pruning (layers= / sublayers=; --layers --sublayers)",
              "experts": "expert pruning (experts=; --experts)"}
# The option that takes each kind of criterion name.
_CRITERION_OPTIONS = {"importance": "width", "sparsity_criterion": "sparse", "depth_criterion": "depth",
                      "expert_importance": "experts"}


def path_options(path: str) -> list[str]:
    """The options ``path`` takes, in :data:`OPTIONS` order."""
    return [name for name, opt in OPTIONS.items() if path in opt.paths]


def from_flags(args: Any) -> dict[str, Any]:
    """The options an ``argparse`` namespace of the ``prune`` command gives, by option name.

    ``--criterion`` is ``importance``; flags left unset are absent.
    """
    out = {}
    for name, opt in OPTIONS.items():
        if opt.flag is not None and (value := getattr(args, opt.flag[2:].replace("-", "_"), None)) is not None:
            out[name] = value
    return out


def spell(option: str, value: Any = None) -> str:
    """An option as a Python keyword and its CLI flag: ``importance='sparsegpt' (--criterion sparsegpt)``."""
    py = option if value is None else f"{option}={value!r}"
    flag = OPTIONS[option].flag if option in OPTIONS else None
    return py if flag is None else f"{py} ({flag}{'' if value is None else ' ' + str(value)})"


def _choices(option: str, path: str) -> tuple[str, ...]:
    """The values ``option`` takes on ``path`` (for a criterion, the registered ones its needs allow there)."""
    step = OPTIONS[option].criteria
    if step == "channels":
        return criteria_names(_NEEDS[path])
    if step is not None:
        return step_criteria(step, _NEEDS[path])
    table = OPTIONS[option].choices or {}
    return table.get(path, table.get("memory", ()))


def _fraction(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or not 0.0 <= value < 1.0:
        raise BudgetError(f"{name} ratio must be in [0, 1), got {value!r}" if name != "ratio"
                          else f"ratio must be in [0, 1), got {value!r}")


def _name(value: Any) -> str:
    return value if isinstance(value, str) else getattr(value, "__name__", type(value).__name__)


@dataclasses.dataclass(frozen=True)
class PruneSpec:
    """What to prune and how, validated once for every path.

    The fields are the options of :func:`secateurs.prune` (see :func:`secateurs.api.plan_passes` for each one's
    meaning). Every field is None when not given; :meth:`given` lists the ones that were, :meth:`resolved` fills the
    defaults. Build one with :meth:`parse` (names checked) and check it for a path with :meth:`check`.
    """

    ratio: float | None = None
    heads: float | None = None
    kv_groups: float | None = None
    ffn: float | None = None
    channels: float | None = None
    hidden: bool | float | None = None
    layers: float | None = None
    sublayers: float | None = None
    experts: float | None = None
    expert_neurons: float | None = None
    sparsity: float | None = None
    nm: tuple[int, int] | str | None = None
    importance: str | Callable[..., Any] | None = None
    scope: str | None = None
    target: str | None = None
    min_keep: float | None = None
    round_to: int | None = None
    tensor_parallel: int | None = None
    uniform: bool | None = None
    loss_fn: Callable[[Any], Any] | None = None
    bias_compensation: bool | None = None
    allocate: str | None = None
    budget_unit: str | None = None
    speedup: float | None = None
    latency_cache: str | None = None
    latency_backend: str | None = None
    ignore: Sequence[str] | None = None
    depth_criterion: str | None = None
    expert_importance: str | None = None
    sparsity_criterion: str | None = None
    sequential: bool | None = None
    owl: bool | None = None
    sparsity_allocate: str | None = None
    reconstruct: bool | None = None
    verify: bool | str | None = None

    def __post_init__(self) -> None:
        """Normalise the spellings: ``nm="2:4"`` to ``(2, 4)``, a whole ``layers`` count to an int, lists to tuples."""
        if isinstance(self.nm, str):
            try:
                n, m = (int(v) for v in self.nm.split(":"))
            except ValueError as exc:
                raise BudgetError(f"nm must look like '2:4', got {self.nm!r}") from exc
            object.__setattr__(self, "nm", (n, m))
        elif self.nm is not None:
            nm = tuple(self.nm)
            if len(nm) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in nm):
                raise BudgetError(f"nm must be (N, M) or 'N:M', got {self.nm!r}")
            object.__setattr__(self, "nm", nm)
        for name in ("layers", "sublayers"):
            value = getattr(self, name)
            if isinstance(value, float) and value >= 1 and value.is_integer():
                object.__setattr__(self, name, int(value))
        if self.ignore is not None:
            if isinstance(self.ignore, str):
                raise BudgetError(f"ignore must be a list of module names, got the string {self.ignore!r}")
            object.__setattr__(self, "ignore", tuple(self.ignore))
        for name in _SWITCHES:
            if getattr(self, name) is False:
                object.__setattr__(self, name, None)
        if self.hidden is False:
            object.__setattr__(self, "hidden", None)

    @classmethod
    def parse(cls, options: Mapping[str, Any], *, path: str = "memory", where: str = "prune()") -> PruneSpec:
        """A spec from keyword options, checked for ``path`` (see :meth:`check`).

        Raises:
            BudgetError: An option is unknown (with the closest name), invalid or read by no step that runs.

        """
        for key in options:
            if key not in OPTIONS:
                raise BudgetError(f"{where}: unknown option {key!r}{did_you_mean(str(key), OPTIONS)}")
        spec = cls(**{k: v for k, v in options.items() if v is not None})
        spec.check(path)
        return spec

    def given(self) -> dict[str, Any]:
        """The options that were set, by name."""
        return {f.name: v for f in dataclasses.fields(self) if (v := getattr(self, f.name)) is not None}

    # ------------------------------------------------------------------------------------------ what runs

    @property
    def kind_ratios(self) -> tuple[tuple[str, float], ...]:
        """The per-structure width ratios asked for (``hidden`` when given as a fraction)."""
        out = tuple((k, float(v)) for k in ("heads", "kv_groups", "ffn", "channels") if (v := getattr(self, k))
                    is not None)
        if self.hidden is not None and self.hidden is not True:
            out += (("hidden", float(self.hidden)),)
        return out

    @property
    def sparse(self) -> bool:
        """Whether weight sparsity is asked for."""
        return self.sparsity is not None or self.nm is not None

    @property
    def sparsity_allocator(self) -> str | None:
        """The allocator of the sparsity step: ``sparsity_allocate``, or ``allocate`` when only sparsity takes it."""
        return self.sparsity_allocate or (self.allocate if self.allocate in _SPARSE_ONLY else None)

    @property
    def sparse_criterion(self) -> str:
        """``sparsity_criterion``, or its default: ``wanda`` under ``unipruning`` (its anchor), else ``magnitude``."""
        return self.sparsity_criterion or ("wanda" if self.sparsity_allocator == "unipruning" else "magnitude")

    @property
    def width_allocator(self) -> str | None:
        """The allocator of the width step (``allocate`` unless it names a sparsity-only allocator)."""
        return self.allocate if self.allocate not in _SPARSE_ONLY else None

    @property
    def pattern(self) -> tuple[int, int] | None:
        """``nm`` as ``(n, m)`` (a string spelling is normalised when the spec is made)."""
        return self.nm if isinstance(self.nm, tuple) else None

    @property
    def depth(self) -> bool:
        """Whether blocks or sublayers are removed."""
        return bool(self.layers or self.sublayers)

    @property
    def default_ratio(self) -> float:
        """``ratio`` as given, else 0.3 when no structure is named, else 0 (only the named structures)."""
        if self.ratio is not None:
            return self.ratio
        named = self.kind_ratios or any(getattr(self, k) is not None for k in (
            "experts", "expert_neurons", "layers", "sublayers", "sparsity", "nm"))
        return 0.0 if named else 0.3

    def width_runs(self, path: str = "memory") -> bool:
        """Whether the width step runs.

        It runs when a width amount is asked for, or (in memory) when nothing else is: a ratio-0 width pass then
        reports the groups.
        """
        width = self.default_ratio > 0 or any(v > 0 for _, v in self.kind_ratios) or self.hidden is True
        if path == "onnx":
            return True
        if path == "stream":
            return bool(self.kind_ratios)
        other = bool(self.layers or self.sublayers or self.experts or self.expert_neurons or self.sparse)
        return width or not other

    # ------------------------------------------------------------------------------------------ checks

    def check(self, path: str = "memory", *, steps: Sequence[str] | None = None) -> None:
        """Refuse what ``path`` cannot do as asked.

        That is: options it does not take, values out of range or not among its choices, and options no step
        that runs reads. ``steps`` names the steps that run when a caller knows better than the spec (``()``
        when the options go to no pruning step at all).

        Raises:
            BudgetError: The message names the option (and its CLI flag) and what to use instead.

        """
        if path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {path!r}")
        given = self.given()
        for option in given:
            if path not in OPTIONS[option].paths:
                takes = ", ".join(spell(o) for o in path_options(path))
                raise BudgetError(f"{spell(option)} does not apply to {_PATH_NAME[path]}; it takes {takes}")
        self._check_values(path)
        self._check_criteria(path)
        self._check_read(path, steps)
        self._check_combinations(path)

    def _check_values(self, path: str) -> None:
        for name in (n for n, o in OPTIONS.items() if o.fraction):
            if getattr(self, name) is not None:
                _fraction(name, getattr(self, name))
        if self.hidden is not None and self.hidden is not True:
            _fraction("hidden", self.hidden)
        if path == "stream" and self.hidden is True:
            raise BudgetError("hidden=True prunes the hidden size by ratio=, which a streamed prune does not take: "
                              "give the hidden fraction (hidden=0.25, --hidden 0.25)")
        for name in ("layers", "sublayers"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or value < 0 or (value >= 1 and value != int(value))):
                raise BudgetError(f"{name} must be a count >= 1 or a fraction in [0, 1), got {value!r}")
        if self.pattern is not None:
            n, m = self.pattern
            if not 0 < n < m:
                raise BudgetError(f"N:M needs 0 < N < M, got {n}:{m}")
        if self.round_to is not None and (isinstance(self.round_to, bool) or not isinstance(self.round_to, int)
                                          or self.round_to < 1):
            raise BudgetError(f"round_to must be an integer >= 1, got {self.round_to!r}")
        if self.tensor_parallel is not None:
            check_tensor_parallel(self.tensor_parallel)
        if self.min_keep is not None and (not isinstance(self.min_keep, (int, float)) or not 0.0 <= self.min_keep <= 1.0):
            raise BudgetError(f"min_keep must be in [0, 1], got {self.min_keep!r}")
        if self.verify is not None:
            check_verify(self.verify)
        if self.speedup is not None and (not isinstance(self.speedup, (int, float)) or not self.speedup > 1.0):
            raise BudgetError(f"speedup is a whole-model latency target > 1 (1.5 for 1.5x faster), got {self.speedup!r}")
        for name, opt in OPTIONS.items():
            value = getattr(self, name)
            if opt.choices is None or value is None:
                continue
            self._check_choice(name, value, path)

    def _check_choice(self, name: str, value: Any, path: str) -> None:
        choices = _choices(name, path)
        if value in choices:
            return
        why = (OPTIONS[name].why or {}).get(path)
        if why and value in _choices(name, "memory"):
            raise BudgetError(f"{spell(name, value)} cannot run in {_PATH_NAME[path]}: {why}; choose from "
                              f"{', '.join(choices)}")
        raise BudgetError(f"unknown {spell(name)} {value!r}{did_you_mean(str(value), choices)}; choose from "
                          f"{', '.join(choices)}")

    def _check_criteria(self, path: str) -> None:
        """Check the criterion options.

        A criterion given to the wrong option names the option that takes it; an unknown one gets its closest
        names; a criterion the path cannot feed says what it needs.
        """
        names = {o: _choices(o, "memory") for o in _CRITERION_OPTIONS}
        for option in _CRITERION_OPTIONS:
            value = getattr(self, option)
            if value is None:
                continue
            if not isinstance(value, str):
                if option != "importance" or path == "stream":
                    raise BudgetError(f"{option} must be a name, got {_name(value)!r}")
                continue
            if value not in names[option]:
                owners = [o for o, known in names.items() if value in known]
                if owners:
                    raise BudgetError(f"{spell(option, value)} is not a criterion of this option: {value!r} is a "
                                      f"criterion of {owners[0]}; use {spell(owners[0], value)}")
                raise BudgetError(f"unknown {spell(option)} {value!r}{did_you_mean(value, names[option])}; choose "
                                  f"from {', '.join(names[option])}")
            if option == "importance":
                channel_criterion(value, needs=_NEEDS[path], where=_PATH_NAME[path])
            elif value not in _choices(option, path):
                crit = step_criterion(OPTIONS[option].criteria or "", value)
                assert crit is not None  # a name of the registry (checked above)
                raise BudgetError(f"{spell(option, value)} needs {needed(crit.needs)}, which {_PATH_NAME[path]} does "
                                  f"not have; choose from {', '.join(_choices(option, path))}")

    def _check_read(self, path: str, steps: Sequence[str] | None) -> None:
        """Refuse options that no step that runs reads (never run with less than what was asked)."""
        runs = {"width": self.width_runs(path), "sparse": self.sparse, "depth": self.depth,
                "experts": bool(self.experts), "run": True, "structure": True}
        if steps is not None:
            runs.update({step: step in steps for step in ("width", "sparse", "depth", "experts")})
        given = self.given()
        for option, value in given.items():
            step = OPTIONS[option].step
            if option == "ignore":
                if not (runs["width"] or runs["sparse"]):
                    raise BudgetError("ignore= is read by width pruning and weight sparsity only, and neither is "
                                      "asked for")
                continue
            if option == "hidden" and value is True:
                step = "width"
            if option == "allocate" and value in _SPARSE_ONLY:
                step = "sparse"
            if runs[step]:
                continue
            message = (f"{spell(option, value if isinstance(value, str) else None)} is read only by "
                       f"{_STEP_NAME[step]}, which this call does not ask for")
            if isinstance(value, str):
                for other, other_step in _CRITERION_OPTIONS.items():
                    if other != option and runs[other_step] and value in _choices(other, "memory"):
                        message += f"; for the step that runs use {spell(other, value)}"
            raise BudgetError(message)

    def _check_combinations(self, path: str) -> None:
        importance = self.importance
        if self.bias_compensation and importance is not None and importance not in BIAS_COMPENSATING:
            raise BudgetError(f"bias_compensation (--bias-compensation) folds calibration means into biases and needs "
                              f"importance 'flap' or 'activation' (--criterion), not {_name(importance)!r}")
        if self.loss_fn is not None and importance != "taylor":
            raise BudgetError(f"loss_fn is read only by importance='taylor'; importance is "
                              f"{_name(importance) if importance is not None else 'the default'!r}")
        if self.sequential and self.sparse_criterion == "magnitude":
            raise BudgetError("sequential=True calibrates 'wanda' / 'sparsegpt' block by block; magnitude sparsity "
                              "needs no calibration (set sparsity_criterion)")
        if self.allocate in _SPARSE_ONLY and self.sparsity_allocate is not None:
            raise BudgetError(f"allocate={self.allocate!r} and sparsity_allocate={self.sparsity_allocate!r} both "
                              "allocate the sparsity: give one")
        if self.width_allocator is not None and (self.target is not None or self.scope is not None):
            raise BudgetError(f"{'target' if self.target is not None else 'scope'}= is for the uniform or global plan; "
                              "with allocate= the budget is set by budget_unit= (and the per-structure ratios)")
        if self.budget_unit is not None and self.width_allocator is None and self.speedup is None:
            raise BudgetError("budget_unit= is read by the budget allocator only: give allocate= too"
                              + (f" ({self.allocate} allocates weight sparsity, whose budget is its fraction of "
                                 "the weights)" if self.allocate in _SPARSE_ONLY else ""))
        if ((self.latency_cache is not None or self.latency_backend is not None) and self.budget_unit != "latency"
                and self.speedup is None):
            raise BudgetError("latency_cache= / latency_backend= are read only with budget_unit='latency' or speedup=")
        if self.uniform and self.scope == "global":
            raise BudgetError("uniform=True (--uniform) gives every layer the same sizes, and scope='global' "
                              "(--scope global) ranks across layers to make them differ: use one")
        if self.uniform and self.sublayers:
            raise BudgetError("uniform=True (--uniform) keeps every layer alike, and sublayers= (--sublayers) "
                              "removes the attention or MLP of some layers only: use one")
        if path == "stream" and self.hidden is not None:
            if isinstance(importance, str) and not isinstance(channel_criterion(importance), WeightCriterion):
                raise BudgetError(f"the hidden size streams with weight criteria "
                                  f"({', '.join(criteria_names(('weights',)))}), not {importance!r}: its activation "
                                  "statistics span every block at once")
            if self.allocate is not None:
                raise BudgetError("the hidden size is one group; do not combine hidden with an allocator when "
                                  "streaming")

    # ------------------------------------------------------------------------------------------ defaults

    def resolved(self, *, calibrated: bool, path: str = "memory") -> PruneSpec:
        """The spec with the defaults filled in where the step runs.

        The width criterion: ``flap`` when there is calibration data and the hidden size is not pruned (it is
        pruned with weight criteria only, in memory as when streaming, so the paths agree), else
        :data:`WEIGHT_DEFAULT` (ONNX files: weight criteria only). Bias compensation: on with ``flap``.
        """
        if not self.width_runs(path) and self.hidden is None:
            return self
        importance = self.importance
        if importance is None:
            importance = "flap" if calibrated and self.hidden is None and path != "onnx" else WEIGHT_DEFAULT
        compensate = self.bias_compensation
        if compensate is None and path != "onnx":
            compensate = importance == "flap" and self.width_runs(path)
        return dataclasses.replace(self, importance=importance, bias_compensation=compensate)
