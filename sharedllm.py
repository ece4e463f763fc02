"""SharedLLM: a Llama that reads far past its window by injecting a compressed context into itself.

This file holds the whole model: the Llama (RMSNorm, RoPE, attention, feed-forward, blocks) and the KV cache.
Read it against meta-llama's `model.py`; names and math follow it, weights load from Hugging Face safetensors
through `load_llama.py`. Method: Han et al., arXiv 2410.19318 / 2603.04759; this project's notes: DESIGN.md.

Shape legend, used in every comment below:
B batch, T new tokens, S keys, C model dim, H heads, Hkv kv heads, D head dim, V vocab,
n chunks, L chunk length, M injection layers.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Config:
    dim: int = 576
    n_layers: int = 30
    n_heads: int = 9
    n_kv_heads: int | None = None  # None: plain multi-head attention
    vocab_size: int = 49152
    hidden_dim: int = 1536  # feed-forward width
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # HF `rope_scaling`: {"rope_type": "llama3" | "linear", "factor": ..., ...}
    head_dim: int | None = None  # None: dim // n_heads (some checkpoints set it explicitly)
    max_seq_len: int = 8192  # the window the model was trained for
    tie_embeddings: bool = False
    bos_id: int | None = None
    eos_ids: tuple = ()

    def __post_init__(self):
        self.n_kv_heads = self.n_kv_heads or self.n_heads
        self.head_dim = self.head_dim or self.dim // self.n_heads
        assert self.n_heads % self.n_kv_heads == 0, \
            f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads} (grouped-query attention)"
        assert self.head_dim % 2 == 0, f"RoPE rotates pairs of dimensions: head_dim={self.head_dim} must be even"
        kind = (self.rope_scaling or {}).get("rope_type", "default")
        assert kind in ("default", "llama3", "linear"), \
            f"rope_scaling of type {kind!r} is not supported; this project implements 'llama3' and 'linear'"


# -----------------------------------------------------------------------------
# RoPE, as pure functions in fp32. Half-split layout: dimension i pairs with i + D/2, the layout Hugging Face
# safetensors are stored in, so wq and wk load without the permutation Meta's interleaved layout needs.

def rope_inv_freq(cfg: Config, device=None) -> torch.Tensor:
    """Rotation speed of each dimension pair, (D/2,), with `rope_scaling` applied."""
    D = cfg.head_dim
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, D, 2, device=device, dtype=torch.float32) / D)
    s = cfg.rope_scaling or {}
    if s.get("rope_type") == "linear":  # positions divided by the factor
        inv_freq = inv_freq / s["factor"]
    elif s.get("rope_type") == "llama3":  # slow pairs scaled by 1/factor, fast pairs kept, a smooth ramp between
        factor, old_len = s["factor"], s["original_max_position_embeddings"]
        lo, hi = s["low_freq_factor"], s["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        ramp = ((old_len / wavelen - lo) / (hi - lo)).clamp(0, 1)  # 0: long wavelengths, 1: short ones
        inv_freq = (1 - ramp) * inv_freq / factor + ramp * inv_freq
    return inv_freq


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor):
    """cos and sin of every position's angles: positions (..., T) -> two (..., T, D), fp32."""
    angles = positions.to(torch.float32)[..., None] * inv_freq  # (..., T, D/2)
    angles = torch.cat([angles, angles], dim=-1)  # half-split: pair i and i + D/2 share an angle
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, D) by per-position angles; cos/sin (T, D) or (B, T, D). Computed in fp32."""
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]  # one position list per sequence: broadcast over heads
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)  # the 90-degree turn of each (i, i + D/2) pair
    return (xf * cos + rotated * sin).type_as(x)


# -----------------------------------------------------------------------------
# The Llama

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()  # normalise in fp32, as the reference does, then scale in the input dtype
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.type_as(x)


class KVCache:
    """Keys and values of the tokens seen so far, for every layer. Made by the caller, filled by the model."""

    def __init__(self, cfg: Config, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        shape = (cfg.n_layers, batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0  # tokens already stored; the next token has this position

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store the new keys/values (B, Hkv, T, D) of one layer; return all of that layer's (B, Hkv, S, D)."""
        T, end = k.size(2), self.pos + k.size(2)
        if end > self.k.size(3):
            raise ValueError(f"KV cache is full: {self.pos} tokens stored + {T} new > its length {self.k.size(3)}; "
                             f"make the cache longer (max_len) or generate fewer tokens")
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, T: int):
        self.pos += T


class Attention(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        H, Hkv, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = H, Hkv, D
        self.wq = nn.Linear(cfg.dim, H * D, bias=False)
        self.wk = nn.Linear(cfg.dim, Hkv * D, bias=False)
        self.wv = nn.Linear(cfg.dim, Hkv * D, bias=False)
        self.wo = nn.Linear(H * D, cfg.dim, bias=False)

    def forward(self, x, cos, sin, layer: int, cache: KVCache | None = None):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        mask, causal = None, True
        if cache is not None and cache.pos > 0:
            k, v = cache.update(layer, k, v)  # (B, Hkv, S, D), S = past + T
            S, causal = k.size(2), False
            if T > 1:  # lower-right causal mask: new token i sees the past and new tokens 0..i
                mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)
        elif cache is not None:
            cache.update(layer, k, v)  # first fill: keys are exactly the new tokens, plain causal attention
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)  # down
        self.w3 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)  # up

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x, cos, sin, layer: int, cache: KVCache | None = None):
        x = x + self.attention(self.attention_norm(x), cos, sin, layer, cache)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def forward(self, tokens, targets=None, cache: KVCache | None = None):
        """tokens (B, T) -> logits (B, T, V) in fp32, or (logits, mean cross-entropy) when targets are given.

        Targets equal to -100 are left out of the loss. With a cache, the tokens continue what it holds."""
        B, T = tokens.shape
        start = cache.pos if cache is not None else 0
        positions = torch.arange(start, start + T, device=tokens.device)
        cos, sin = rope_cos_sin(rope_inv_freq(self.cfg, tokens.device), positions)  # (T, D) each
        x = self.tok_embeddings(tokens)  # (B, T, C)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, i, cache)
        if cache is not None:
            cache.advance(T)
        logits = self.output(self.norm(x)).float()
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return logits, loss
