"""Small real architectures built from Hugging Face configs (random weights, no downloads)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import transformers as tf

SEQ = 12


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, SEQ))


def bert() -> tuple[torch.nn.Module, Any]:
    cfg = tf.BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=96, max_position_embeddings=40)
    ids = _ids(120)
    return tf.BertModel(cfg), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def distilbert() -> tuple[torch.nn.Module, Any]:
    cfg = tf.DistilBertConfig(vocab_size=120, dim=64, n_layers=2, n_heads=4, hidden_dim=96, max_position_embeddings=40)
    ids = _ids(120)
    return tf.DistilBertModel(cfg), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def roberta() -> tuple[torch.nn.Module, Any]:
    cfg = tf.RobertaConfig(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=96, max_position_embeddings=40)
    ids = _ids(118) + 2  # avoid the padding id (1) so position ids stay in range
    return tf.RobertaModel(cfg), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def gpt2() -> tuple[torch.nn.Module, Any]:
    cfg = tf.GPT2Config(vocab_size=120, n_embd=64, n_layer=2, n_head=4, n_positions=40, bos_token_id=0,
                        eos_token_id=0)
    return tf.GPT2LMHeadModel(cfg), {"input_ids": _ids(120)}


def llama() -> tuple[torch.nn.Module, Any]:
    cfg = tf.LlamaConfig(vocab_size=120, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=40)
    return tf.LlamaForCausalLM(cfg), {"input_ids": _ids(120)}


def qwen2() -> tuple[torch.nn.Module, Any]:
    cfg = tf.Qwen2Config(vocab_size=120, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=40)
    return tf.Qwen2ForCausalLM(cfg), {"input_ids": _ids(120)}


def mistral() -> tuple[torch.nn.Module, Any]:
    cfg = tf.MistralConfig(vocab_size=120, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=24, max_position_embeddings=40,
                           sliding_window=8)
    return tf.MistralForCausalLM(cfg), {"input_ids": _ids(120)}


def mixtral() -> tuple[torch.nn.Module, Any]:
    cfg = tf.MixtralConfig(vocab_size=120, hidden_size=64, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                           max_position_embeddings=40)
    return tf.MixtralForCausalLM(cfg), {"input_ids": _ids(120)}


def qwen2_moe() -> tuple[torch.nn.Module, Any]:
    cfg = tf.Qwen2MoeConfig(vocab_size=120, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                            shared_expert_intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, num_experts=6, num_experts_per_tok=2, max_position_embeddings=40)
    return tf.Qwen2MoeForCausalLM(cfg), {"input_ids": _ids(120)}


def vit() -> tuple[torch.nn.Module, Any]:
    cfg = tf.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                       image_size=32, patch_size=8, num_labels=10)
    return tf.ViTForImageClassification(cfg), (torch.randn(2, 3, 32, 32),)


def swin() -> tuple[torch.nn.Module, Any]:
    cfg = tf.SwinConfig(image_size=32, patch_size=4, embed_dim=24, depths=[1, 1], num_heads=[2, 4], window_size=4,
                        num_labels=10)
    return tf.SwinForImageClassification(cfg), (torch.randn(2, 3, 32, 32),)


def resnet() -> tuple[torch.nn.Module, Any]:
    cfg = tf.ResNetConfig(embedding_size=16, hidden_sizes=[24, 48], depths=[1, 1], num_labels=10)
    return tf.ResNetForImageClassification(cfg), (torch.randn(2, 3, 32, 32),)


def convnext() -> tuple[torch.nn.Module, Any]:
    cfg = tf.ConvNextConfig(num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], num_labels=10)
    return tf.ConvNextForImageClassification(cfg), (torch.randn(2, 3, 32, 32),)


def mobilenet_v2() -> tuple[torch.nn.Module, Any]:
    cfg = tf.MobileNetV2Config(image_size=32, depth_multiplier=0.35, num_labels=10)
    return tf.MobileNetV2ForImageClassification(cfg), (torch.randn(2, 3, 32, 32),)


ZOO: dict[str, Callable[[], tuple[torch.nn.Module, Any]]] = {
    "bert": bert, "distilbert": distilbert, "roberta": roberta, "gpt2": gpt2, "llama": llama, "qwen2": qwen2, "mistral": mistral, "vit": vit, "swin": swin, "resnet": resnet,
    "convnext": convnext, "mobilenet_v2": mobilenet_v2,
}


def build(name: str) -> tuple[torch.nn.Module, Any]:
    torch.manual_seed(0)
    model, inputs = ZOO[name]()
    model.eval()
    for mod in model.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-1, 1)
            mod.running_var.uniform_(0.5, 2)
    return model, inputs
