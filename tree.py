"""The context tree (DESIGN.md Sec. 4): which spans of each context chunk are kept, and at what granularity.

Pure functions on integers and tensors; `sharedllm.py` supplies the model states the query-aware policy needs.
A chunk is split in two; the policy picks the child to descend into; the other child is *preserved* at this
level's granularity and never split again. At the last level both children are preserved. Depth 3 on a
1024-token chunk at exact halves preserves 512 + 256 + 128 + 128 tokens, kept every 16, 8, 4, 4 tokens:
128 key/value entries, one per beta = 8 tokens.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Node:
    start: int  # token offset inside the chunk
    end: int
    level: int  # 1-based tree level; sets the stride


def chunks(tokens: torch.Tensor, L: int) -> torch.Tensor:
    """(T,) with T a multiple of L -> (n, L)."""
    assert tokens.numel() % L == 0, f"context of {tokens.numel()} tokens is not a whole number of {L}-token chunks"
    return tokens.view(-1, L)


def split_point(length: int, min_child: int = 1, generator: torch.Generator | None = None,
                sigma_frac: float = 0.2) -> int:
    """Where a node of `length` tokens splits: the middle at inference (generator None); in training
    b = floor(l/2 - eps), eps ~ N(0, (sigma_frac*l)^2) (Sec. 3.1), clamped so each child has min_child tokens."""
    if generator is None:
        return length // 2
    eps = torch.randn((), generator=generator).item() * sigma_frac * length
    return min(max(int(length / 2 - eps), min_child), length - min_child)


def strides(depth: int, finest: int = 4) -> list[int]:
    """Stride of each level, 1-based level d -> finest * 2**(depth - d): 16, 8, 4 at depth 3."""
    return [finest * 2 ** (depth - d) for d in range(1, depth + 1)]


def descend(n: int, L: int, depth: int, choose, generator=None) -> list[list[Node]]:
    """Build the n chunks' trees level by level; returns each chunk's preserved nodes in text order.

    choose(level, left, right) gets two lists of n (start, end) spans and returns a (n,) bool tensor, True
    where the chunk descends into its right child. It is called at every level, the last one included (where
    both children are kept), so a model-backed policy can reuse the states it computed for the kept children."""
    current = [(0, L)] * n
    kept = [[] for _ in range(n)]
    for level in range(1, depth + 1):
        min_child = 2 ** (depth - level)  # the chosen child must still split into non-empty halves below
        cuts = [s + split_point(e - s, min_child, generator) for s, e in current]
        left = [(s, b) for (s, _), b in zip(current, cuts)]
        right = [(b, e) for (_, e), b in zip(current, cuts)]
        go_right = choose(level, left, right).tolist()
        for i in range(n):
            keep = [left[i], right[i]] if level == depth else [right[i] if not go_right[i] else left[i]]
            kept[i] += [Node(s, e, level) for s, e in keep]
        current = [right[i] if go_right[i] else left[i] for i in range(n)]
    return [sorted(k, key=lambda node: node.start) for k in kept]


def kept_positions(node: Node, level_strides: list[int]) -> range:
    """Chunk offsets whose keys/values a node keeps: every s-th token from its start (strided, not pooled)."""
    return range(node.start, node.end, level_strides[node.level - 1])


def entries(nodes: list[Node], level_strides: list[int]) -> int:
    return sum(len(kept_positions(node, level_strides)) for node in nodes)


# -----------------------------------------------------------------------------
# Policies: which child to descend into. Each returns a (n,) bool tensor, True = right.

def right_policy(n: int) -> torch.Tensor:
    """Language modelling (no query): always the half next to the running text (Sec. 3.1)."""
    return torch.ones(n, dtype=torch.bool)


def cosine_policy(h_left: torch.Tensor, h_right: torch.Tensor, h_query: torch.Tensor) -> torch.Tensor:
    """The paper's signal: last-token states of each child (n, C) against the query state (n, C)."""
    return F.cosine_similarity(h_right, h_query, dim=-1) > F.cosine_similarity(h_left, h_query, dim=-1)


def maxsim(states: torch.Tensor, mask: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """Token-level MaxSim: for each query token, the best cosine over a span's tokens; summed over the query.
    states (n, l, C), mask (n, l) True on real tokens, query (n, q, C) -> (n,)."""
    sims = F.normalize(query.float(), dim=-1) @ F.normalize(states.float(), dim=-1).transpose(1, 2)  # (n, q, l)
    return sims.masked_fill(~mask[:, None, :], -2.0).amax(-1).sum(-1)


def phrase_maxsim(states: torch.Tensor, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MaxSim over adjacent pairs: each pair of neighbouring question tokens against each pair in a chunk, the weaker
    of its two cosines; the best per question pair. A pair ("pass key") rarely matches by chance where single tokens
    ("pass", "key") do. states (n, l, C), query (q, C) -> pairs (n, q - 1) (or (n, 1) for a one-token question)
    and each question token's best cosine, tokens (n, q)."""
    sims = F.normalize(states.float(), dim=-1) @ F.normalize(query.float(), dim=-1).T  # (n, l, q)
    pairs = torch.minimum(sims[:, :-1, :-1], sims[:, 1:, 1:]) if len(query) > 1 else sims
    return pairs.amax(1), sims.amax(1)


def rarity_weighted(pairs: torch.Tensor) -> torch.Tensor:
    """(n, p) best cosine of each question pair in each of n chunks -> (n,) chunk scores: each pair weighted by how
    rare its match is across the chunks (1 - its mean), so a pair that matches everywhere ("what is") counts little
    and a pair that matches one chunk ("pass key") counts most."""
    return (pairs * (1 - pairs.mean(0))).sum(-1)


def idf(best: torch.Tensor, threshold: float = 0.9) -> torch.Tensor:
    """(n, k) best cosine of each of k question tokens (or pairs) in each of n chunks -> (n,): over those a chunk
    contains (cosine > threshold), the sum of log(n / chunks that contain it) / log n, an IDF over chunks as in BM25.
    A name or a pair ("pass key") in one chunk counts 1, a word in every chunk 0: a rare exact match outweighs many
    chunks' weak matches of common words, and names rank a fact that its pairs ("badge id") do not."""
    hit = (best > threshold).float()
    return (hit * torch.log(len(best) / hit.sum(0).clamp(min=1))).sum(-1) / math.log(max(len(best), 2))


def chunk_scores(pairs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """How well each of n chunks matches a question, from phrase_maxsim's pairs (n, q - 1) and tokens (n, q) -> (n,):
    the rarity-weighted pairs, plus the IDF of the pairs it contains, plus half the IDF of the single tokens."""
    return rarity_weighted(pairs) + idf(pairs) + 0.5 * idf(tokens)


def maxsim_policy(s_left, m_left, s_right, m_right, query) -> torch.Tensor:
    """Descend where some span of the child best matches the question, token by token (DESIGN Sec. 10)."""
    return maxsim(s_right, m_right, query) > maxsim(s_left, m_left, query)
