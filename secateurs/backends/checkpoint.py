"""Save and reload pruned Hugging Face models.

Saving is here; loading is in :mod:`secateurs.backends.checkpoint_load`, whose public names this module
re-exports.

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

import copy
import dataclasses
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from secateurs.backends.checkpoint_load import (
    FORMAT,
    MANIFEST,
    _replaced_modules,
    _skeleton,
    check_reload,
    load_pretrained,
    load_skeleton,
)
from secateurs.backends.decilm import CONFIG_CODE, CONFIG_FILE, decilm_layout, decilm_state
from secateurs.backends.expert_layout import per_expert_state, stores_experts_one_by_one
from secateurs.backends.files import make_parents, publish, remove_made, replace_into
from secateurs.errors import CheckpointError
from secateurs.modeling.hf_attributes import UP_PROJECTIONS, attention_sizes
from secateurs.modeling.layers import ZeroSublayer
from secateurs.modeling.structure import find_moe_blocks

__all__ = ["MANIFEST", "TOKENIZER_FILES", "Layout", "SaveResult", "check_reload", "describe", "load_pretrained",
           "load_skeleton", "save_pretrained"]

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
SAVE_FORMATS = ("hf", "decilm")


@dataclasses.dataclass(frozen=True)
class SaveResult:
    """Where a model was saved and whether plain ``from_pretrained`` can load it."""

    path: Path
    plain_loadable: bool
    changed_tensors: int


def _is_hf(model: Any) -> bool:
    return hasattr(model, "config") and hasattr(model, "save_pretrained") and hasattr(model.config, "to_dict")


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
    format: str = "hf",  # noqa: A002 - the option's documented name
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
        format: ``"hf"`` (default: the model's own config, with ``secateurs.json`` for per-layer sizes) or
            ``"decilm"``: a Llama-family decoder as a Nemotron-NAS / DeciLM checkpoint (``block_configs``: per-layer
            KV groups, FFN widths and no-op sublayers), which serving engines load natively
            (:mod:`secateurs.backends.decilm`); what that format cannot express is refused before anything is
            written.

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
    if format not in SAVE_FORMATS:
        raise CheckpointError(f"unknown checkpoint format {format!r}; choose one of {', '.join(SAVE_FORMATS)}")
    out = Path(path)
    if out.exists() and not overwrite:
        raise CheckpointError(f"output folder '{out}' exists; pass overwrite=True to replace it")
    deci = decilm_layout(model) if format == "decilm" else None  # refused here, before anything is written
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
            if deci is not None:
                save_file(decilm_state(model, deci), str(tmp / "model.safetensors"), metadata={"format": "pt"})
            elif expert_layout == "per-expert":
                save_file(per_expert, str(tmp / "model.safetensors"), metadata={"format": "pt"})
                layout.manifest["expert_layout"] = "per-expert"
            else:
                save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        except SafetensorError as exc:  # a full disk while writing, for one: not an OSError
            raise OSError(str(exc)) from exc
        if deci is not None:  # the format describes itself: no secateurs.json
            (tmp / "config.json").write_text(json.dumps(deci.config, indent=2, sort_keys=True, default=str))
            (tmp / CONFIG_FILE).write_text(CONFIG_CODE)
        else:
            config_out = copy.copy(layout.config)
            if not getattr(config_out, "architectures", None):  # as Hugging Face's own save_pretrained records it
                config_out.architectures = [type(model).__name__]
            config_out.save_pretrained(tmp)
            (tmp / MANIFEST).write_text(json.dumps(layout.manifest, indent=1, sort_keys=True))
        generation: Any = getattr(model, "generation_config", None)
        if generation is not None and hasattr(generation, "save_pretrained"):
            generation.save_pretrained(tmp)
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
    return SaveResult(out, layout.plain_loadable and deci is None, layout.changed_tensors)


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


