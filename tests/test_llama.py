"""The Llama in sharedllm.py: logits equal transformers' on the same checkpoint; RoPE; KV cache."""
import json

import pytest
import torch
from hypothesis import given, settings, strategies as st

from conftest import TINY, make_tiny_checkpoint
from load_llama import LoadError, load_llama
from sharedllm import Config, KVCache, Transformer, apply_rope, rope_cos_sin, rope_inv_freq


def hf_model(folder):
    from transformers import LlamaForCausalLM
    return LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.mark.parametrize("name", list(TINY))
def test_logits_match_transformers(tiny_checkpoints, name):
    folder = tiny_checkpoints[name]
    ours, reference = load_llama(folder)[0], hf_model(folder)
    assert ours.cfg.tie_embeddings == (name == "tied_head_dim")
    torch.manual_seed(0)
    tokens = torch.randint(0, 128, (2, 100))  # past original_max_position_embeddings=32 of the llama3 config
    with torch.no_grad():
        diff = (ours(tokens) - reference(tokens).logits).abs().max().item()
    assert diff <= 1e-4, f"{name}: max |logit diff| vs transformers = {diff:.2e}"


def test_legacy_rope_config_keys(tmp_path):
    """Official Llama 3 checkpoints write rope_theta + rope_scaling{"type"/"rope_type"}, not rope_parameters."""
    folder = make_tiny_checkpoint(tmp_path / "legacy", **dict(TINY["gqa_llama3"]))
    cfg = json.loads((folder / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = {"type": rope.pop("rope_type"), **rope}
    (folder / "config.json").write_text(json.dumps(cfg))
    model = load_llama(folder)[0]
    assert model.cfg.rope_theta == 500000.0 and model.cfg.rope_scaling["rope_type"] == "llama3"
    tokens = torch.randint(0, 128, (1, 80))
    with torch.no_grad():
        diff = (model(tokens) - hf_model(folder)(tokens).logits).abs().max().item()
    assert diff <= 1e-4


@pytest.mark.parametrize("layers", [2, 3])
def test_a_llama_shallower_than_the_default_m_loads(tmp_path, layers):
    """Tiny checkpoints often have 2-3 layers: a plain Llama loads at any depth (M = all its layers); only asking
    for SharedLLM with more injection layers than there are is an error."""
    folder = make_tiny_checkpoint(tmp_path / "shallow", num_hidden_layers=layers, num_attention_heads=4,
                                  num_key_value_heads=2)
    model = load_llama(folder)[0]
    assert model.cfg.n_inject == layers
    tokens = torch.randint(0, 128, (1, 40))
    with torch.no_grad():
        assert (model(tokens) - hf_model(folder)(tokens).logits).abs().max().item() <= 1e-4
    assert load_llama(folder, n_inject=1)[0].cfg.n_inject == 1
    with pytest.raises(LoadError, match=f"n_inject=4 must be in 1..n_layers={layers}"):
        load_llama(folder, n_inject=4)


def test_loss_is_mean_cross_entropy_and_skips_minus_100(tiny_checkpoints):
    model = load_llama(tiny_checkpoints["mha"])[0]
    tokens = torch.randint(0, 128, (2, 20))
    targets = torch.randint(0, 128, (2, 20))
    targets[0, :7] = -100
    logits, loss = model(tokens, targets)
    keep = targets != -100
    manual = -logits.log_softmax(-1)[keep].gather(-1, targets[keep][:, None]).mean()
    assert torch.allclose(loss, manual, atol=1e-6)


# -----------------------------------------------------------------------------
# RoPE

ROPES = [None, {"rope_type": "linear", "factor": 4.0},
         {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), m=st.integers(0, 200_000), n=st.integers(0, 200_000),
       shift=st.integers(-1000, 1000), scaling=st.sampled_from(ROPES))
def test_rope_preserves_norm_and_depends_only_on_distance(seed, m, n, shift, scaling):
    torch.manual_seed(seed)
    cfg = Config(dim=128, n_heads=2, rope_theta=500000.0, rope_scaling=scaling)
    inv_freq = rope_inv_freq(cfg)
    q, k = torch.randn(2, 1, 1, 1, 64, dtype=torch.float64).unbind(0)

    def rot(x, pos):
        cos, sin = rope_cos_sin(inv_freq, torch.tensor([pos]))
        return apply_rope(x, cos.double(), sin.double())

    assert torch.allclose(rot(q, m).norm(), q.norm(), rtol=1e-5)
    m2, n2 = max(m + shift, 0), max(n + shift, 0)
    shift = min(m2 - m, n2 - n)  # keep both positions non-negative with one common shift
    dot = (rot(q, m) * rot(k, n)).sum()
    dot_shifted = (rot(q, m + shift) * rot(k, n + shift)).sum()
    # fp32 angles at positions up to 2e5 carry ~1e-2 rad of rounding; the dot of unit-scale vectors follows
    assert torch.allclose(dot, dot_shifted, atol=0.05 * q.norm() * k.norm())


def test_rope_position_zero_is_identity_and_batched_positions_work():
    cfg = Config(dim=64, n_heads=2)
    x = torch.randn(2, 2, 5, 32)
    cos, sin = rope_cos_sin(rope_inv_freq(cfg), torch.zeros(5))
    assert torch.equal(apply_rope(x, cos, sin), x)
    positions = torch.tensor([[0, 1, 2, 3, 4], [7, 3, 9, 1, 0]])  # a position list per sequence (B, T)
    cos, sin = rope_cos_sin(rope_inv_freq(cfg), positions)
    out = apply_rope(x, cos, sin)
    for b in range(2):
        c, s = rope_cos_sin(rope_inv_freq(cfg), positions[b])
        assert torch.allclose(out[b], apply_rope(x[b:b + 1], c, s)[0])


# -----------------------------------------------------------------------------
# KV cache

def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = Config(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=101, hidden_dim=96, n_inject=2, **kw)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.15)
    return model


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), T=st.integers(2, 48), data=st.data())
def test_cached_decoding_equals_one_forward(seed, T, data):
    """Prefill in drawn pieces, then token by token: every position's logits equal one full forward."""
    model = tiny_model(seed % 7)
    torch.manual_seed(seed)
    tokens = torch.randint(0, 101, (2, T))
    cuts = sorted(set(data.draw(st.lists(st.integers(1, T - 1), max_size=4))))
    pieces = [b - a for a, b in zip([0] + cuts, cuts + [T])]
    with torch.no_grad():
        full = model(tokens)
        cache, outs, start = KVCache(model.cfg, 2, T), [], 0
        for size in pieces:
            outs.append(model(tokens[:, start:start + size], cache=cache))
            start += size
    assert cache.pos == T
    assert torch.allclose(torch.cat(outs, 1), full, atol=1e-5), f"pieces {pieces}"


def test_cache_overflow_is_a_clear_error():
    model = tiny_model()
    cache = KVCache(model.cfg, 1, 4)
    with pytest.raises(ValueError, match="KV cache is full"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)
