import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Robustness runs (a test's claim must not hang on the thread count, denormals or the seed):
#   OMP_NUM_THREADS=1 SECATEURS_TEST_SEED=1 SECATEURS_FLUSH_DENORMAL=1 python -m pytest -q
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
if os.environ.get("SECATEURS_FLUSH_DENORMAL") == "1":
    torch.set_flush_denormal(True)
SEED = int(os.environ.get("SECATEURS_TEST_SEED", "0"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(SEED)
    yield


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    """A two-layer GQA Llama checkpoint folder from a config (tests must not change it)."""
    import transformers as tf

    import secateurs as sc

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=120, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    path = tmp_path_factory.mktemp("ckpt") / "llama"
    sc.save_pretrained(tf.LlamaForCausalLM(cfg).eval(), path)
    return path
