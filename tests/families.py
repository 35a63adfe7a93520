"""The coverage zoo: one small model per family users bring, from configs (random weights, no downloads).

``FAMILIES`` maps a family name to how to build it. ``tests/test_coverage.py`` runs the oracles on every one
(bit-identical at ratio 0; at ratio 0.3 at least 5% of the parameters removed, output shape kept, the kinds of
``PRUNES`` pruned, ONNX Runtime equal to PyTorch; transformers models also reload equal from the checkpoint
``save_pretrained`` writes); ``tools/zoo.py`` runs the same and prints the table of docs/coverage.md.
torchvision and timm families need those packages (they skip without them).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import transformers as tf
from torch import nn

SEQ = 12
VOCAB = 128
_TORCH = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])


@dataclasses.dataclass(frozen=True)
class Family:
    """One family of the coverage zoo.

    Attributes:
        source: ``transformers``, ``torchvision`` or ``timm`` (the package the model comes from).
        kind: What it is (``encoder``, ``decoder``, ``moe``, ``vision``, ...), for the table.
        build: Returns the model (random weights) and its example inputs.
        onnx: Why ONNX Runtime parity is not checked for this family, or None when it is.
        exporter: The ``export_onnx`` exporter that handles it.

    """

    source: str
    kind: str
    build: Callable[[], tuple[nn.Module, Any]]
    onnx: str | None = None
    exporter: str = "dynamo"


def _ids(vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(3, vocab, (2, SEQ))


def _text(ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    ids = _ids() if ids is None else ids
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _image(size: int = 32) -> tuple[torch.Tensor]:
    return (torch.randn(2, 3, size, size),)


_DECODER = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_ENCODER = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                max_position_embeddings=64, pad_token_id=0)


def _decoder(config: type, model: type, **kw: Any) -> Callable[[], tuple[nn.Module, Any]]:
    return lambda: (model(config(**{**_DECODER, **kw})), {"input_ids": _ids()})


def _encoder(config: type, model: type, **kw: Any) -> Callable[[], tuple[nn.Module, Any]]:
    return lambda: (model(config(**{**_ENCODER, **kw})), _text())


def _vision(config: type, model: type, size: int = 32, **kw: Any) -> Callable[[], tuple[nn.Module, Any]]:
    return lambda: (model(config(**kw)), _image(size))


def _seq2seq(config: type, model: type, **kw: Any) -> Callable[[], tuple[nn.Module, Any]]:
    def build() -> tuple[nn.Module, Any]:
        ids = _ids()
        return model(config(**kw)), {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                     "decoder_input_ids": _ids()[:, :6]}
    return build


_BART = dict(vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
             decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=64,
             pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=2)
_T5 = dict(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
           relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
_MOE = dict(num_local_experts=4, num_experts_per_tok=2)


def _whisper() -> tuple[nn.Module, Any]:
    cfg = tf.WhisperConfig(vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=2,
                           encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                           decoder_ffn_dim=128, num_mel_bins=16, max_source_positions=16, max_target_positions=32,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
                           suppress_tokens=None, begin_suppress_tokens=None)
    return tf.WhisperForConditionalGeneration(cfg), {"input_features": torch.randn(2, 16, 32),
                                                      "decoder_input_ids": _ids()[:, :6]}


def _wav2vec2(config: type, model: type) -> Callable[[], tuple[nn.Module, Any]]:
    def build() -> tuple[nn.Module, Any]:
        cfg = config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                     conv_dim=(32, 32), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
                     num_conv_pos_embedding_groups=4, vocab_size=VOCAB)
        return model(cfg), (torch.randn(2, 800),)
    return build


def _clip_text() -> tuple[nn.Module, Any]:
    cfg = tf.CLIPTextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=32, projection_dim=32)
    return tf.CLIPTextModelWithProjection(cfg), {"input_ids": _ids()}


def _clip_vision() -> tuple[nn.Module, Any]:
    cfg = tf.CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=32)
    return tf.CLIPVisionModelWithProjection(cfg), _image()


def _siglip_vision() -> tuple[nn.Module, Any]:
    cfg = tf.SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                image_size=32, patch_size=8)
    return tf.SiglipVisionModel(cfg), _image()


def _mamba() -> tuple[nn.Module, Any]:
    cfg = tf.MambaConfig(vocab_size=VOCAB, hidden_size=64, state_size=8, num_hidden_layers=2, expand=2, conv_kernel=4,
                         use_mambapy=False)
    return tf.MambaForCausalLM(cfg), {"input_ids": _ids()}


TRANSFORMERS: dict[str, Family] = {
    # encoders
    "bert": Family("transformers", "encoder", _encoder(tf.BertConfig, tf.BertModel)),
    "distilbert": Family("transformers", "encoder", lambda: (tf.DistilBertModel(tf.DistilBertConfig(
        vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, hidden_dim=128, max_position_embeddings=64)), _text())),
    "roberta": Family("transformers", "encoder", _encoder(tf.RobertaConfig, tf.RobertaModel, pad_token_id=1)),
    "albert": Family("transformers", "encoder", _encoder(tf.AlbertConfig, tf.AlbertModel, embedding_size=32)),
    "electra": Family("transformers", "encoder", _encoder(tf.ElectraConfig, tf.ElectraModel, embedding_size=32)),
    "deberta_v2": Family("transformers", "encoder", _encoder(tf.DebertaV2Config, tf.DebertaV2Model)),
    "xlm_roberta": Family("transformers", "encoder", _encoder(tf.XLMRobertaConfig, tf.XLMRobertaModel,
                                                              pad_token_id=1)),
    "modernbert": Family("transformers", "encoder", _encoder(tf.ModernBertConfig, tf.ModernBertModel,
                                                             global_attn_every_n_layers=2, local_attention=8)),
    "mpnet": Family("transformers", "encoder", _encoder(tf.MPNetConfig, tf.MPNetModel, pad_token_id=1)),
    # decoders
    "gpt2": Family("transformers", "decoder", lambda: (tf.GPT2LMHeadModel(tf.GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64)), {"input_ids": _ids()})),
    "llama": Family("transformers", "decoder", _decoder(tf.LlamaConfig, tf.LlamaForCausalLM)),
    "qwen2": Family("transformers", "decoder", _decoder(tf.Qwen2Config, tf.Qwen2ForCausalLM)),
    "qwen3": Family("transformers", "decoder", _decoder(tf.Qwen3Config, tf.Qwen3ForCausalLM, head_dim=16)),
    "mistral": Family("transformers", "decoder", _decoder(tf.MistralConfig, tf.MistralForCausalLM, sliding_window=8)),
    "gemma": Family("transformers", "decoder", _decoder(tf.GemmaConfig, tf.GemmaForCausalLM, head_dim=16)),
    "gemma2": Family("transformers", "decoder", _decoder(tf.Gemma2Config, tf.Gemma2ForCausalLM, head_dim=16,
                                                         sliding_window=8)),
    "gemma3": Family("transformers", "decoder", _decoder(tf.Gemma3TextConfig, tf.Gemma3ForCausalLM, head_dim=16,
                                                         sliding_window=8)),
    "phi": Family("transformers", "decoder", _decoder(tf.PhiConfig, tf.PhiForCausalLM)),
    "phi3": Family("transformers", "decoder", _decoder(tf.Phi3Config, tf.Phi3ForCausalLM)),
    "olmo2": Family("transformers", "decoder", _decoder(tf.Olmo2Config, tf.Olmo2ForCausalLM)),
    "stablelm": Family("transformers", "decoder", _decoder(tf.StableLmConfig, tf.StableLmForCausalLM)),
    "gpt_neox": Family("transformers", "decoder", _decoder(tf.GPTNeoXConfig, tf.GPTNeoXForCausalLM)),
    "falcon": Family("transformers", "decoder", _decoder(tf.FalconConfig, tf.FalconForCausalLM, new_decoder_architecture=True,
                                                         num_kv_heads=2)),
    "opt": Family("transformers", "decoder", _decoder(tf.OPTConfig, tf.OPTForCausalLM, ffn_dim=128,
                                                      word_embed_proj_dim=64)),
    "bloom": Family("transformers", "decoder", lambda: (tf.BloomForCausalLM(tf.BloomConfig(
        vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4)), {"input_ids": _ids()})),
    "granite": Family("transformers", "decoder", _decoder(tf.GraniteConfig, tf.GraniteForCausalLM)),
    "cohere": Family("transformers", "decoder", _decoder(tf.CohereConfig, tf.CohereForCausalLM)),
    "starcoder2": Family("transformers", "decoder", _decoder(tf.Starcoder2Config, tf.Starcoder2ForCausalLM,
                                                             sliding_window=None)),
    "smollm3": Family("transformers", "decoder", _decoder(tf.SmolLM3Config, tf.SmolLM3ForCausalLM)),
    "glm4": Family("transformers", "decoder", _decoder(tf.Glm4Config, tf.Glm4ForCausalLM, head_dim=16)),
    # mixtures of experts
    "mixtral": Family("transformers", "moe", _decoder(tf.MixtralConfig, tf.MixtralForCausalLM, **_MOE)),
    "qwen2_moe": Family("transformers", "moe", _decoder(
        tf.Qwen2MoeConfig, tf.Qwen2MoeForCausalLM, moe_intermediate_size=32, shared_expert_intermediate_size=64,
        num_experts=4, num_experts_per_tok=2)),
    "qwen3_moe": Family("transformers", "moe", _decoder(
        tf.Qwen3MoeConfig, tf.Qwen3MoeForCausalLM, head_dim=16, moe_intermediate_size=32, num_experts=4,
        num_experts_per_tok=2)),
    "olmoe": Family("transformers", "moe", _decoder(tf.OlmoeConfig, tf.OlmoeForCausalLM, num_experts=4,
                                                    num_experts_per_tok=2)),
    "granitemoe": Family("transformers", "moe", _decoder(tf.GraniteMoeConfig, tf.GraniteMoeForCausalLM, **_MOE),
                         onnx=None if _TORCH >= (2, 14) else "torch.export of torch 2.13 fails on GraniteMoE's "
                                                             "routing (2.14 exports it)"),
    "gpt_oss": Family("transformers", "moe", _decoder(tf.GptOssConfig, tf.GptOssForCausalLM, head_dim=16,
                                                      sliding_window=8, **_MOE,
                                                      layer_types=["sliding_attention", "full_attention"])),
    # encoder-decoders, audio
    "t5": Family("transformers", "encoder-decoder", _seq2seq(tf.T5Config, tf.T5ForConditionalGeneration, **_T5)),
    "bart": Family("transformers", "encoder-decoder", _seq2seq(tf.BartConfig, tf.BartForConditionalGeneration,
                                                               **_BART)),
    "marian": Family("transformers", "encoder-decoder", _seq2seq(tf.MarianConfig, tf.MarianMTModel, **_BART)),
    "whisper": Family("transformers", "audio", _whisper),
    "wav2vec2": Family("transformers", "audio", _wav2vec2(tf.Wav2Vec2Config, tf.Wav2Vec2Model)),
    "hubert": Family("transformers", "audio", _wav2vec2(tf.HubertConfig, tf.HubertModel)),
    # vision, multimodal towers, state space
    "vit": Family("transformers", "vision", _vision(tf.ViTConfig, tf.ViTForImageClassification, hidden_size=64,
                                                    num_hidden_layers=2, num_attention_heads=4,
                                                    intermediate_size=128, image_size=32, patch_size=8,
                                                    num_labels=10)),
    "deit": Family("transformers", "vision", _vision(tf.DeiTConfig, tf.DeiTForImageClassification, hidden_size=64,
                                                     num_hidden_layers=2, num_attention_heads=4,
                                                     intermediate_size=128, image_size=32, patch_size=8,
                                                     num_labels=10)),
    "dinov2": Family("transformers", "vision", _vision(tf.Dinov2Config, tf.Dinov2Model, hidden_size=64,
                                                       num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2,
                                                       image_size=32, patch_size=8)),
    "swin": Family("transformers", "vision", _vision(tf.SwinConfig, tf.SwinForImageClassification, image_size=32,
                                                     patch_size=4, embed_dim=32, depths=[2, 2], num_heads=[2, 4],
                                                     window_size=4, num_labels=10)),
    "convnext": Family("transformers", "vision", _vision(tf.ConvNextConfig, tf.ConvNextForImageClassification,
                                                         num_stages=2, hidden_sizes=[32, 64], depths=[2, 2],
                                                         num_labels=10)),
    "resnet": Family("transformers", "vision", _vision(tf.ResNetConfig, tf.ResNetForImageClassification,
                                                       embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1],
                                                       num_labels=10)),
    "segformer": Family("transformers", "vision", _vision(tf.SegformerConfig, tf.SegformerForSemanticSegmentation,
                                                          num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1],
                                                          hidden_sizes=[32, 64], num_attention_heads=[1, 2],
                                                          decoder_hidden_size=64, patch_sizes=[7, 3],
                                                          strides=[4, 2], mlp_ratios=[2, 2], num_labels=5)),
    "clip_text": Family("transformers", "multimodal", _clip_text),
    "clip_vision": Family("transformers", "multimodal", _clip_vision),
    "siglip_vision": Family("transformers", "multimodal", _siglip_vision),
    "mamba": Family("transformers", "state-space", _mamba),
}


def _torchvision(name: str, size: int = 64, **kw: Any) -> Callable[[], tuple[nn.Module, Any]]:
    def build() -> tuple[nn.Module, Any]:
        import torchvision

        return torchvision.models.get_model(name, weights=None, **kw), _image(size)
    return build


def _tv_video() -> tuple[nn.Module, Any]:
    import torchvision

    return torchvision.models.video.r3d_18(weights=None, num_classes=10), (torch.randn(1, 3, 4, 32, 32),)


def _tv_vit() -> tuple[nn.Module, Any]:
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128,
                             num_classes=10), _image(32)


def _tv_swin() -> tuple[nn.Module, Any]:
    from torchvision.models.swin_transformer import SwinTransformer

    return SwinTransformer(patch_size=[4, 4], embed_dim=32, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4],
                           num_classes=10), _image(32)


TORCHVISION: dict[str, Family] = {
    "tv_resnet18": Family("torchvision", "vision", _torchvision("resnet18", num_classes=10)),
    "tv_mobilenet_v3": Family("torchvision", "vision", _torchvision("mobilenet_v3_small", num_classes=10)),
    "tv_efficientnet_b0": Family("torchvision", "vision", _torchvision("efficientnet_b0", num_classes=10)),
    "tv_convnext_tiny": Family("torchvision", "vision", _torchvision("convnext_tiny", num_classes=10)),
    "tv_regnet": Family("torchvision", "vision", _torchvision("regnet_y_400mf", num_classes=10)),
    "tv_densenet121": Family("torchvision", "vision", _torchvision("densenet121", num_classes=10)),
    "tv_shufflenet_v2": Family("torchvision", "vision", _torchvision("shufflenet_v2_x0_5", num_classes=10)),
    "tv_vit": Family("torchvision", "vision", _tv_vit),
    "tv_swin": Family("torchvision", "vision", _tv_swin),
    "tv_deeplabv3": Family("torchvision", "segmentation", _torchvision("deeplabv3_mobilenet_v3_large", num_classes=5,
                                                                       weights_backbone=None, aux_loss=False)),
    "tv_lraspp": Family("torchvision", "segmentation", _torchvision("lraspp_mobilenet_v3_large", num_classes=5,
                                                                    weights_backbone=None)),
    "tv_r3d_18": Family("torchvision", "video", _tv_video),
}


def _timm(name: str, size: int = 32, **kw: Any) -> Callable[[], tuple[nn.Module, Any]]:
    def build() -> tuple[nn.Module, Any]:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=10, **kw), _image(size)
    return build


def _mixer(resmlp: bool) -> Callable[[], tuple[nn.Module, Any]]:
    def build() -> tuple[nn.Module, Any]:
        from timm.models import mlp_mixer

        extra: dict[str, Any] = dict(block_layer=mlp_mixer.ResBlock, norm_layer=mlp_mixer.Affine,
                                     mlp_ratio=4) if resmlp else {}
        return mlp_mixer.MlpMixer(num_classes=10, img_size=32, patch_size=8, num_blocks=2, embed_dim=64,
                                  **extra), _image(32)
    return build


_TIMM_VIT = dict(img_size=32, patch_size=8, depth=2)
TIMM: dict[str, Family] = {
    "timm_vit": Family("timm", "vision", _timm("vit_tiny_patch16_224", **_TIMM_VIT)),
    "timm_deit": Family("timm", "vision", _timm("deit_tiny_patch16_224", **_TIMM_VIT)),
    "timm_eva02": Family("timm", "vision", _timm("eva02_tiny_patch14_224", size=28, img_size=28, patch_size=14,
                                                 depth=2)),
    "timm_swin": Family("timm", "vision", _timm("swin_tiny_patch4_window7_224", size=56, img_size=56, depths=(2, 2),
                                               embed_dim=32, num_heads=(2, 4))),
    "timm_levit": Family("timm", "hybrid", _timm("levit_128s", size=64, img_size=64)),
    "timm_mixer": Family("timm", "mlp-mixer", _mixer(resmlp=False)),
    "timm_resmlp": Family("timm", "mlp-mixer", _mixer(resmlp=True)),
    "timm_convnext": Family("timm", "vision", _timm("convnext_atto", size=64)),
    "timm_efficientnet": Family("timm", "vision", _timm("efficientnet_b0", size=64)),
    "timm_resnet": Family("timm", "vision", _timm("resnet18", size=64)),
    "timm_mobilenetv3": Family("timm", "vision", _timm("mobilenetv3_small_100", size=64)),
    "timm_regnet": Family("timm", "vision", _timm("regnety_002", size=64)),
    "timm_poolformer": Family("timm", "vision", _timm("poolformer_s12", size=64)),
    "timm_coatnet": Family("timm", "hybrid", _timm("coatnet_nano_rw_224", size=64, img_size=64)),
    "timm_fastvit": Family("timm", "hybrid", _timm("fastvit_t8", size=64)),
    "timm_edgenext": Family("timm", "hybrid", _timm("edgenext_xx_small", size=64)),
}

FAMILIES: dict[str, Family] = {**TRANSFORMERS, **TORCHVISION, **TIMM}

# The group kinds that must lose channels at ratio=0.3 (what the coverage table says each family prunes).
PRUNES: dict[str, tuple[str, ...]] = {
    "bert": ("ffn", "heads"), "distilbert": ("ffn", "heads"), "roberta": ("ffn", "heads"),
    "albert": ("ffn", "heads"), "electra": ("ffn", "heads"), "deberta_v2": ("ffn", "heads"),
    "xlm_roberta": ("ffn", "heads"), "modernbert": ("ffn", "heads"), "mpnet": ("ffn", "heads"),
    "gpt2": ("ffn", "heads"), "llama": ("ffn", "heads", "kv_groups"), "qwen2": ("ffn", "heads", "kv_groups"),
    "qwen3": ("ffn", "heads", "kv_groups"), "mistral": ("ffn", "heads", "kv_groups"),
    "gemma": ("ffn", "heads", "kv_groups"), "gemma2": ("ffn", "heads", "kv_groups"),
    "gemma3": ("ffn", "heads", "kv_groups"), "phi": ("ffn", "heads", "kv_groups"),
    "phi3": ("ffn", "heads", "kv_groups"), "olmo2": ("ffn",), "stablelm": ("ffn", "heads", "kv_groups"),
    "gpt_neox": ("ffn", "heads"), "falcon": ("ffn", "kv_groups"), "opt": ("ffn", "heads"), "bloom": ("ffn",),
    "granite": ("ffn", "heads", "kv_groups"), "cohere": ("ffn", "heads", "kv_groups"),
    "starcoder2": ("ffn", "heads", "kv_groups"), "smollm3": ("ffn", "heads", "kv_groups"),
    "glm4": ("ffn", "heads", "kv_groups"), "mixtral": ("ffn", "heads", "kv_groups"),
    "qwen2_moe": ("ffn", "heads", "kv_groups"), "qwen3_moe": ("ffn", "heads", "kv_groups"), "olmoe": ("ffn",),
    "granitemoe": ("ffn", "heads", "kv_groups"), "gpt_oss": ("ffn", "heads", "kv_groups"), "t5": ("ffn", "heads"),
    "bart": ("ffn", "heads"), "marian": ("ffn", "heads"), "whisper": ("channels", "ffn", "heads"),
    "wav2vec2": ("channels", "ffn", "heads"), "hubert": ("channels", "ffn", "heads"), "vit": ("ffn", "heads"),
    "deit": ("ffn", "heads"), "dinov2": ("ffn", "heads"), "swin": ("ffn", "heads"), "convnext": ("ffn",),
    "resnet": ("channels",), "clip_text": ("ffn", "heads"), "clip_vision": ("ffn", "heads"),
    "siglip_vision": ("ffn", "heads"), "mamba": ("channels",), "tv_resnet18": ("channels",),
    "tv_mobilenet_v3": ("channels", "ffn"), "tv_efficientnet_b0": ("channels",), "tv_convnext_tiny": ("ffn",),
    "tv_regnet": ("channels",), "tv_densenet121": ("channels",), "tv_shufflenet_v2": ("channels",),
    "tv_vit": ("ffn", "heads"), "tv_swin": ("ffn",), "tv_deeplabv3": ("channels",), "tv_lraspp": ("channels",),
    "tv_r3d_18": ("channels",), "timm_vit": ("ffn", "heads"), "timm_deit": ("ffn", "heads"), "timm_eva02": ("ffn",),
    "timm_swin": ("ffn", "heads"), "timm_levit": ("channels", "ffn"), "timm_mixer": ("ffn",),
    "timm_resmlp": ("ffn",), "timm_convnext": ("channels",), "timm_efficientnet": ("channels",),
    "timm_resnet": ("channels",), "timm_mobilenetv3": ("channels",), "timm_regnet": ("channels",),
    "timm_poolformer": ("channels",), "timm_coatnet": ("channels",), "timm_fastvit": ("channels",),
    "timm_edgenext": ("ffn",), "segformer": ("channels", "heads"),
}


def build(name: str) -> tuple[nn.Module, Any]:
    """Family ``name`` in eval mode with seeded random weights (BatchNorm statistics randomised)."""
    torch.manual_seed(0)
    model, inputs = FAMILIES[name].build()
    model.eval()
    for mod in model.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.running_mean is not None:
            mod.running_mean.uniform_(-1, 1)
            mod.running_var.uniform_(0.5, 2)
    return model, inputs


@dataclasses.dataclass
class Outcome:
    """What the oracles found for one family (see :func:`check`)."""

    name: str
    removed: float = 0.0  # fraction of parameters removed at ratio 0.3
    pruned: tuple[str, ...] = ()  # group kinds that lost channels
    frozen: dict[str, int] = dataclasses.field(default_factory=dict)  # reason (shortened) -> groups
    onnx_error: float | None = None  # ONNX Runtime vs PyTorch, max absolute error
    reload: str = ""  # transformers models: how the saved checkpoint reloads ("plain" from_pretrained / "secateurs")
    seconds: float = 0.0
    problems: list[str] = dataclasses.field(default_factory=list)


def _short(reason: str) -> str:
    for key in ("graph input", "graph output", "head_dim", "hidden size", "embedding rows", "same code as",
                "model's code", "indexed by", "constant tensor", "unsupported", "tensor factory"):
        if key in reason:
            return "code contradicts the plan" if key in ("same code as", "model's code") else key
    return reason.split(" at node")[0].split(" (")[0][:60]


def _output(out: Any) -> torch.Tensor:
    for key in ("logits", "last_hidden_state", "image_embeds", "text_embeds", "out"):
        value = out.get(key) if isinstance(out, dict) else getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value
    return next(t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor))


def _call(model: nn.Module, inputs: Any) -> torch.Tensor:
    with torch.no_grad():
        return _output(model(**inputs) if isinstance(inputs, dict) else model(*inputs))


def check(name: str, onnx_dir: str | None = None) -> Outcome:
    """Run the coverage oracles on family ``name``; ``onnx_dir`` also exports the pruned model and compares."""
    import time

    import secateurs as sc

    result = Outcome(name)
    start = time.perf_counter()
    model, inputs = build(name)
    ref = _call(model, inputs)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    zero = sc.prune(model, inputs, ratio=0.0)
    if not torch.equal(_call(model, inputs), ref) or zero.changes or any(
            not torch.equal(v, state[k]) for k, v in model.state_dict().items()):
        result.problems.append("ratio 0 is not bit-identical")
    report = sc.prune(model, inputs, ratio=0.3)
    out = _call(model, inputs)
    result.removed = 1 - report.params_after / report.params_before
    result.pruned = tuple(sorted({c.kind for c in report.changes}))
    for f in report.frozen:
        key = _short(f.reason)
        result.frozen[key] = result.frozen.get(key, 0) + 1
    if out.shape != ref.shape:
        result.problems.append(f"output shape {tuple(out.shape)} != {tuple(ref.shape)}")
    missing = set(PRUNES.get(name, ())) - set(result.pruned)
    if missing:
        result.problems.append(f"no {', '.join(sorted(missing))} group lost channels")
    if result.removed < 0.05:
        result.problems.append(f"only {100 * result.removed:.1f}% of the parameters removed")
    if onnx_dir is not None and FAMILIES[name].source == "transformers":
        from pathlib import Path

        saved = sc.save_pretrained(model, Path(onnx_dir) / f"{name}-pruned")
        back = sc.load_pretrained(saved.path).eval()
        if not torch.allclose(_call(back, inputs), out, rtol=1e-5, atol=1e-6):
            result.problems.append("the saved checkpoint reloads to a different model")
        result.reload = "plain" if saved.plain_loadable else "secateurs"
    if onnx_dir is not None and FAMILIES[name].onnx is None:
        from pathlib import Path

        from secateurs.backends.onnx import export_onnx

        exported = export_onnx(model, inputs, Path(onnx_dir) / f"{name}.onnx", exporter=FAMILIES[name].exporter)
        result.onnx_error = exported.max_abs_error
    result.seconds = time.perf_counter() - start
    return result
