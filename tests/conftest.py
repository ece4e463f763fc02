"""Shared fixtures: tiny random Hugging Face Llama checkpoints (the reference), and the default model."""
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import settings

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the method files live at the repo root

# Under CI every run draws the same examples, so a property never fails by chance on someone else's
# change; locally hypothesis explores new examples on every run.
settings.register_profile("ci", derandomize=True)
settings.load_profile("ci" if os.environ.get("CI") else "default")

# Tiny checkpoints written by transformers' save_pretrained, one per loader feature. Each is a dict of
# LlamaConfig overrides plus how to save it.
TINY = {
    "mha": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa_llama3": dict(num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}),
    "tied_head_dim": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=24, tie_word_embeddings=True),
    "sharded_linear": dict(num_attention_heads=4, num_key_value_heads=1, rope_scaling={
        "rope_type": "linear", "factor": 4.0}, _shard="30KB"),
    "bf16": dict(num_attention_heads=4, num_key_value_heads=2, _dtype=torch.bfloat16),
}


def make_tiny_checkpoint(folder: Path, seed: int = 0, **overrides):
    """Save a random HF LlamaForCausalLM with weights far from their init (norms included), so a mis-mapped
    tensor changes the logits."""
    from transformers import LlamaConfig, LlamaForCausalLM
    shard, dtype = overrides.pop("_shard", "10GB"), overrides.pop("_dtype", torch.float32)
    torch.manual_seed(seed)
    cfg = LlamaConfig(**{**dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, vocab_size=128,
                                max_position_embeddings=256, rms_norm_eps=1e-5), **overrides})
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.3 * torch.randn_like(p) if name.endswith("norm.weight") else 0.15 * torch.randn_like(p))
    model.to(dtype).save_pretrained(folder, max_shard_size=shard)
    return folder


def tiny_with_real_tokenizer(folder: Path, max_position_embeddings: int) -> Path:
    """A 4-layer random Llama that reads SmolLM2's tokenizer (fixture smollm2 puts it in the cache)."""
    from load_llama import smollm2_folder
    make_tiny_checkpoint(folder, vocab_size=49152, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=max_position_embeddings)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_folder() / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {name: make_tiny_checkpoint(root / name, **dict(kw)) for name, kw in TINY.items()}


@pytest.fixture(scope="session")
def smollm2():
    """The default model (downloaded and converted on first use), float32."""
    from load_llama import load_llama
    return load_llama("smollm2-135m")


from data import pydoc_text  # noqa: E402,F401  (the tests' English prose, 113K tokens)
