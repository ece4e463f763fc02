"""tree.py: preserved nodes partition each chunk; kept entries; split noise; the policies."""
import torch
from hypothesis import given, settings, strategies as st

import tree


def random_choice(seed):
    g = torch.Generator().manual_seed(seed)
    return lambda level, left, right: torch.rand(len(left), generator=g) < 0.5


@settings(max_examples=50, deadline=None)
@given(depth=st.integers(1, 5), log_extra=st.integers(0, 5), n=st.integers(1, 6), seed=st.integers(0, 2**31),
       noise=st.booleans())
def test_preserved_nodes_partition_the_chunk_in_order(depth, log_extra, n, seed, noise):
    L = 2 ** (depth + log_extra)
    gen = torch.Generator().manual_seed(seed) if noise else None
    for nodes in tree.descend(n, L, depth, random_choice(seed), gen):
        assert nodes[0].start == 0 and nodes[-1].end == L
        assert all(a.end == b.start for a, b in zip(nodes, nodes[1:])), nodes  # contiguous, in text order
        assert all(node.end > node.start for node in nodes)
        assert sorted(node.level for node in nodes) == list(range(1, depth + 1)) + [depth]
        if not noise:  # exact halves: level d keeps L / 2^d tokens, twice at the last level
            assert all(node.end - node.start == L >> node.level for node in nodes)
        s = tree.strides(depth)
        assert tree.entries(nodes, s) >= depth + 1  # every node keeps at least its first token


@settings(max_examples=25, deadline=None)
@given(depth=st.integers(1, 5), finest=st.sampled_from([1, 2, 4, 8]), log_extra=st.integers(3, 6))
def test_kept_entries_at_exact_halves(depth, finest, log_extra):
    L = finest * 2 ** (depth + log_extra)
    nodes = tree.descend(1, L, depth, lambda *a: tree.right_policy(1))[0]
    s = tree.strides(depth, finest)
    beta = finest * 2 ** depth / (depth + 1)  # chunk tokens per kept entry
    assert tree.entries(nodes, s) == L / beta
    for node in nodes:
        kept = list(tree.kept_positions(node, s))
        assert kept[0] == node.start and kept[-1] < node.end
        assert all(b - a == s[node.level - 1] for a, b in zip(kept, kept[1:]))


def test_defaults_keep_128_entries_per_1024_chunk():
    nodes = tree.descend(1, 1024, 3, lambda *a: tree.right_policy(1))[0]
    assert tree.strides(3) == [16, 8, 4]
    assert [(n.start, n.end, n.level) for n in nodes] == [(0, 512, 1), (512, 768, 2), (768, 896, 3), (896, 1024, 3)]
    assert tree.entries(nodes, tree.strides(3)) == 128


@settings(max_examples=50, deadline=None)
@given(length=st.integers(2, 4096), seed=st.integers(0, 2**31), min_child=st.integers(1, 8))
def test_split_noise_is_clamped(length, seed, min_child):
    min_child = min(min_child, length // 2)
    b = tree.split_point(length, min_child, torch.Generator().manual_seed(seed))
    assert min_child <= b <= length - min_child
    assert tree.split_point(length) == length // 2


def test_split_noise_is_centred_with_sigma_l_over_5():
    g = torch.Generator().manual_seed(0)
    cuts = torch.tensor([tree.split_point(1000, 1, g) for _ in range(4000)], dtype=torch.float)
    assert abs(cuts.mean() - 500) < 10 and abs(cuts.std() - 200) < 15


def test_cosine_policy_compares_each_chunk_with_its_own_halves():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    left = torch.tensor([[1.0, 0.1], [1.0, 0.1]])
    right = torch.tensor([[0.1, 1.0], [0.1, 1.0]])
    assert tree.cosine_policy(left, right, q).tolist() == [False, True]


def test_maxsim_finds_the_span_anywhere_and_ignores_padding():
    torch.manual_seed(0)
    query = torch.randn(1, 3, 8)
    left, right = torch.randn(1, 10, 8), torch.randn(1, 10, 8)
    right[0, 4:7] = query[0]  # a copy of the question in the middle of the right child
    ones = torch.ones(1, 10, dtype=torch.bool)
    assert tree.maxsim_policy(left, ones, right, ones, query).item() is True
    left[0, 9] = query[0, 0] * 5  # a perfect match on a padded position must not count
    mask = ones.clone()
    mask[0, 9] = False
    assert tree.maxsim(left, mask, query) < tree.maxsim(right, ones, query)


def test_phrase_maxsim_ranks_the_adjacent_pair_above_the_same_tokens_apart():
    eye = torch.eye(8)
    query = eye[[1, 2, 3]]  # three question tokens: pairs (1, 2) and (2, 3)
    together = eye[[0, 1, 2, 3, 0, 0]][None]  # the question's pairs side by side
    apart = eye[[1, 0, 2, 0, 3, 0]][None]  # the same tokens, never adjacent
    ones = torch.ones(1, 6, dtype=torch.bool)
    assert tree.maxsim(together, ones, query[None]) == tree.maxsim(apart, ones, query[None])  # tokens alone tie
    assert tree.phrase_cosines(together, query)[0].tolist() == [[1.0, 1.0]]  # one score per question pair
    assert tree.phrase_cosines(apart, query)[0].tolist() == [[0.0, 0.0]]
    assert tree.phrase_cosines(apart, query[:1])[0].tolist() == [[1.0]]  # one question token: plain MaxSim
    assert tree.phrase_cosines(apart, query)[1].tolist() == [[1.0, 1.0, 1.0]]  # and each token's best match


def test_rarity_weighting_ranks_the_one_rare_match_above_matches_every_chunk_has():
    common = [1.0, 1.0, 0.0]  # pairs like "what is" and "the" match every filler chunk; the rare pair does not
    pairs = torch.tensor([common, common, common, [0.2, 0.2, 1.0]])  # the key's chunk: the rare pair only
    assert pairs.sum(-1).argmax() != 3  # summed as they are, the filler wins
    assert tree.rarity_weighted_sum(pairs).argmax() == 3
    scores = tree.rarity_weighted_sum(torch.tensor([[1.0, 0.5], [1.0, 0.0]]))  # a pair equal everywhere counts 0
    assert torch.allclose(scores, torch.tensor([0.375, 0.0]))


def test_idf_counts_a_token_by_how_few_chunks_contain_it():
    tokens = torch.tensor([[0.95, 0.95, 0.2],  # a word every chunk has, and a name only chunk 0 has
                           [0.95, 0.3, 0.2],
                           [0.95, 0.3, 0.95],  # a token two of four chunks have
                           [0.95, 0.3, 0.95]])
    assert torch.allclose(tree.contained_idf(tokens), torch.tensor([1.0, 0.0, 0.5, 0.5]))  # log(4/1), log(4/2) over log 4
    assert torch.equal(tree.contained_idf(tokens, threshold=0.99), torch.zeros(4))  # nothing matches: nothing counts



def test_an_exact_rare_pair_outranks_chunks_that_match_many_words_weakly():
    """At 200K (EXPERIMENTS §14): the key's chunk has the pair "pass key" exactly, but its other pairs and its words
    ("pass", "key") are common; 20 filler chunks match other pairs fairly ("why do the" for "did the") and hold
    rarer words ("text", "give")."""
    n = 21
    pairs = torch.full((n, 4), 0.45)
    pairs[1:, 2] = torch.linspace(0.6, 0.86, n - 1)  # fair matches of a common pair, no chunk has it exactly
    pairs[0, 1] = 0.99  # the key's chunk: "pass key"
    tokens = torch.full((n, 5), 0.3)
    tokens[:, :2] = 0.95  # "pass", "key": in every chunk
    tokens[1:3, 2:] = 0.95  # rarer words, in two filler chunks
    shipped_before = tree.rarity_weighted_sum(pairs) + 0.5 * tree.contained_idf(tokens)
    assert shipped_before.argmax() != 0  # the rare words of the filler won
    assert tree.chunk_scores(pairs, tokens).argmax() == 0
