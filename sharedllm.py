"""SharedLLM: a Llama that reads far past its window by injecting a compressed context into itself.

The whole model: the Llama (RMSNorm, RoPE, attention, feed-forward, blocks) and its KV cache, then
SharedLLM's additions: a gated cross-attention in the bottom M layers, and `encode_context`, in
which those same M layers compress a long context, chunk by chunk, into key/value *memory* through
the context tree (`tree.py`). Read the Llama against meta-llama's `model.py`: names and math follow
it; weights load from Hugging Face safetensors (`load_llama.py`). Method: Han et al., arXiv
2410.19318 / 2603.04759; "Sec." and "Eq." below are the paper's. Where this file departs from the
paper, the comment says so; the README's "Departures" table measures each.

Shape legend: B batch, T new tokens, S keys, C model dim, H heads, Hkv kv heads, D head dim, V
vocab, n chunks, L chunk length, M injection layers, q question tokens.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

import tree


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
    rope_scaling: dict | None = None  # HF's: {"rope_type": "llama3" | "linear", "factor": ...}
    head_dim: int | None = None  # None: dim // n_heads
    max_seq_len: int = 8192  # the window the model was trained for
    tie_embeddings: bool = False
    bos_id: int | None = None
    eos_ids: tuple = ()
    # SharedLLM (Sec. 3); an adapter carries these (load_llama.configure)
    n_inject: int | None = None  # M: layers that encode the context and read it; None: 4 (or all)
    chunk_len: int = 1024  # L: context tokens per tree
    tree_depth: int = 3  # h
    finest_stride: int = 4  # stride of the deepest level; each level above doubles it: 16, 8, 4
    policy: str = "cosine"  # descent with a question: the paper's "cosine", or "maxsim" (ours)
    logn: bool = False  # ours: sharper cross-attention over many chunks (Transformer.logn_scale)

    def __post_init__(self):
        self.n_kv_heads = self.n_kv_heads or self.n_heads
        self.head_dim = self.head_dim or self.dim // self.n_heads
        self.n_inject = self.n_inject or min(4, self.n_layers)  # a plain Llama of any depth loads
        assert self.n_heads % self.n_kv_heads == 0, f"n_heads={self.n_heads} must be a multiple " \
            f"of n_kv_heads={self.n_kv_heads} (grouped-query attention)"
        assert self.head_dim % 2 == 0, f"RoPE rotates pairs: head_dim={self.head_dim} must be even"
        assert 1 <= self.n_inject <= self.n_layers, \
            f"n_inject={self.n_inject} must be in 1..n_layers={self.n_layers}"
        assert self.chunk_len % 2 ** self.tree_depth == 0, f"chunk_len={self.chunk_len} must " \
            f"halve {self.tree_depth} times: a multiple of {2 ** self.tree_depth}"
        assert self.policy in ("cosine", "maxsim"), f"policy={self.policy!r}: cosine or maxsim"
        kind = (self.rope_scaling or {}).get("rope_type", "default")
        assert kind in ("default", "llama3", "linear"), \
            f"rope_scaling of type {kind!r} is not supported; only llama3 and linear are"


# -----------------------------------------------------------------------------
# RoPE, as pure functions in fp32. Half-split layout: dimension i pairs with i + D/2, the layout of
# Hugging Face safetensors, so wq and wk load without the permutation of Meta's layout.

def rope_inv_freq(cfg: Config, device=None) -> torch.Tensor:
    """Rotation speed of each dimension pair, (D/2,), with `rope_scaling` applied."""
    D = cfg.head_dim
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, D, 2, device=device).float() / D)
    s = cfg.rope_scaling or {}
    if s.get("rope_type") == "linear":  # positions divided by the factor
        inv_freq = inv_freq / s["factor"]
    elif s.get("rope_type") == "llama3":  # slow pairs / factor, fast ones kept, a ramp between
        factor, old_len = s["factor"], s["original_max_position_embeddings"]
        lo, hi = s["low_freq_factor"], s["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        ramp = ((old_len / wavelen - lo) / (hi - lo)).clamp(0, 1)  # 0: long wavelengths, 1: short
        inv_freq = (1 - ramp) * inv_freq / factor + ramp * inv_freq
    return inv_freq


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor):
    """cos and sin of every position's angles: positions (..., T) -> two (..., T, D), fp32."""
    angles = positions.to(torch.float32)[..., None] * inv_freq  # (..., T, D/2)
    angles = torch.cat([angles, angles], dim=-1)  # half-split: pair i and i + D/2 share an angle
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, D) by per-position angles; cos/sin (T, D) or (B, T, D). In fp32."""
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]  # a position list per sequence: broadcast over H
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


def attend(q, k, v, mask=None, causal=False):
    """F.scaled_dot_product_attention for grouped-query heads: q (B, H, T, D), k/v (B, Hkv, S, D).

    When every query row sees the same keys (a decoded token, or the cross-attention), the H/Hkv
    query heads that share a kv head are folded into the query axis, one attention per kv head: on
    CPU 6x faster for a decoded bf16 token than letting SDPA expand k/v to H heads."""
    B, H, T, D = q.shape
    Hkv = k.size(1)
    if causal or (mask is not None and mask.size(-2) > 1):
        return F.scaled_dot_product_attention(q, k, v, mask, is_causal=causal, enable_gqa=True)
    y = F.scaled_dot_product_attention(q.reshape(B, Hkv, H // Hkv * T, D), k, v, attn_mask=mask)
    return y.view(B, H, T, D)


class KVCache:
    """Keys and values of the tokens seen so far. Made by the caller, filled by the model."""

    def __init__(self, cfg: Config, batch_size: int, max_len: int, device=None,
                 dtype=torch.float32):
        shape = (cfg.n_layers, batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0  # tokens already stored; the next token has this position

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store one layer's new keys/values (B, Hkv, T, D); return all of its (B, Hkv, S, D)."""
        T, end = k.size(2), self.pos + k.size(2)
        if end > self.k.size(3):
            raise ValueError(f"KV cache is full: {self.pos} tokens stored + {T} new > its length "
                             f"{self.k.size(3)}; make it longer (max_len) or generate fewer tokens")
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
            cache.update(layer, k, v)  # first fill: keys are exactly the new tokens, plain causal
        y = attend(q, k, v, mask, causal and T > 1)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)  # down
        self.w3 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)  # up

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # SwiGLU


# -----------------------------------------------------------------------------
# SharedLLM (Sec. 3): the memory, the gated cross-attention that reads it, and the lower pass that
# writes it.

@dataclass
class Memory:
    """A batch's compressed context, computed once by `encode_context`, passed to every forward."""
    k: list  # M x (B, Hkv, S, D): layer j's own pre-RoPE keys, rotated by chunk position (Eq. 2)
    v: list  # M x (B, Hkv, S, D)
    mask: torch.Tensor | None  # (B, S) True on real entries; None when no sequence is padded
    cos: torch.Tensor  # (B, 1, D): sequence b's queries, one past its last chunk (Eq. 2)
    sin: torch.Tensor
    trees: list  # per sequence, per chunk: the preserved tree.Node list ([] where not kept)
    scale: torch.Tensor | float = 1.0  # (B, 1, 1, 1) with Config.logn: the factor on the logits


class CrossAttention(nn.Module):
    """Self-injection (Sec. 3.2): the running text queries the context's keys/values of the same
    layer.

    No key/value projections: keys and values are the lower pass's own. Ours: norm, wq and wo start
    as copies of the layer's attention_norm, wq, wo and the tanh gate at 0, so an untrained model is
    exactly the base Llama (the authors' code starts them random and ungated)."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.gate = nn.Parameter(torch.zeros(1))

    def queries(self, x, memory: Memory):
        """(B, T, C) -> (B, H, T, D), every query rotated one past the last chunk (Eq. 2)."""
        B, T, _ = x.shape
        q = self.wq(self.norm(x)).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        return apply_rope(q, memory.cos, memory.sin)

    def forward(self, x, k, v, memory: Memory):
        B, T, _ = x.shape
        q = self.queries(x, memory) * memory.scale
        mask = memory.mask[:, None, None, :] if memory.mask is not None else None  # (B, 1, 1, S)
        y = attend(q, k, v, mask)  # non-causal: every query reads all memory entries
        return torch.tanh(self.gate) * self.wo(y.transpose(1, 2).reshape(B, T, -1))


class Block(nn.Module):
    def __init__(self, cfg: Config, layer: int):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)
        self.cross_attention = CrossAttention(cfg) if layer < cfg.n_inject else None

    def forward(self, x, cos, sin, layer: int, cache=None, memory: Memory | None = None):
        x = x + self.attention(self.attention_norm(x), cos, sin, layer, cache)
        if memory is not None and self.cross_attention is not None:  # Sec. 3.2: after self-attn
            x = x + self.cross_attention(x, memory.k[layer], memory.v[layer], memory)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.checkpointing = False  # training: recompute each block's activations in backward

    def init_cross_attention(self):
        """Each cross-attention starts as a copy of its layer's attention_norm, wq, wo; gate 0."""
        for layer in self.layers[:self.cfg.n_inject]:
            ca, own = layer.cross_attention, layer.attention
            ca.norm.weight = nn.Parameter(layer.attention_norm.weight.detach().clone())
            ca.wq.weight = nn.Parameter(own.wq.weight.detach().clone())
            ca.wo.weight = nn.Parameter(own.wo.weight.detach().clone())
            ca.gate = nn.Parameter(own.wq.weight.new_zeros(1))

    def forward(self, tokens, targets=None, cache: KVCache | None = None, memory=None,
                last_only: bool = False):
        """tokens (B, T) -> logits (B, T, V) in fp32, or (logits, mean cross-entropy) with targets.

        Targets of -100 are left out of the loss. With a cache, the tokens continue what it holds.
        With memory (encode_context), the bottom M layers also read the context. last_only: the
        logits of the last position only, (B, 1, V): all that generation needs after a prefill."""
        T = tokens.size(1)
        start = cache.pos if cache is not None else 0
        positions = torch.arange(start, start + T, device=tokens.device)
        cos, sin = rope_cos_sin(rope_inv_freq(self.cfg, tokens.device), positions)  # (T, D) each
        x = self.tok_embeddings(tokens)  # (B, T, C)
        for i, layer in enumerate(self.layers):
            if self.checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, i, cache, memory, use_reentrant=False)
            else:
                x = layer(x, cos, sin, i, cache, memory)
        if cache is not None:
            cache.advance(T)
        logits = self.output(self.norm(x[:, -1:] if last_only else x)).float()
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.flatten(0, 1), targets.reshape(-1), ignore_index=-100)
        return logits, loss

    # -------------------------------------------------------------------------
    # The lower pass (Sec. 3.1): the bottom M layers of this same model compress the context.

    def layer0_states(self, tokens):
        """(N, l) sequences from position 0 -> (the states after embedding + layer 0 + final norm,
        the raw layer-0 output), both (N, l, C). The policies compare the first."""
        positions = torch.arange(tokens.size(1), device=tokens.device)
        cos, sin = rope_cos_sin(rope_inv_freq(self.cfg, tokens.device), positions)
        x1 = self.layers[0](self.tok_embeddings(tokens), cos, sin, 0)
        return self.norm(x1), x1

    @torch.no_grad()
    def query_states(self, tokens, first: int, last: int, end: int = -1):
        """The policy's view of a question in the running text (B, T): the same function as for tree
        nodes -> (B, q + 1, C): the question's tokens first..last (MaxSim, chunk selection), then
        the prompt's last token `end` (the paper's cosine query, h_q)."""
        states = self.layer0_states(tokens)[0]
        return torch.cat([states[:, first:last + 1], states[:, end].unsqueeze(1)], dim=1)

    def lower(self, tokens, stride: int, x1=None):
        """Nodes (N, l), each its own sequence from position 0, through layers[:M] -> per layer the
        pre-RoPE keys and values of every stride-th position, (N, Hkv, ceil(l / stride), D) each.
        x1: layer 0's output, when the policy already computed it."""
        N, l = tokens.shape
        M, Hkv, D = self.cfg.n_inject, self.cfg.n_kv_heads, self.cfg.head_dim
        positions = torch.arange(l, device=tokens.device)
        cos, sin = rope_cos_sin(rope_inv_freq(self.cfg, tokens.device), positions)
        x, kv = self.tok_embeddings(tokens), []
        for j, layer in enumerate(self.layers[:M]):  # weight sharing: the lower model *is* these
            h = layer.attention_norm(x[:, ::stride])  # strided downsampling: every s-th position
            kv.append((layer.attention.wk(h).view(N, -1, Hkv, D).transpose(1, 2),
                       layer.attention.wv(h).view(N, -1, Hkv, D).transpose(1, 2)))
            if j < M - 1:  # the last lower layer's attention and MLP outputs are never used
                x = x1 if j == 0 and x1 is not None else layer(x, cos, sin, j)
        return kv

    @torch.no_grad()  # the lower model gets no gradient
    def encode_context(self, context, query=None, chunk_positions=None, generator=None,
                       top_chunks: int = 0, group: int = 16, progress: bool = False) -> Memory:
        """Compress each sequence's context into memory for the bottom M layers.

        context: B token tensors, each a whole number (>= 1) of L-token chunks, or a (B, n*L)
        tensor. query: None for the right policy (continuing a text); else per sequence the (q + 1,
        C) block of query_states, read by the policy cfg.policy names. chunk_positions: each chunk's
        position id (default 0..n-1). generator: split noise (training); None splits at exact
        halves. top_chunks: ours, keep only that many chunks per sequence (select); the others get
        no tree. group: chunks per lower-pass batch, which bounds memory."""
        cfg = self.cfg
        seqs = [tree.chunks(c, cfg.chunk_len) for c in context]  # B x (n_b, L)
        assert all(len(c) for c in seqs), "every sequence needs at least one context chunk"
        # 0. Ours, optional: only the chunks that best match the question get a tree.
        kept = [torch.arange(len(c)) for c in seqs]
        if top_chunks:
            assert query is not None, "top_chunks ranks chunks against a question: give a query"
            kept = [self.select(c, q[:-1], top_chunks, group) for c, q in zip(seqs, query)]
            seqs = [c[k] for c, k in zip(seqs, kept)]
            if chunk_positions is not None:
                chunk_positions = [[p[i] for i in k] for p, k in zip(chunk_positions, kept)]
        # 1-2. The trees and the lower pass, a group of chunks (of any sequences) at a time.
        flat, owner = torch.cat(seqs), [b for b, c in enumerate(seqs) for _ in range(len(c))]
        nodes, kv = [], []
        bar = tqdm(total=len(flat), desc="context tree", unit="chunk", disable=not progress,
                   leave=False)
        for g in range(0, len(flat), group):
            q = None if query is None else torch.stack([query[b] for b in owner[g:g + group]])
            group_nodes, group_kv = self.encode_group(flat[g:g + group], q, generator)
            nodes, kv = nodes + group_nodes, kv + group_kv
            bar.update(len(group_nodes))
        bar.close()
        # 3. Chunk positions (Eq. 2), in assemble.
        memory = self.assemble(nodes, kv, [len(c) for c in seqs], chunk_positions)
        for b, (c, k) in enumerate(zip(context, kept)):  # a tree per chunk, [] where dropped
            trees = dict(zip(k.tolist(), memory.trees[b]))
            memory.trees[b] = [trees.get(i, []) for i in range(len(c) // cfg.chunk_len)]
        return memory

    def encode_group(self, tokens, query=None, generator=None):
        """Steps 1-2 of encode_context for a group of chunks (G, L), query (G, q + 1, C) or None ->
        (each chunk's preserved nodes, each chunk's per-layer (k, v), (Hkv, E, D), in text
        order)."""
        G, cfg = len(tokens), self.cfg
        strides, layer0 = tree.strides(cfg.tree_depth, cfg.finest_stride), {}

        def choose(level, left, right):  # layer 0 on both children of every chunk, vs the query
            if query is None:
                return tree.right_policy(G)
            spans = [(i % G, s, e) for i, (s, e) in enumerate(left + right)]
            batch, lengths = pad([tokens[i, s:e] for i, s, e in spans])
            states, x1 = self.layer0_states(batch)  # (2G, l, C): left children, then right
            for r, (i, s, e) in enumerate(spans):  # a kept child's lower pass starts at layer 1
                layer0[(i, s)] = x1[r, :e - s]
            mask = torch.arange(batch.size(1), device=batch.device) < lengths[:, None]
            return tree.choose_child(cfg.policy, states[:G], mask[:G], states[G:], mask[G:], query)

        # 1. Split and descend (Sec. 3.1); split noise sigma = l/5 without a question, l/10 with.
        nodes = tree.descend(G, cfg.chunk_len, cfg.tree_depth, choose, generator,
                             sigma_frac=0.2 if query is None else 0.1)
        # 2. The lower pass: all nodes of one level, across chunks, as one batch.
        kv_of = {}
        for level in range(1, cfg.tree_depth + 1):
            items = [(i, n) for i, chunk in enumerate(nodes) for n in chunk if n.level == level]
            batch, _ = pad([tokens[i, n.start:n.end] for i, n in items])
            x1 = pad([layer0[(i, n.start)] for i, n in items])[0] if query is not None else None
            kv = self.lower(batch, strides[level - 1], x1)
            for r, (i, n) in enumerate(items):
                e = len(tree.kept_positions(n, strides))  # padded positions are dropped here
                kv_of[(i, n.start)] = [(k[r, :, :e], v[r, :, :e]) for k, v in kv]
        return nodes, [join([kv_of[(i, n.start)] for n in chunk]) for i, chunk in enumerate(nodes)]

    def assemble(self, nodes, kv, counts, chunk_positions=None) -> Memory:
        """All sequences' chunks in order, counts[b] for sequence b, with their kept nodes and
        per-layer (k, v) (Hkv, E, D) -> Memory: per sequence the trees concatenated, tree i's keys
        rotated at its chunk position and the queries one past the last (Eq. 2)."""
        cfg, M = self.cfg, self.cfg.n_inject
        device, dtype = kv[0][0][0].device, kv[0][0][0].dtype
        starts = [sum(counts[:b]) for b in range(len(counts))]
        sizes = [chunk[0][0].size(1) for chunk in kv]  # entries per chunk
        lengths = torch.tensor([sum(sizes[a:a + c]) for a, c in zip(starts, counts)])
        # 1. One (B, Hkv, S, D) tensor per layer, zero past each sequence's end.
        shape = (len(counts), cfg.n_kv_heads, int(lengths.max()), cfg.head_dim)
        k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(M)]
        v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(M)]
        # 2. Per sequence: its trees in text order, tree i's keys rotated at its position (Eq. 2).
        inv_freq, last = rope_inv_freq(cfg, device), []
        for b, (a, count) in enumerate(zip(starts, counts)):
            pos = chunk_positions[b] if chunk_positions is not None else list(range(count))
            ids = torch.cat([torch.full((sizes[a + i],), p) for i, p in enumerate(pos)])
            cos, sin = rope_cos_sin(inv_freq, ids.to(device))
            mine, end = join(kv[a:a + count]), int(lengths[b])
            for j in range(M):
                k[j][b, :, :end] = apply_rope(mine[j][0][None], cos, sin)[0]
                v[j][b, :, :end] = mine[j][1]
            last.append(max(pos))
        # 3. The queries one past each sequence's last chunk; a key mask where lengths differ.
        cos, sin = rope_cos_sin(inv_freq, torch.tensor([[p + 1] for p in last], device=device))
        mask = torch.arange(int(lengths.max())) < lengths[:, None]
        mask = None if mask.all() else mask.to(device)
        scale = self.logn_scale(lengths, counts).to(device, dtype) if cfg.logn else 1.0
        trees = [nodes[a:a + c] for a, c in zip(starts, counts)]
        return Memory(k, v, mask, cos, sin, trees, scale)

    # -------------------------------------------------------------------------
    # Ours, beside the paper's steps (README, Departures): chunk selection and the log-n scale.

    @torch.no_grad()
    def select(self, chunks, question, top: int, group: int = 16) -> torch.Tensor:
        """(n, L) chunks, a question's states (q, C) -> the indices, ascending, of the `top` chunks
        that best match it (tree.chunk_scores), on the layer-0 states of each half: what descent
        sees first."""
        if len(chunks) <= top:
            return torch.arange(len(chunks))
        L, matches = self.cfg.chunk_len, []
        for part in chunks.split(group):
            halves = self.layer0_states(part.reshape(-1, L // 2))[0]
            matches.append(tree.phrase_cosines(halves.reshape(len(part), L, -1), question))
        pairs, tokens = (torch.cat(m) for m in zip(*matches))
        return tree.chunk_scores(pairs, tokens).topk(top).indices.sort().values

    @staticmethod
    def logn_scale(lengths, counts) -> torch.Tensor:
        """After Qwen's log-n attention: the cross-attention logits of a sequence with S entries in
        n chunks times log S / log(S / n) -> (B, 1, 1, 1): 1 for one chunk, ~1.8 for 124, so
        attention stays as sharp as the number of distractor entries grows."""
        S = lengths.double()
        return (S.log() / (S / torch.tensor(counts)).log()).clamp(min=1)[:, None, None, None]

    # -------------------------------------------------------------------------
    # Training only: a pool of chunks encoded once. The lower layers are frozen and each node is its
    # own sequence, so a chunk's memory is a pure function of its tokens and its descent: distractor
    # chunks encoded once serve many samples, and a 124-chunk sample skips 123 lower passes.

    @torch.no_grad()
    def encode_pool(self, chunks, group: int = 16, progress: bool = False) -> "Pool":
        """(P, L) chunks -> Pool: every node a descent at exact halves can keep (level d: 2**d nodes
        of L / 2**d tokens per chunk), through the lower pass, with the policies' states."""
        cfg, (P, L) = self.cfg, chunks.shape
        strides, states, kv = tree.strides(cfg.tree_depth, cfg.finest_stride), [], []
        bar = tqdm(total=P * cfg.tree_depth, desc="chunk pool", unit="chunk", disable=not progress,
                   leave=False)
        for d in range(1, cfg.tree_depth + 1):
            parts = []
            for g in range(0, P, group):  # all candidates of a level have one length: no padding
                bar.update(len(chunks[g:g + group]))
                nodes = chunks[g:g + group].reshape(-1, L >> d)  # (G * 2**d, l)
                normed, x1 = self.layer0_states(nodes)
                parts.append((normed, self.lower(nodes, strides[d - 1], x1)))
            states.append(torch.cat([n for n, _ in parts]).unflatten(0, (P, 2 ** d)))
            layers = join([kv for _, kv in parts], dim=0)  # per layer (P * 2**d, Hkv, E_d, D)
            kv.append([tuple(t.unflatten(0, (P, 2 ** d)) for t in pair) for pair in layers])
        bar.close()
        return Pool(chunks, states, kv)

    @torch.no_grad()
    def memory_from_pool(self, pool, picks, query=None, chunk_positions=None, fresh=None) -> Memory:
        """Memory of B sequences whose chunks are pool rows (picks: B lists of row indices; -1 takes
        the next row of `fresh` (k, L), chunks encoded now). Pool rows need no lower pass: the
        descent reads the pool's states and the kept nodes' keys/values are gathered. Equals
        encode_context on the same chunks at exact halves (a test checks it)."""
        cfg, device = self.cfg, pool.tokens.device
        rows, owner = [r for p in picks for r in p], [b for b, p in enumerate(picks) for _ in p]
        old = [i for i, r in enumerate(rows) if r >= 0]
        new = [i for i, r in enumerate(rows) if r < 0]
        queries = None if query is None else torch.stack([query[b] for b in owner])
        at = torch.tensor([rows[i] for i in old], dtype=torch.long, device=device)

        def choose(level, left, right):  # as encode_group's, on the stored states
            if query is None:
                return tree.right_policy(len(old))
            states, size = pool.states[level - 1], cfg.chunk_len >> level
            h_left = states[at, torch.tensor([s // size for s, _ in left], device=device)]
            h_right = states[at, torch.tensor([s // size for s, _ in right], device=device)]
            every = torch.ones(h_left.shape[:2], dtype=torch.bool, device=device)
            return tree.choose_child(cfg.policy, h_left, every, h_right, every, queries[old])

        nodes, kv = [None] * len(rows), [None] * len(rows)
        trees = tree.descend(len(old), cfg.chunk_len, cfg.tree_depth, choose) if old else []
        for i, chunk in zip(old, trees):
            nodes[i], parts = chunk, []
            for n in chunk:  # the pool's copy of each kept node: row, candidate at its level
                r, c = rows[i], n.start // (cfg.chunk_len >> n.level)
                parts.append([(k[r, c], v[r, c]) for k, v in pool.kv[n.level - 1]])
            kv[i] = join(parts)
        if new:  # chunks seen once: only the nodes their descent keeps go through the lower pass
            new_nodes, new_kv = self.encode_group(fresh, None if query is None else queries[new])
            for r, i in enumerate(new):
                nodes[i], kv[i] = new_nodes[r], new_kv[r]
        return self.assemble(nodes, kv, [len(p) for p in picks], chunk_positions)


@dataclass
class Pool:
    """Chunks encoded once by `Transformer.encode_pool`, read by `memory_from_pool`."""
    tokens: torch.Tensor  # (P, L)
    states: list  # per level d: (P, 2**d, L / 2**d, C), layer 0 + final norm of each candidate node
    kv: list  # per level d, per layer j < M: (k, v), each (P, 2**d, Hkv, E_d, D), pre-RoPE, strided


def join(parts, dim: int = 1):
    """Per part a per-layer list of (k, v) -> per layer (k, v), the parts concatenated along dim."""
    return [tuple(torch.cat(t, dim) for t in zip(*layer)) for layer in zip(*parts)]


def pad(rows):
    """Right-pad tensors (l_i, ...) to (N, max l, ...) with zeros; also their lengths (N,)."""
    lengths = torch.tensor([len(r) for r in rows], device=rows[0].device)
    return nn.utils.rnn.pad_sequence(rows, batch_first=True), lengths
