"""Save and reload pruned Hugging Face models.

``save_pretrained`` writes safetensors weights (under the module's parameter names) and the config, plus
``secateurs.json`` that records every tensor shape and size attribute that differs from a model built from
the config, so layers may differ (layer 3 keeps 5 heads, layer 7 keeps 9). When the pruning is uniform and
the config can express it (``num_attention_heads``, ``num_key_value_heads``, ``head_dim``,
``intermediate_size``), the config is rewritten so the folder also loads with plain
``transformers.AutoModel.from_pretrained``; ``secateurs.json`` says whether that is the case.

Loading never unpickles: safetensors, or ``torch.load(weights_only=True)`` for a legacy ``.bin``.
Writing goes to a temporary folder that is renamed into place, so a folder is complete or absent.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from secateurs.backends.expert_layout import per_expert_state, stores_experts_one_by_one
from secateurs.backends.files import make_parents, publish, remove_made, replace_into
from secateurs.errors import CheckpointError
from secateurs.modeling.hf_attributes import UP_PROJECTIONS, attention_sizes, sync_module
from secateurs.modeling.layers import ZeroSublayer
from secateurs.modeling.rewrite import embed_scale_for, set_embed_scale
from secateurs.modeling.structure import find_moe_blocks

__all__ = ["MANIFEST", "TOKENIZER_FILES", "Layout", "SaveResult", "check_reload", "describe", "load_pretrained",
           "save_pretrained"]

MANIFEST = "secateurs.json"
FORMAT = 1
# Integer size attributes that a pruned module may carry and that its tensors do not all imply.
WATCHED = (
    "in_features", "out_features", "in_channels", "out_channels", "groups", "num_features", "normalized_shape",
    "num_groups", "num_channels", "embedding_dim", "num_embeddings", "nf", "nx", "num_heads",
    "num_attention_heads", "n_head", "n_heads", "num_key_value_heads", "num_key_value_groups", "all_head_size",
    "split_size", "intermediate_size", "num_experts", "top_k", "intermediate_dim", "num_local_experts",
)
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
    "merges.txt", "tokenizer.model", "spiece.model", "added_tokens.json", "sentencepiece.bpe.model",
)


EXPERT_LAYOUTS = ("fused", "per-expert")


@dataclasses.dataclass(frozen=True)
class SaveResult:
    """Where a model was saved and whether plain ``from_pretrained`` can load it."""

    path: Path
    plain_loadable: bool
    changed_tensors: int


def _is_hf(model: Any) -> bool:
    return hasattr(model, "config") and hasattr(model, "save_pretrained") and hasattr(model.config, "to_dict")


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


def _check_size(meta_model: nn.Module, folder: Path) -> None:
    """Refuse a config that describes a model far larger than the weights stored (before allocating it)."""
    stored = sum(f.stat().st_size for f in folder.iterdir() if f.suffix in (".safetensors", ".bin") and f.is_file())
    wanted = sum(t.numel() * 4 for t in meta_model.state_dict().values())  # built in float32
    if wanted > 4 * stored + (1 << 30):
        raise CheckpointError(f"'{folder / 'config.json'}' describes a model of {wanted / 4:,.0f} parameters "
                              f"({wanted / (1 << 30):,.1f} GiB in float32) but the folder stores "
                              f"{stored / (1 << 30):,.2f} GiB of weights: the config does not match the weights")


def _shapes(model: nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in model.state_dict(keep_vars=True).items()}


def _attributes(model: nn.Module) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, mod in model.named_modules():
        vals: dict[str, Any] = {}
        for attr in WATCHED:
            v = getattr(mod, attr, None)
            if isinstance(v, int) and not isinstance(v, bool):
                vals[attr] = v
            elif isinstance(v, tuple) and all(isinstance(x, int) for x in v):
                vals[attr] = list(v)
        if vals:
            out[name] = vals
    return out


def _uniform(values: set[int]) -> int | None:
    return next(iter(values)) if len(values) == 1 else None


_SIZE_FIELDS = ("intermediate_size", "n_inner", "moe_intermediate_size", "shared_expert_intermediate_size")


def _expert_width(experts: nn.Module) -> int | None:
    down = experts._parameters.get("down_proj")
    return int(down.shape[-1]) if down is not None and down.dim() == 3 else None


def _input_embeddings(model: nn.Module) -> Any:
    """The model's input embedding module, or None (vision models have none)."""
    try:
        return model.get_input_embeddings()  # type: ignore[operator]
    except (AttributeError, NotImplementedError):
        return None


def _propose_config(model: nn.Module, fresh: nn.Module, config: Any) -> Any:
    """A copy of ``config`` updated with uniform pruned sizes (heads, KV heads, FFN width)."""
    cand = copy.deepcopy(config)
    heads: set[int] = set()
    kv: set[int] = set()
    head_dims: set[int] = set()
    for mod in model.modules():
        sizes = attention_sizes(mod)
        if sizes is None:
            continue
        heads.add(sizes[0])
        if sizes[1] is not None:
            kv.add(sizes[1])
        head_dims.add(sizes[2])
    if (h := _uniform(heads)) is not None:
        _set_field(cand, "num_attention_heads", h)
    if (k := _uniform(kv)) is not None and hasattr(cand, "num_key_value_heads"):
        _set_field(cand, "num_key_value_heads", k)
    if (d := _uniform(head_dims)) is not None:
        # Explicit, since many configs derive it as hidden_size // num_attention_heads (ViT and Llama-style
        # models read it); a config class that ignores it fails the shape check below instead.
        _set_field(cand, "head_dim", d)
    # FFN widths: each MLP input projection (up / gate / fc1 / c_fc / BERT's intermediate.dense) proposes its
    # new width for the config field that held its width in a fresh model (intermediate_size,
    # shared_expert_intermediate_size, ...). The shape check in save_pretrained has the last word.
    fresh_mods = dict(fresh.named_modules())
    proposals: dict[str, set[int]] = {}

    def propose(old_width: Any, new_width: Any) -> None:
        if not isinstance(old_width, int) or not isinstance(new_width, int):
            return
        for field in _SIZE_FIELDS:
            if getattr(config, field, None) == old_width or (field == "n_inner" and getattr(config, field, 0) is None
                                                              and 4 * int(getattr(config, "n_embd", 0)) == old_width):
                proposals.setdefault(field, set()).add(new_width)

    for name, mod in model.named_modules():
        leaf = name.rpartition(".")[2]
        if leaf in UP_PROJECTIONS or name.endswith("intermediate.dense"):
            ref = fresh_mods.get(name)
            propose(getattr(ref, "out_features", getattr(ref, "nf", None)),
                    getattr(mod, "out_features", getattr(mod, "nf", None)))
        elif leaf == "gate_up_proj" and isinstance(mod, nn.Linear):  # Phi-3's fused GLU: two rows per neuron
            ref = fresh_mods.get(name)
            if isinstance(ref, nn.Linear):
                propose(ref.out_features // 2, mod.out_features // 2)
    fresh_blocks = {b.name: b for b in find_moe_blocks(fresh)}
    for b in find_moe_blocks(model):
        ref_block = fresh_blocks.get(b.name)
        if ref_block is None:
            continue
        for field in ("num_local_experts", "num_experts", "n_routed_experts"):
            if getattr(config, field, None) == ref_block.num_experts:
                proposals.setdefault(field, set()).add(b.num_experts)
        if b.fused:
            propose(_expert_width(fresh_mods[b.experts]), _expert_width(model.get_submodule(b.experts)))
    # Hidden size: the input embedding width (the residual stream is one group, so it is uniform).
    embeddings = _input_embeddings(model)
    if isinstance(embeddings, nn.Embedding):
        for field in ("hidden_size", "n_embd", "d_model", "dim"):
            old = getattr(config, field, None)
            if isinstance(old, int) and old != embeddings.embedding_dim:
                fresh_emb = _input_embeddings(fresh)
                if isinstance(fresh_emb, nn.Embedding) and fresh_emb.embedding_dim == old:
                    proposals.setdefault(field, set()).add(int(embeddings.embedding_dim))
    for field, values in proposals.items():
        if (v := _uniform(values)) is not None:
            _set_field(cand, field, v)
    return cand


def _set_field(config: Any, field: str, value: int) -> None:
    """Set a config field, unless the class computes it or holds it per stage.

    Falcon's ``head_dim`` is a property and SegFormer's ``num_attention_heads`` a list: the shape check decides.
    """
    if isinstance(getattr(config, field, None), (list, tuple)):
        return
    try:
        setattr(config, field, value)
    except (AttributeError, TypeError, ValueError):
        logging.getLogger(__name__).debug("config field %s cannot be set on %s", field, type(config).__name__)


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a (pruned) model is written: the config to save, the ``secateurs.json`` manifest and its summary.

    Attributes:
        config: The config to write (rewritten with uniform pruned sizes when ``plain_loadable``).
        manifest: The content of ``secateurs.json``.
        plain_loadable: Whether plain ``from_pretrained`` loads the folder too.
        changed_tensors: How many tensors differ in shape from a model built from ``config``.

    """

    config: Any
    manifest: dict[str, Any]
    plain_loadable: bool
    changed_tensors: int


def describe(model: nn.Module) -> Layout:
    """The config and manifest :func:`save_pretrained` writes for ``model`` (its tensors may be on ``meta``).

    Streaming writers use it on a meta-device model whose pruned blocks went back to ``meta`` after their
    weights were written, so their folders load with :func:`load_pretrained` like any other.
    """
    config: Any = model.config
    architecture = type(model).__name__
    fresh = _skeleton(config, architecture, meta=True)
    cand = _propose_config(model, fresh, config)
    shapes = _shapes(model)
    try:
        cand_model: nn.Module | None = _skeleton(cand, architecture, meta=True)
    except (CheckpointError, ValueError, TypeError, ZeroDivisionError):
        cand_model = None  # the config cannot express this pruning (e.g. BERT derives head size from it)
    plain = cand_model is not None and _shapes(cand_model) == shapes and _attributes(cand_model) == _attributes(model)
    if plain and hasattr(cand, "validate"):
        try:  # transformers' own checks on save (e.g. hidden_size a multiple of num_attention_heads)
            cand.validate()
        except Exception:  # the config class refuses these sizes: the manifest records them instead
            plain = False
    base = cand_model if plain and cand_model is not None else fresh
    base_shapes, base_attrs = _shapes(base), _attributes(base)
    changed = {k: v for k, v in shapes.items() if base_shapes.get(k) != v}
    attrs = {name: {a: v for a, v in vals.items() if base_attrs.get(name, {}).get(a) != v}
             for name, vals in _attributes(model).items()}
    zeroed = {name: mod.extras for name, mod in model.named_modules() if isinstance(mod, ZeroSublayer)}
    replaced = _replaced_modules(model)
    plain = plain and not replaced  # a config cannot describe factorised layers
    fresh_lists = {n: len(m) for n, m in fresh.named_modules() if isinstance(m, (nn.ModuleList, nn.Sequential))}
    lists = {n: len(m) for n, m in model.named_modules()
             if isinstance(m, (nn.ModuleList, nn.Sequential)) and fresh_lists.get(n, len(m)) != len(m)}
    manifest = {
        "format": FORMAT,
        "zeroed": zeroed,
        "modules": replaced,
        "lists": lists,
        "architecture": architecture,
        "plain_loadable": plain,
        "shapes": changed,
        "attributes": {k: v for k, v in attrs.items() if v},
    }
    return Layout(cand if plain else config, manifest, plain, len(changed))


def save_pretrained(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    tokenizer: Any = None,
    source: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    extra: Callable[[Path], Any] | None = None,
    expert_layout: str = "fused",
) -> SaveResult:
    """Save a (pruned) Hugging Face model so :func:`load_pretrained` restores it exactly.

    Args:
        model: A ``transformers`` ``PreTrainedModel``.
        path: Output folder; must not exist unless ``overwrite``.
        tokenizer: A tokenizer to save alongside, or None.
        source: A checkpoint folder whose tokenizer files are copied along (when ``tokenizer`` is None).
        overwrite: Replace an existing folder (atomically: the old one is removed only after the new one is
            complete).
        extra: Called with the temporary folder before it is renamed into place, to add files (a report)
            that must appear together with the checkpoint or not at all.
        expert_layout: ``"fused"`` (the module's own names: one tensor per MoE layer's experts) or
            ``"per-expert"`` (``experts.N.w1.weight``, as transformers' own ``save_pretrained`` and published
            Mixtral / Qwen2-MoE checkpoints store them; plain-loadable prunings only).

    Returns:
        Where it went, and whether plain ``from_pretrained`` loads it too.

    Raises:
        CheckpointError: Not a Hugging Face model, the folder exists, or writing failed (disk full, permission
            denied); nothing is left behind then.

    """
    if not _is_hf(model):
        raise CheckpointError(
            f"save_pretrained needs a Hugging Face PreTrainedModel, got {type(model).__name__}; "
            "use torch.save(model.state_dict()) or safetensors for plain modules"
        )
    masked = [n for n, m in model.named_modules() if hasattr(m, "weight_orig") and hasattr(m, "weight_mask")]
    if masked:
        raise CheckpointError(
            f"{len(masked)} layers still carry sparsity masks (e.g. '{masked[0]}'); call "
            "secateurs.passes.remove_masks(model) to make them permanent before saving"
        )
    if expert_layout not in EXPERT_LAYOUTS:
        raise CheckpointError(f"unknown expert layout {expert_layout!r}; choose one of {', '.join(EXPERT_LAYOUTS)}")
    out = Path(path)
    if out.exists() and not overwrite:
        raise CheckpointError(f"output folder '{out}' exists; pass overwrite=True to replace it")
    layout = describe(model)
    per_expert = _per_expert_state(model, layout) if expert_layout == "per-expert" else {}
    made = make_parents(out)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as exc:
        remove_made(made)
        raise CheckpointError(f"cannot write into '{out.parent}': {exc}") from exc
    try:
        # Weights under the module's own parameter names (tied tensors stored once); Hugging Face's
        # loader accepts these names as they are.
        from safetensors import SafetensorError
        from safetensors.torch import save_file, save_model

        try:
            if expert_layout == "per-expert":
                save_file(per_expert, str(tmp / "model.safetensors"), metadata={"format": "pt"})
                layout.manifest["expert_layout"] = "per-expert"
            else:
                save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        except SafetensorError as exc:  # a full disk while writing, for one: not an OSError
            raise OSError(str(exc)) from exc
        config_out = copy.copy(layout.config)
        if not getattr(config_out, "architectures", None):  # as Hugging Face's own save_pretrained records it
            config_out.architectures = [type(model).__name__]
        config_out.save_pretrained(tmp)
        generation: Any = getattr(model, "generation_config", None)
        if generation is not None and hasattr(generation, "save_pretrained"):
            generation.save_pretrained(tmp)
        (tmp / MANIFEST).write_text(json.dumps(layout.manifest, indent=1, sort_keys=True))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        elif source is not None:
            for fname in TOKENIZER_FILES:
                f = Path(source) / fname
                if f.is_file():
                    shutil.copy2(f, tmp / fname)
        if extra is not None:
            extra(tmp)
        publish(tmp)
        replace_into(tmp, out)
    except OSError as exc:  # disk full, permission denied, ...: nothing is left behind
        shutil.rmtree(tmp, ignore_errors=True)
        remove_made(made)
        raise CheckpointError(f"writing '{out}' failed, nothing was written: {exc}") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        remove_made(made)
        raise
    return SaveResult(out, layout.plain_loadable, layout.changed_tensors)


def stores_per_expert(folder: str | os.PathLike[str]) -> bool:
    """Whether the checkpoint in ``folder`` stores its experts one by one (``experts.0.w1.weight``)."""
    from secateurs.backends.sharded import ShardedSource

    try:
        names = ShardedSource(folder).tensors
    except CheckpointError:
        return False
    return stores_experts_one_by_one(names)


def _per_expert_state(model: nn.Module, layout: Layout) -> dict[str, torch.Tensor]:
    """The state dict in the per-expert key layout transformers' own ``save_pretrained`` writes."""
    if not layout.plain_loadable:
        raise CheckpointError("the per-expert layout is read by plain from_pretrained only, and this pruning is not "
                              "expressible in the config (per-layer sizes or factorised layers); write the fused layout instead")
    seen: set[int] = set()
    state: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():  # tied tensors once, under their first name
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            state[name] = tensor
    return per_expert_state(model, state)


def _read_state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    files: list[Path]
    if single.is_file():
        files = [single]
    elif index.is_file():
        from secateurs.backends.sharded import read_index

        files = sorted({folder / f for f in read_index(folder).values()})
    elif (folder / "pytorch_model.bin").is_file():
        f = folder / "pytorch_model.bin"
        try:
            return dict(torch.load(f, map_location="cpu", weights_only=True))
        except Exception as exc:  # torch raises UnpicklingError / RuntimeError for unsafe or corrupt files
            raise CheckpointError(f"'{f}' could not be read safely (weights_only=True): {exc}") from exc
    else:
        raise CheckpointError(f"no model.safetensors (or index) in '{folder}'")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            state.update(load_file(f))
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"'{f}' is not a readable safetensors file: {exc}") from exc
    return state


def load_pretrained(
    path: str | os.PathLike[str], *, trust_remote_code: bool = False, dtype: torch.dtype | None = None
) -> nn.Module:
    """Load a model written by :func:`save_pretrained` (or any Hugging Face checkpoint folder).

    Every recorded shape and size attribute is restored before the weights load, so per-layer sizes may
    differ. The model is returned in eval mode.

    Raises:
        CheckpointError: The folder, config or weights are missing, corrupt or do not match each other.

    """
    from transformers import AutoConfig

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"'{folder}' has no config.json")
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
    # The recorded structure is built on the meta device first: a config or manifest asking for far more than
    # the folder stores is refused before anything is allocated.
    _check_size(_assemble(config, manifest, folder, meta=True, trust_remote_code=trust_remote_code), folder)
    model = _assemble(config, manifest, folder, meta=False, trust_remote_code=trust_remote_code)
    state = _read_state(folder)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # size mismatches: the config (or manifest) does not describe these weights
        detail = "; ".join(line.strip() for line in str(exc).splitlines()[1:4])
        raise CheckpointError(f"the weights in '{folder}' do not match its config.json: {detail}") from exc
    tied = _tied_names(model)
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
    if dtype is not None:
        model.to(dtype)
    return model.eval()


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
            reloaded = load_pretrained(folder, trust_remote_code=trust_remote_code)
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
