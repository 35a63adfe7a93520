"""The Nemotron-NAS / DeciLM checkpoint format: per-layer sizes that serving engines load natively.

A DeciLM ``config.json`` (``architectures: ["DeciLMForCausalLM"]``, ``model_type: "nemotron-nas"``) is a Llama
config whose ``block_configs`` hold one entry per layer: ``attention: {n_heads_in_group, no_op,
replace_with_linear}`` and ``ffn: {intermediate_size, no_op, replace_with_linear}``. The query heads
(``num_attention_heads``), ``head_dim`` and ``hidden_size`` are global; a layer has ``num_attention_heads /
n_heads_in_group`` KV heads, its own FFN width, and may skip its attention or its MLP (``no_op``: neither the
sublayer nor its norm is stored). Weight names are Llama's.

:func:`decilm_layout` checks that a pruned Llama-family model fits the format, naming the layer and the field
when it does not (per-layer query heads, a KV count that does not divide them, factorised layers, biases the
format has no field for); :func:`decilm_base` turns such a config back into the Llama config and the recorded
structure :func:`secateurs.load_pretrained` builds.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from secateurs.errors import CheckpointError
from secateurs.modeling.layers import ZeroSublayer

__all__ = ["CONFIG_CODE", "CONFIG_FILE", "DECILM_ARCHITECTURES", "DeciLayout", "check_family", "decilm_base",
           "decilm_layout", "is_decilm"]

DECILM_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
"""The families written as DeciLM: Llama-style decoders (RMSNorm, SwiGLU MLP, rotary GQA attention, no biases)."""

MODEL_TYPE = "nemotron-nas"
CONFIG_FILE = "configuration_decilm.py"
CONFIG_CODE = '''"""The DeciLM / Nemotron-NAS config for transformers' AutoConfig (written by secateurs next to the weights).

block_configs entries become objects with attributes (block.attention.no_op, block.ffn.intermediate_size), as
the loaders of this format read them. The query heads are head_dim wide and need not divide hidden_size.
"""

from transformers import LlamaConfig


def _divisor(heads, hidden):
    """The largest head count up to ``heads`` that divides ``hidden`` (what LlamaConfig's own check accepts)."""
    return next(h for h in range(heads, 0, -1) if hidden % h == 0)


class _Fields:
    def __init__(self, fields):
        self.__dict__.update(fields)

    def to_dict(self):
        return dict(self.__dict__)


class _Block:
    def __init__(self, entry):
        self.attention = _Fields(entry["attention"])
        self.ffn = _Fields(entry["ffn"])

    def to_dict(self):
        return {"attention": self.attention.to_dict(), "ffn": self.ffn.to_dict()}


class DeciLMConfig(LlamaConfig):
    model_type = "nemotron-nas"

    def __init__(self, block_configs=None, **kwargs):
        self.block_configs = [b if isinstance(b, _Block) else _Block(b) for b in block_configs or []]
        heads, hidden = kwargs.get("num_attention_heads"), kwargs.get("hidden_size")
        if heads and hidden:
            kwargs["num_attention_heads"] = _divisor(heads, hidden)
        super().__init__(**kwargs)
        if heads:
            object.__setattr__(self, "num_attention_heads", heads)

    def validate(self):
        heads = self.num_attention_heads
        object.__setattr__(self, "num_attention_heads", _divisor(heads, self.hidden_size))
        try:
            super().validate()
        finally:
            object.__setattr__(self, "num_attention_heads", heads)

    def to_dict(self):
        out = super().to_dict()
        out["block_configs"] = [b.to_dict() for b in self.block_configs]
        return out
'''
"""The format's config class for transformers (``AutoConfig`` with ``trust_remote_code``), as the format's own
checkpoints ship one: engines that read ``block_configs`` through it get attribute access. secateurs' own
reader does not run it (it reads ``config.json``)."""
_DROPPED = ("num_key_value_heads", "intermediate_size", "architectures", "model_type", "auto_map", "sliding_window",
            "max_window_layers", "use_sliding_window", "layer_types", "transformers_version")


@dataclasses.dataclass(frozen=True)
class DeciLayout:
    """What a DeciLM folder holds for a model: its config (a dict) and the names of the tensors not stored."""

    config: dict[str, Any]
    skipped: tuple[str, ...]


def is_decilm(config: dict[str, Any]) -> bool:
    """Whether a ``config.json`` (as a dict) is in the DeciLM / Nemotron-NAS format."""
    return config.get("model_type") == MODEL_TYPE or "DeciLMForCausalLM" in (config.get("architectures") or ())


def _refuse(where: str, field: str, why: str) -> CheckpointError:
    return CheckpointError(f"format='decilm' (--format decilm) cannot express {where}: {field} {why}; save it with "
                           "format='hf' (read by secateurs.load_pretrained)")


def check_family(model: nn.Module) -> None:
    """Refuse a model whose family the format does not cover (before any pruning work is spent on it).

    Raises:
        CheckpointError: Naming the architecture and the ones covered.

    """
    arch = type(model).__name__
    if arch not in DECILM_ARCHITECTURES:
        raise _refuse(arch, "the architecture", f"is not one the format covers ({', '.join(DECILM_ARCHITECTURES)})")


def decilm_layout(model: nn.Module) -> DeciLayout:
    """The DeciLM config of ``model`` and the state-dict names the format does not store.

    Raises:
        CheckpointError: The model is not a Llama-family decoder, or its pruning is not expressible (the
            message names the layer and the field).

    """
    check_family(model)
    arch = type(model).__name__
    cfg: Any = model.config
    if getattr(cfg, "sliding_window", None) is not None and arch == "MistralForCausalLM":
        raise _refuse(arch, "sliding_window", "has no DeciLM field (its attention is global)")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(cfg, flag, False):
            raise _refuse(arch, flag, "is set; the format's Llama layers have no biases")
    base: Any = model.get_submodule("model")
    heads: int | None = None
    head_dim: int | None = None
    blocks: list[dict[str, Any]] = []
    skipped: list[str] = []
    for i, layer in enumerate(base.layers):
        prefix = f"model.layers.{i}."
        attn, mlp = layer.self_attn, layer.mlp
        entry: dict[str, Any] = {}
        if isinstance(attn, ZeroSublayer):
            entry["attention"] = {"no_op": True, "replace_with_linear": False, "n_heads_in_group": None}
            skipped += [prefix + "input_layernorm.weight"]
        else:
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                if type(getattr(attn, name)) is not nn.Linear:
                    raise _refuse(f"layer {i}", f"self_attn.{name}", f"is a {type(getattr(attn, name)).__name__}, "
                                  "not a linear layer")
            dim = int(attn.head_dim)
            q = attn.q_proj.out_features // dim
            kv = attn.k_proj.out_features // dim
            if heads is None:
                heads, head_dim = q, dim
            if q != heads:
                raise _refuse(f"layer {i}", "num_attention_heads", f"is global in the format: this layer has {q} "
                              f"query heads, an earlier one {heads} (prune KV groups or heads uniformly)")
            if dim != head_dim:
                raise _refuse(f"layer {i}", "head_dim", f"is global: {dim} here, {head_dim} before")
            if kv < 1 or q % kv:
                raise _refuse(f"layer {i}", "attention.n_heads_in_group", f"must divide {q} query heads by {kv} "
                              "KV heads")
            entry["attention"] = {"no_op": False, "replace_with_linear": False, "n_heads_in_group": q // kv}
        if isinstance(mlp, ZeroSublayer):
            entry["ffn"] = {"no_op": True, "replace_with_linear": False, "intermediate_size": None}
            skipped += [prefix + "post_attention_layernorm.weight"]
        else:
            for name in ("gate_proj", "up_proj", "down_proj"):
                if type(getattr(mlp, name)) is not nn.Linear:
                    raise _refuse(f"layer {i}", f"mlp.{name}", f"is a {type(getattr(mlp, name)).__name__}, not a "
                                  "linear layer")
            entry["ffn"] = {"no_op": False, "replace_with_linear": False,
                            "intermediate_size": int(mlp.up_proj.out_features)}
        blocks.append(entry)
    hidden = int(base.embed_tokens.embedding_dim)
    out = {k: v for k, v in cfg.to_dict().items() if k not in _DROPPED}
    out.update({"architectures": ["DeciLMForCausalLM"], "model_type": MODEL_TYPE, "hidden_size": hidden,
                "num_hidden_layers": len(blocks), "block_configs": blocks,
                "auto_map": {"AutoConfig": f"{CONFIG_FILE[:-3]}.DeciLMConfig"}})
    if heads is not None:
        out.update({"num_attention_heads": heads, "head_dim": head_dim})
    return DeciLayout(out, tuple(skipped))


def decilm_state(model: nn.Module, layout: DeciLayout) -> dict[str, torch.Tensor]:
    """The tensors a DeciLM folder stores: the state dict without the no-op sublayers' norms, tied ones once."""
    seen: set[int] = set()
    state: dict[str, torch.Tensor] = {}
    skipped = set(layout.skipped)
    for name, tensor in model.state_dict().items():
        if name in skipped or tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        state[name] = tensor.contiguous()
    return state


def decilm_base(config: dict[str, Any], where: str) -> tuple[Any, dict[str, Any], set[str]]:
    """What :func:`secateurs.load_pretrained` builds for a DeciLM ``config.json``.

    The Llama config, the recorded structure (a ``secateurs.json``-style manifest) and the tensor names the
    folder may lack (the norms of no-op sublayers).

    Raises:
        CheckpointError: A layer the format allows but this reader does not build (``replace_with_linear``, an
            ``ffn_mult`` instead of ``intermediate_size``) or malformed entries; names the layer.

    """
    from transformers import LlamaConfig

    blocks = config.get("block_configs")
    if not isinstance(blocks, list) or not blocks:
        raise CheckpointError(f"'{where}': a DeciLM config needs a non-empty block_configs list")
    heads = int(config.get("num_attention_heads") or 1)
    hidden = int(config["hidden_size"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    groups: list[int | None] = []
    widths: list[int | None] = []
    for i, block in enumerate(blocks):
        try:
            attn, ffn = block["attention"], block["ffn"]
        except (KeyError, TypeError) as exc:
            raise CheckpointError(f"'{where}': block_configs[{i}] needs 'attention' and 'ffn' entries") from exc
        for what, entry in (("attention", attn), ("ffn", ffn)):
            if entry.get("replace_with_linear"):
                raise CheckpointError(f"'{where}': block_configs[{i}].{what}.replace_with_linear is not supported "
                                      "by secateurs.load_pretrained")
        if attn.get("no_op"):
            groups.append(None)
        else:
            g = attn.get("n_heads_in_group")
            if not isinstance(g, int) or g < 1 or heads % g:
                raise CheckpointError(f"'{where}': block_configs[{i}].attention.n_heads_in_group={g!r} does not "
                                      f"divide num_attention_heads={heads}")
            groups.append(g)
        if ffn.get("no_op"):
            widths.append(None)
        else:
            width = ffn.get("intermediate_size")
            if not isinstance(width, int) or width < 1:
                raise CheckpointError(f"'{where}': block_configs[{i}].ffn needs an integer intermediate_size "
                                      f"(got {width!r}; ffn_mult is not supported)")
            widths.append(width)
    first_w = next((w for w in widths if w is not None), 1)
    fields = {k: v for k, v in config.items() if k not in (*_DROPPED, "block_configs")}
    # transformers' LlamaConfig wants hidden_size a multiple of its head count, which a pruned model with an
    # explicit head_dim need not be (6 heads of 16 in a 128-wide model): the config gets a head count it accepts
    # and every attention its real projections below (the forward reads the head count from their sizes)
    stand_in = next(h for h in range(heads, 0, -1) if hidden % h == 0)
    llama = LlamaConfig(**{**fields, "num_attention_heads": stand_in, "num_key_value_heads": stand_in,
                           "intermediate_size": first_w, "num_hidden_layers": len(blocks), "head_dim": head_dim})
    shapes: dict[str, list[int]] = {}
    attributes: dict[str, dict[str, Any]] = {}
    zeroed: dict[str, int] = {}
    absent: set[str] = set()
    for i, (g, width) in enumerate(zip(groups, widths, strict=True)):
        prefix = f"model.layers.{i}."
        if g is None:
            zeroed[prefix + "self_attn"] = 1  # Llama's attention returns (hidden, weights)
            absent.add(prefix + "input_layernorm.weight")
        else:
            kv = heads // g
            for name, rows, cols in (("q_proj", heads * head_dim, hidden), ("k_proj", kv * head_dim, hidden),
                                     ("v_proj", kv * head_dim, hidden), ("o_proj", hidden, heads * head_dim)):
                shapes[f"{prefix}self_attn.{name}.weight"] = [rows, cols]
                attributes[f"{prefix}self_attn.{name}"] = {"out_features": rows, "in_features": cols}
            attributes[prefix + "self_attn"] = {"num_key_value_groups": g}
        if width is None:
            zeroed[prefix + "mlp"] = 0
            absent.add(prefix + "post_attention_layernorm.weight")
        else:
            for name, rows, cols in (("gate_proj", width, hidden), ("up_proj", width, hidden),
                                     ("down_proj", hidden, width)):
                shapes[f"{prefix}mlp.{name}.weight"] = [rows, cols]
                attributes[f"{prefix}mlp.{name}"] = {"out_features": rows, "in_features": cols}
            attributes[prefix + "mlp"] = {"intermediate_size": width}
    manifest = {"architecture": "LlamaForCausalLM", "zeroed": zeroed, "shapes": shapes, "attributes": attributes}
    return llama, manifest, absent
