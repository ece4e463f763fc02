"""The context tree (paper Sec. 3.1): which spans of each context chunk are kept, and how finely.

Pure functions on integers and tensors, in three parts: the tree itself (the paper); the descent
policies (right and cosine: the paper; MaxSim: ours); chunk selection (ours, after Landmark
Attention and InfLLM). `sharedllm.py` supplies the model states that policies and selection compare.

A chunk is split in two; the policy picks the child to descend into; the other child is *preserved*
at this level's granularity and never split again; at the last level both children are preserved.
Depth 3 on a 1024-token chunk at exact halves keeps 512 + 256 + 128 + 128 tokens, every 16th, 8th,
4th and 4th: 128 key/value entries, one per beta = 8 tokens.
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


# -----------------------------------------------------------------------------
# The tree (Sec. 3.1)

def chunks(tokens: torch.Tensor, L: int) -> torch.Tensor:
    """(T,) with T a multiple of L -> (n, L)."""
    assert tokens.numel() % L == 0, \
        f"context of {tokens.numel()} tokens is not a whole number of {L}-token chunks"
    return tokens.view(-1, L)


def split_point(length: int, min_child: int = 1, generator=None, sigma_frac: float = 0.2) -> int:
    """Where a node of `length` tokens splits: the middle at inference (generator None); in training
    b = floor(l/2 - eps), eps ~ N(0, (sigma_frac*l)^2), clamped so each child keeps min_child
    tokens. The paper's sigma is l/5 for language modelling and l/10 for instructions (Sec. 3.1)."""
    if generator is None:
        return length // 2
    eps = torch.randn((), generator=generator).item() * sigma_frac * length
    return min(max(int(length / 2 - eps), min_child), length - min_child)


def strides(depth: int, finest: int = 4) -> list[int]:
    """Stride of each level, 1-based level d -> finest * 2**(depth - d): 16, 8, 4 at depth 3."""
    return [finest * 2 ** (depth - d) for d in range(1, depth + 1)]


def descend(n: int, L: int, depth: int, choose, generator=None, sigma_frac=0.2) -> list[list[Node]]:
    """Build n chunks' trees level by level -> each chunk's preserved nodes, in text order.

    choose(level, left, right) gets two lists of n (start, end) spans -> a (n,) bool tensor, True
    where the chunk descends into its right child. It is called at the last level too (where both
    children are kept), so a model-backed policy can reuse the states it computed for them."""
    current, kept = [(0, L)] * n, [[] for _ in range(n)]
    for level in range(1, depth + 1):
        min_child = 2 ** (depth - level)  # the chosen child must still split into non-empty halves
        cuts = [s + split_point(e - s, min_child, generator, sigma_frac) for s, e in current]
        left = [(s, b) for (s, _), b in zip(current, cuts)]
        right = [(b, e) for (_, e), b in zip(current, cuts)]
        go_right = choose(level, left, right).tolist()
        for i in range(n):
            keep = [left[i], right[i]] if level == depth else [left[i] if go_right[i] else right[i]]
            kept[i] += [Node(s, e, level) for s, e in keep]
        current = [right[i] if go_right[i] else left[i] for i in range(n)]
    return [sorted(k, key=lambda node: node.start) for k in kept]


def kept_positions(node: Node, level_strides: list[int]) -> range:
    """Chunk offsets whose keys/values a node keeps: every s-th token from its start."""
    return range(node.start, node.end, level_strides[node.level - 1])


def entries(nodes: list[Node], level_strides: list[int]) -> int:
    return sum(len(kept_positions(node, level_strides)) for node in nodes)


# -----------------------------------------------------------------------------
# Descent policies: which child to descend into, as a (n,) bool tensor, True = right. The paper has
# two: right (language modelling) and cosine (a question); MaxSim is ours.

def right_policy(n: int) -> torch.Tensor:
    """Language modelling (no query): always the half next to the running text (Sec. 3.1)."""
    return torch.ones(n, dtype=torch.bool)


def cosine_policy(h_left, h_right, h_query) -> torch.Tensor:
    """The paper's signal: last-token states of each child (n, C) against the query state (n, C)."""
    return F.cosine_similarity(h_right, h_query, -1) > F.cosine_similarity(h_left, h_query, -1)


def maxsim(states: torch.Tensor, mask: torch.Tensor, question: torch.Tensor) -> torch.Tensor:
    """For each question token the best cosine over a span's tokens, summed over the question:
    states (n, l, C), mask (n, l) True on real tokens, question (n, q, C) -> (n,)."""
    q, s = F.normalize(question.float(), dim=-1), F.normalize(states.float(), dim=-1)
    sims = q @ s.transpose(1, 2)  # (n, q, l)
    return sims.masked_fill(~mask[:, None, :], -2.0).amax(-1).sum(-1)


def maxsim_policy(s_left, m_left, s_right, m_right, question) -> torch.Tensor:
    """Ours: descend where some span of the child best matches the question, token by token. The
    paper's cosine of last-token states keeps a hidden pass key finely 26% of the time (random:
    25%), MaxSim 97% (README)."""
    return maxsim(s_right, m_right, question) > maxsim(s_left, m_left, question)


def choose_child(policy: str, s_left, m_left, s_right, m_right, query) -> torch.Tensor:
    """A query-aware policy by name, on the children's states (n, l, C) with masks (n, l) True on
    real tokens. query (n, q + 1, C): the question's tokens, then the prompt's last token (the
    paper's h_q)."""
    if policy == "cosine":
        last = lambda s, m: s[torch.arange(len(s)), m.sum(1) - 1]  # noqa: E731  last real token
        return cosine_policy(last(s_left, m_left), last(s_right, m_right), query[:, -1])
    assert policy == "maxsim", f"unknown policy {policy!r}: right, cosine or maxsim"
    return maxsim_policy(s_left, m_left, s_right, m_right, query[:, :-1])


# -----------------------------------------------------------------------------
# Chunk selection (ours, after Landmark Attention and InfLLM, which retrieve a few blocks per
# query): score every chunk against the question on the layer-0 states; the best few get a tree.

def phrase_cosines(states: torch.Tensor, question: torch.Tensor):
    """Each pair of neighbouring question tokens against each pair in a chunk (the weaker of the two
    cosines), best over the chunk; and each single token's best cosine. A pair ("pass key") rarely
    matches by chance where single tokens ("pass", "key") do. states (n, l, C), question (q, C) ->
    pairs (n, q - 1) (or (n, 1) for a one-token question) and tokens (n, q)."""
    s, q = F.normalize(states.float(), dim=-1), F.normalize(question.float(), dim=-1)
    sims = s @ q.T  # (n, l, q)
    pairs = torch.minimum(sims[:, :-1, :-1], sims[:, 1:, 1:]) if len(question) > 1 else sims
    return pairs.amax(1), sims.amax(1)


def rarity_weighted_sum(pairs: torch.Tensor) -> torch.Tensor:
    """(n, p) best cosines of p question pairs in n chunks -> (n,): each weighted by 1 - its mean
    over the chunks, so a pair that matches everywhere ("what is") counts little."""
    return (pairs * (1 - pairs.mean(0))).sum(-1)


def contained_idf(best: torch.Tensor, threshold: float = 0.9) -> torch.Tensor:
    """(n, k) best cosines of k question tokens (or pairs) in n chunks -> (n,): over those a chunk
    contains (cosine > threshold), the sum of log(n / chunks that contain it) / log n, as in BM25. A
    name in one chunk counts 1, a word in every chunk 0."""
    hit = (best > threshold).float()
    idf = torch.log(len(best) / hit.sum(0).clamp(min=1))
    return (hit * idf).sum(-1) / math.log(max(len(best), 2))


def chunk_scores(pairs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """How well each of n chunks matches a question, from phrase_cosines -> (n,): rarity-weighted
    pairs, plus the IDF of the pairs it contains, plus half the IDF of the single tokens (names)."""
    return rarity_weighted_sum(pairs) + contained_idf(pairs) + 0.5 * contained_idf(tokens)
