"""Reload pruned Hugging Face models: the load side of :mod:`secateurs.backends.checkpoint`.

:func:`load_pretrained` builds the model from its config on the meta device, reshapes every tensor and size
attribute to the shapes ``secateurs.json`` records, puts back the modules pruning inserted, and loads the
weights (safetensors, or ``torch.load(weights_only=True)`` for a legacy ``.bin``; never an unpickle).
:func:`check_reload` reloads a written folder the way its manifest says it loads and compares its outputs.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from secateurs.backends.decilm import decilm_base, is_decilm
from secateurs.errors import CheckpointError, MemoryShortfall
from secateurs.modeling.hf_attributes import sync_module
from secateurs.modeling.layers import ZeroSublayer
from secateurs.modeling.rewrite import embed_scale_for, set_embed_scale

__all__ = ["FORMAT", "MANIFEST", "check_reload", "compare_outputs", "load_pretrained"]

MANIFEST = "secateurs.json"
FORMAT = 1


def _skeleton(config: Any, architecture: str | None, *, meta: bool, trust_remote_code: bool = False) -> nn.Module:
    """A model of the config's architecture (on the meta device for shape comparisons)."""
    import transformers

    archs = getattr(config, "architectures", None)
    if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        raise CheckpointError(f"config.json: 'architectures' must be a list of class names, got {archs!r}")
    name = architecture or (archs[0] if archs else None)
    cls = getattr(transformers, name, None) if name else None
    if cls is None:
        if not trust_remote_code:
            raise CheckpointError(
                f"architecture {name!r} is not in transformers; pass trust_remote_code=True only if you trust it"
            )
        from transformers import AutoModel

        return _build(lambda: AutoModel.from_config(config, trust_remote_code=True), name, meta)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise CheckpointError(f"config.json: architecture {name!r} is not a transformers model class")
    return _build(lambda: cls._from_config(config), name, meta)


def _build(make: Callable[[], Any], name: str | None, meta: bool) -> nn.Module:
    """Build a model from its config, on ``meta`` or for real.

    A config the class rejects (sizes that do not divide, negative or string sizes) is a :class:`CheckpointError`
    naming the class and the reason, never a traceback.
    """
    try:
        if meta:
            with torch.device("meta"):
                return make()  # type: ignore[no-any-return]
        return make()  # type: ignore[no-any-return]
    except CheckpointError:
        raise
    except Exception as exc:  # any construction failure means the config is malformed for this class
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(f"config.json cannot build {name or 'the model'}: {type(exc).__name__}: {first}"
                              [:400]) from exc


def _check_size(meta_model: nn.Module, folder: Path, *, loading: bool) -> None:
    """Refuse a config far larger than the weights stored, or (``loading``) a load that cannot fit in memory.

    Both before anything is allocated: the model is built in float32 and the stored weights are read whole
    before they are copied in, so a load needs both at once (:func:`load_memory`).
    """
    wanted, stored = load_memory(meta_model, folder)
    if wanted > 4 * stored + (1 << 30):
        raise CheckpointError(f"'{folder / 'config.json'}' describes a model of {wanted / 4:,.0f} parameters "
                              f"({wanted / (1 << 30):,.1f} GiB in float32) but the folder stores "
                              f"{stored / (1 << 30):,.2f} GiB of weights: the config does not match the weights")
    problem = memory_shortfall(wanted, stored, folder) if loading else None
    if problem is not None:
        raise MemoryShortfall(f"{problem}: `secateurs prune --stream` prunes it one block at a time (`--stream "
                              "--dry-run` plans it) and `secateurs inspect` analyses it on the meta device", problem)


def load_memory(meta_model: nn.Module, folder: Path) -> tuple[int, int]:
    """Bytes of the model built in float32 and of the weight files a load reads (:func:`_weight_files`)."""
    try:
        stored = sum(f.stat().st_size for f in _weight_files(folder))
    except CheckpointError:  # no weights: the load itself says so
        stored = 0
    return sum(t.numel() * 4 for t in meta_model.state_dict().values()), stored


def available_memory() -> int | None:
    """Bytes this process may still allocate: ``MemAvailable``, or less under a cgroup limit; None if unknown.

    Under a cgroup (v2 ``memory.max``, v1 ``memory.limit_in_bytes``) the limit minus the usage, with the
    reclaimable page cache (``inactive_file``) counted as free.
    """
    found: list[int] = []
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    for folder, limit_file, usage_file, cache_key in (
            ("/sys/fs/cgroup", "memory.max", "memory.current", "inactive_file"),
            ("/sys/fs/cgroup/memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")):
        with contextlib.suppress(OSError, ValueError):
            limit = Path(folder, limit_file).read_text().strip()
            if limit == "max" or int(limit) >= 1 << 60:  # no limit (v1 writes a huge number)
                continue
            stat = dict(line.split() for line in Path(folder, "memory.stat").read_text().splitlines()
                        if len(line.split()) == 2)
            cache = int(stat.get(cache_key, 0))
            found.append(int(limit) - int(Path(folder, usage_file).read_text()) + cache)
    return min(found) if found else None


def memory_shortfall(wanted: int, stored: int, folder: Path) -> str | None:
    """Why loading ``folder`` in memory cannot fit (model ``wanted`` + stored ``stored`` bytes), or None.

    Not judged under ``torchrun`` (every rank would judge its own free memory at its own moment and they could
    disagree); there each rank loads its copy as before.
    """
    from secateurs.distributed import world_size

    free = available_memory()
    if free is None or wanted + stored <= free or world_size() > 1:
        return None
    gib = 1 << 30
    return (f"loading '{folder}' in memory needs about {(wanted + stored) / gib:,.1f} GiB (the model in float32, "
            f"{wanted / gib:,.1f} GiB, and its stored weights, {stored / gib:,.1f} GiB) but {free / gib:,.1f} GiB "
            "are available")


def _weight_files(folder: Path) -> list[Path]:
    """The weight files a load reads: ``model.safetensors``, the shards of its index, or ``pytorch_model.bin``."""
    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        from secateurs.backends.sharded import read_index

        return sorted({folder / f for f in read_index(folder).values()})
    if (folder / "pytorch_model.bin").is_file():
        return [folder / "pytorch_model.bin"]
    raise CheckpointError(f"no model.safetensors (or index) in '{folder}'")


def _read_state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = _weight_files(folder)
    if files[0].suffix == ".bin":
        f = files[0]
        try:
            return dict(torch.load(f, map_location="cpu", weights_only=True))
        except Exception as exc:  # torch raises UnpicklingError / RuntimeError for unsafe or corrupt files
            raise CheckpointError(f"'{f}' could not be read safely (weights_only=True): {exc}") from exc
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            state.update(load_file(f))
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"'{f}' is not a readable safetensors file: {exc}") from exc
    return state


def load_pretrained(
    path: str | os.PathLike[str], *, trust_remote_code: bool = False, dtype: torch.dtype | None = None,
    check_memory: bool = True,
) -> nn.Module:
    """Load a model written by :func:`save_pretrained` (or any Hugging Face checkpoint folder).

    Every recorded shape and size attribute is restored before the weights load, so per-layer sizes may
    differ. The model is returned in eval mode. ``check_memory=False`` skips the memory check below (the
    reload check of a folder just written skips it: the model it compares with is still in memory).

    Raises:
        CheckpointError: The folder, config or weights are missing, corrupt or do not match each other, or the
            model and its stored weights cannot fit in the memory available (checked before anything is
            allocated; the message says how much each needs; not under ``torchrun``).

    """
    folder = Path(path)
    config, manifest = _read_config(folder, trust_remote_code)
    # The recorded structure is built on the meta device first: a config or manifest asking for far more than
    # the folder stores is refused before anything is allocated.
    _check_size(_assemble(config, manifest, folder, meta=True, trust_remote_code=trust_remote_code), folder,
                loading=check_memory)
    model = _assemble(config, manifest, folder, meta=False, trust_remote_code=trust_remote_code)
    state = _read_state(folder)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # size mismatches: the config (or manifest) does not describe these weights
        detail = "; ".join(line.strip() for line in str(exc).splitlines()[1:4])
        raise CheckpointError(f"the weights in '{folder}' do not match its config.json: {detail}") from exc
    tied = _tied_names(model) | set(manifest.get("absent", ()))  # absent: norms of a DeciLM folder's no-op sublayers
    missing = [k for k in result.missing_keys if k not in tied]
    # Older checkpoints also store buffers that newer code keeps non-persistent (BERT's position_ids).
    buffers = dict(model.named_buffers())
    unexpected = [k for k in result.unexpected_keys if k not in buffers]
    if (missing or unexpected) and (not manifest or manifest.get("expert_layout") == "per-expert"):
        cls = type(model)
        del state, model  # one copy of the weights at a time
        converted = _load_converted(folder, config, cls, trust_remote_code)
        if converted is not None:  # the same weights, in the module transformers' own conversion built
            model = converted
            missing = unexpected = []
    if missing or unexpected:
        raise CheckpointError(
            f"weights in '{folder}' do not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    with torch.no_grad():  # a no-op sublayer's norm feeds nothing; it holds ones, as a fresh norm does
        for name in manifest.get("absent", ()):
            owner, _, leaf = name.rpartition(".")
            param = model.get_submodule(owner)._parameters.get(leaf)
            if param is not None and name in result.missing_keys:
                param.fill_(1.0)
    if dtype is not None:
        model.to(dtype)
    return model.eval()


def load_skeleton(path: str | os.PathLike[str], *, trust_remote_code: bool = False) -> nn.Module:
    """The model a checkpoint folder describes, on the meta device: its recorded structure, no weight read.

    What ``secateurs inspect`` analyses: a 7B-shape checkpoint's groups and costs need its shapes only. The
    stored tensors' shapes (safetensors headers) are compared with the skeleton's.

    Raises:
        CheckpointError: The folder or config is missing or malformed, or a stored tensor's shape differs from
            the one the config builds (the message names it).

    """
    folder = Path(path)
    config, manifest = _read_config(folder, trust_remote_code)
    model = _assemble(config, manifest, folder, meta=True, trust_remote_code=trust_remote_code)
    _check_size(model, folder, loading=False)
    if (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file():
        from secateurs.backends.sharded import ShardedSource, check_shapes

        check_shapes(ShardedSource(folder), {k: tuple(v.shape) for k, v in model.state_dict().items()},
                     folder / "config.json")
    return model.eval()


def _read_config(folder: Path, trust_remote_code: bool) -> tuple[Any, dict[str, Any]]:
    """The folder's config and its ``secateurs.json`` manifest (empty for a plain checkpoint), both checked."""
    from transformers import AutoConfig

    if not (folder / "config.json").is_file():
        raise CheckpointError(f"'{folder}' has no config.json")
    try:
        raw = json.loads((folder / "config.json").read_text())
    except (ValueError, OSError) as exc:
        raise CheckpointError(f"'{folder / 'config.json'}' could not be read: {exc}") from exc
    if isinstance(raw, dict) and is_decilm(raw):  # per-layer sizes in block_configs: built as a Llama
        try:
            llama, recorded, absent = decilm_base(raw, str(folder / "config.json"))
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"'{folder / 'config.json'}' is not a readable DeciLM config: {exc}") from exc
        _check_manifest(recorded, folder / "config.json")
        return llama, {**recorded, "absent": sorted(absent)}
    manifest: dict[str, Any] = {}
    if (folder / MANIFEST).is_file():
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
        except ValueError as exc:
            raise CheckpointError(f"'{folder / MANIFEST}' is not valid JSON: {exc}") from exc
        if not isinstance(manifest, dict):
            raise CheckpointError(f"'{folder / MANIFEST}' must hold a JSON object, got {type(manifest).__name__}")
        if manifest.get("format") != FORMAT:
            raise CheckpointError(f"'{folder / MANIFEST}' has unknown format {manifest.get('format')!r}")
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as exc:  # a malformed config raises ValueError, TypeError, KeyError, ... from its class
        raise CheckpointError(f"'{folder / 'config.json'}' could not be read: {exc}") from exc
    _check_manifest(manifest, folder / MANIFEST)
    return config, manifest


def _assemble(config: Any, manifest: dict[str, Any], folder: Path, *, meta: bool,
              trust_remote_code: bool) -> nn.Module:
    """The model ``config`` builds, with the structure ``manifest`` records; weights not loaded.

    Block lists, removed sublayers, factorised layers and per-tensor shapes are applied; on the meta device when
    ``meta``.
    """
    model = _skeleton(config, manifest.get("architecture"), meta=meta, trust_remote_code=trust_remote_code)
    for name, length in manifest.get("lists", {}).items():
        try:
            lst = model.get_submodule(name)
        except AttributeError as exc:
            raise CheckpointError(f"recorded block list '{name}' does not exist in {type(model).__name__}") from exc
        built = len(lst) if isinstance(lst, (nn.ModuleList, nn.Sequential)) else 0
        if int(length) > built:
            raise CheckpointError(f"'{folder / MANIFEST}': block list '{name}' is recorded with {length} blocks "
                                  f"but the config builds {built}")
        # removed blocks were renumbered: the first ``length`` blocks of a fresh list have the kept layout
        lst._modules = {str(i): lst._modules[str(i)] for i in range(int(length))}
    with torch.device("meta") if meta else contextlib.nullcontext():
        for name, extras in manifest.get("zeroed", {}).items():
            _put_module(model, name, ZeroSublayer(int(extras)), "removed sublayer")
        for name, spec in manifest.get("modules", {}).items():
            _put_module(model, name, _build_module(spec, name, folder), "factorised layer")
        _reshape(model, manifest.get("shapes", {}), manifest.get("attributes", {}))
    return model


def _put_module(model: nn.Module, name: str, module: nn.Module, what: str) -> None:
    """Replace the submodule ``name`` of ``model`` (a recorded structure change) by ``module``."""
    parent, _, leaf = name.rpartition(".")
    try:
        owner = model.get_submodule(parent)
    except AttributeError as exc:
        raise CheckpointError(f"{what} '{name}' does not exist in {type(model).__name__}") from exc
    owner._modules[leaf] = module


def _check_manifest(manifest: dict[str, Any], path: Path) -> None:
    """Refuse a ``secateurs.json`` whose fields have the wrong types (it is outside data like any other).

    Raises:
        CheckpointError: A field is not of its documented form; the message names the file and the field.

    """
    def size(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 40

    def mapping(key: str, ok: Callable[[Any], bool], what: str) -> None:
        value = manifest.get(key, {})
        if not isinstance(value, dict) or not all(isinstance(k, str) and ok(v) for k, v in value.items()):
            raise CheckpointError(f"'{path}': field '{key}' must map names to {what}")

    if not manifest:
        return
    arch = manifest.get("architecture")
    if arch is not None and not isinstance(arch, str):
        raise CheckpointError(f"'{path}': field 'architecture' must be a class name, got {arch!r}")
    mapping("shapes", lambda v: isinstance(v, list) and len(v) <= 8 and all(size(d) for d in v)
            and math.prod(v) < 1 << 40, "shapes (lists of sizes >= 0)")
    mapping("attributes", lambda v: isinstance(v, dict) and all(
        isinstance(a, str) and (size(x) or (isinstance(x, list) and all(size(d) for d in x))) for a, x in v.items()),
            "attribute tables of sizes")
    mapping("lists", size, "block counts")
    mapping("zeroed", size, "counts")
    mapping("modules", lambda v: isinstance(v, dict), "layer descriptions")


def _load_converted(folder: Path, config: Any, cls: type, trust_remote_code: bool) -> nn.Module | None:
    """A Hugging Face checkpoint in another key layout than the module's, read by transformers' own conversion.

    Mixtral / Qwen2-MoE experts saved one by one (``experts.N.w1.weight``) are fused on load. Returns the loaded
    model, or None unless every weight came from the file (nothing randomly initialised).
    """
    loader = getattr(cls, "from_pretrained", None)
    if loader is None:
        return None
    try:
        model, info = loader(folder, config=copy.deepcopy(config), local_files_only=True, dtype=torch.float32,
                             trust_remote_code=trust_remote_code, output_loading_info=True)
    except Exception:  # not a layout transformers converts either: the caller reports the mismatch
        return None
    tied = _tied_names(model)
    if [k for k in info.get("missing_keys", ()) if k not in tied] or info.get("unexpected_keys") or \
            info.get("mismatched_keys"):
        return None
    return model


def _replaced_modules(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Factorised layers (low-rank, ARMOR) by module name, with what rebuilds them before their weights load."""
    from secateurs.modeling.layers import ArmorLinear, LowRankLinear

    out: dict[str, dict[str, Any]] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, LowRankLinear):
            out[name] = {"type": "LowRankLinear", "in_features": mod.in_features, "out_features": mod.out_features,
                         "rank": mod.rank, "bias": mod.up.bias is not None}
        elif isinstance(mod, ArmorLinear):
            out[name] = {"type": "ArmorLinear", "a": list(mod.a_blocks.shape), "s": list(mod.sparse.shape),
                         "b": list(mod.b_blocks.shape), "bias": mod.bias is not None}
    return out


def _build_module(spec: Any, name: str, folder: Path) -> nn.Module:
    """An empty factorised layer from its manifest entry (weights load afterwards)."""
    from secateurs.modeling.layers import ArmorLinear, LowRankLinear

    def dims(key: str, rank: int) -> list[int]:
        value = spec.get(key)
        if not (isinstance(value, list) and len(value) == rank and all(isinstance(v, int) and 0 < v < 1 << 31
                                                                         for v in value) and math.prod(value) < 1 << 40):
            raise CheckpointError(f"'{folder / MANIFEST}': layer '{name}' has an invalid {key!r}: {value!r}")
        return value

    kind = spec.get("type") if isinstance(spec, dict) else None
    if kind == "LowRankLinear":
        i, o, r = (spec.get(k) for k in ("in_features", "out_features", "rank"))
        if not all(isinstance(v, int) and 0 < v < 1 << 31 for v in (i, o, r)):
            raise CheckpointError(f"'{folder / MANIFEST}': layer '{name}' has invalid sizes {spec!r}")
        return LowRankLinear(i, o, r, bool(spec.get("bias")))
    if kind == "ArmorLinear":
        s = dims("s", 2)
        return ArmorLinear(torch.zeros(dims("a", 3)), torch.zeros(s), torch.zeros(dims("b", 3)),
                           torch.zeros(s[0]) if spec.get("bias") else None)
    raise CheckpointError(f"'{folder / MANIFEST}': layer '{name}' has unknown type {kind!r}")


def check_reload(folder: Path, model: nn.Module, example: dict[str, Any], plain: bool, *,
                 trust_remote_code: bool = False) -> None:
    """Reload ``folder`` the way its manifest says it loads and compare with ``model`` on ``example``.

    Plain ``from_pretrained`` of the model's class when the folder claims it, :func:`load_pretrained` otherwise.

    Raises:
        VerificationError: The reloaded model's outputs differ from the verified model's (or it does not load).

    """
    from secateurs.errors import VerificationError
    from secateurs.modeling.outputs import snapshot_outputs

    how = f"{type(model).__name__}.from_pretrained" if plain else "load_pretrained"
    try:
        if plain:
            reloaded: nn.Module = type(model).from_pretrained(  # type: ignore[attr-defined]
                folder, local_files_only=True, trust_remote_code=trust_remote_code)
        else:
            # the pruned model is still in memory: a shortfall here is for the load to meet, not a --stream hint
            reloaded = load_pretrained(folder, trust_remote_code=trust_remote_code, check_memory=False)
    except Exception as exc:  # any failure to load what was just written means the output is not what was verified
        raise VerificationError(f"the written checkpoint does not reload with {how}: {exc}") from exc
    reloaded = reloaded.to(next(model.parameters()).device).eval()
    if plain:
        reloaded.to(next(model.parameters()).dtype)
    want = snapshot_outputs(model, (), example)
    try:
        got = snapshot_outputs(reloaded, (), example)
    except Exception as exc:  # the reloaded model does not even run: the output is not what was verified
        raise VerificationError(f"the checkpoint reloaded with {how} fails on the example inputs: {exc}") from exc
    del reloaded
    if len(want) != len(got):
        raise VerificationError(f"the checkpoint reloaded with {how} returns {len(got)} outputs, not {len(want)}")
    for i, (a, b) in enumerate(zip(want, got, strict=True)):
        if a.shape != b.shape:
            raise VerificationError(f"output #{i} of the checkpoint reloaded with {how} has shape {tuple(b.shape)}, "
                                    f"not {tuple(a.shape)}")
        if not a.is_floating_point():
            if not torch.equal(a, b):
                raise VerificationError(f"output #{i} of the checkpoint reloaded with {how} differs")
            continue
        compare_outputs(a, b, f"output #{i} of the checkpoint reloaded with {how}")


def compare_outputs(want: torch.Tensor, got: torch.Tensor, what: str) -> None:
    """Raise :class:`VerificationError` unless ``got`` equals ``want`` to the tolerance of their dtype."""
    from secateurs.errors import VerificationError

    if want.shape != got.shape:
        raise VerificationError(f"{what} has shape {tuple(got.shape)}, not {tuple(want.shape)}")
    tol = 1e-2 if want.dtype in (torch.float16, torch.bfloat16) else 1e-4
    diff = float((want.double() - got.double()).abs().max()) if want.numel() else 0.0
    scale = float(want.double().abs().max()) if want.numel() else 0.0
    if not diff <= tol * scale + tol * 1e-2:
        raise VerificationError(
            f"{what} differs from the verified model (max abs difference {diff:.3g}, largest value {scale:.3g}): a "
            "size-derived constant or an unrecorded layer did not survive saving; nothing was written")


def _tied_names(model: nn.Module) -> set[str]:
    seen: dict[int, str] = {}
    tied: set[str] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.add(name)
            tied.add(seen[id(p)])
        seen.setdefault(id(p), name)
    return tied


def _reshape(model: nn.Module, shapes: dict[str, list[int]], attributes: dict[str, dict[str, Any]]) -> None:
    """Give ``model`` the recorded tensor shapes and size attributes (tied tensors stay tied)."""
    aliases: dict[int, list[str]] = {}
    tensors: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    for name, t in tensors.items():
        aliases.setdefault(id(t), []).append(name)
    done: set[str] = set()
    for name, shape in shapes.items():
        if name in done:
            continue
        if name not in tensors:
            raise CheckpointError(f"recorded tensor '{name}' does not exist in {type(model).__name__}")
        old = tensors[name]
        new = torch.zeros(shape, dtype=old.dtype, device=old.device)
        replacement: torch.Tensor = nn.Parameter(new, requires_grad=old.requires_grad) if isinstance(
            old, nn.Parameter) else new
        for alias in aliases[id(old)]:
            path, _, leaf = alias.rpartition(".")
            mod = model.get_submodule(path) if path else model
            if leaf in mod._parameters:
                mod._parameters[leaf] = replacement  # type: ignore[assignment]
            else:
                mod._buffers[leaf] = replacement
            done.add(alias)
    # Derived constants follow the restored widths as they did when the model was pruned (Gemma's embed_scale
    # is sqrt(hidden_size) of the config, which here is the dense one).
    widths = {id(m): m.embedding_dim for m in model.modules() if isinstance(m, nn.Embedding)}
    for name, vals in attributes.items():
        try:
            mod = model.get_submodule(name)
        except AttributeError as exc:
            raise CheckpointError(f"recorded module '{name}' does not exist in {type(model).__name__}") from exc
        for attr, value in vals.items():
            setattr(mod, attr, tuple(value) if isinstance(value, list) else value)
    for mod in model.modules():
        sync_module(mod, setattr)
        scale = embed_scale_for(mod, widths.get(id(mod)))
        if scale is not None:
            set_embed_scale(mod, scale, setattr)
