"""SharedLLM on tiny random models: gate 0 is the base model; memory invariances; cached decoding; weight sharing."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import tree
from sharedllm import Config, KVCache, Transformer, apply_rope, rope_cos_sin, rope_inv_freq

V, L = 101, 64


def tiny(seed=0, gates=0.0, **kw):
    torch.manual_seed(seed)
    cfg = Config(**{**dict(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=V, hidden_dim=96, n_inject=2,
                           chunk_len=L), **kw})
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.15)
        model.init_cross_attention()
        for layer in model.layers[:cfg.n_inject]:
            layer.cross_attention.gate.fill_(gates)
    return model


def make_query(model, policy, xd, q=6):
    """The query block of xd's last q tokens (the question; the prompt ends with it), and the model's
    policy set by name; None for the right policy."""
    if policy == "right":
        return None
    model.cfg.policy = policy
    T = xd.size(1)
    return model.query_states(xd, max(T - q, 0), T - 1)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), n=st.integers(1, 5), B=st.integers(1, 3), T=st.integers(1, 40),
       policy=st.sampled_from(["right", "cosine", "maxsim"]), noise=st.booleans())
def test_gates_at_zero_give_exactly_the_base_model(seed, n, B, T, policy, noise):
    model = tiny(seed % 5)
    torch.manual_seed(seed)
    context, xd = torch.randint(0, V, (B, n * L)), torch.randint(0, V, (B, T))
    gen = torch.Generator().manual_seed(seed) if noise else None
    memory = model.encode_context(context, make_query(model, policy, xd), generator=gen)
    with torch.no_grad():
        assert torch.equal(model(xd, memory=memory), model(xd))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), n=st.integers(2, 6), policy=st.sampled_from(["right", "cosine", "maxsim"]))
def test_permuting_chunks_with_their_positions_changes_nothing(seed, n, policy):
    model = tiny(seed % 5, gates=0.8)
    torch.manual_seed(seed)
    context, xd = torch.randint(0, V, (1, n * L)), torch.randint(0, V, (1, 20))
    perm = torch.randperm(n)
    while n > 1 and torch.equal(perm, torch.arange(n)):
        perm = torch.randperm(n)
    shuffled = context.view(n, L)[perm].reshape(1, -1)
    q = make_query(model, policy, xd)
    with torch.no_grad():
        base = model(xd, memory=model.encode_context(context, q))
        same = model(xd, memory=model.encode_context(shuffled, q, chunk_positions=[perm.tolist()]))
        moved = model(xd, memory=model.encode_context(shuffled, q))  # chunks moved, positions not
    assert torch.allclose(base, same, atol=1e-5)
    assert (base - moved).abs().max() > 1e-4, "chunk-level positions had no effect"  # 10x the tolerance above


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), n=st.integers(1, 4), shift=st.integers(1, 500))
def test_the_query_sits_one_past_the_last_chunk_so_only_distances_matter(seed, n, shift):
    """Chunk positions shifted by a constant (as sampled positions do) leave every query-to-chunk
    distance, and so the output, unchanged. Gaps between chunks rotate each chunk's keys by its extra
    distance: RoPE composes, so the keys at positions p_i are those at i turned by p_i - i."""
    model = tiny(seed % 5, gates=0.8)
    torch.manual_seed(seed)
    context, xd = torch.randint(0, V, (1, n * L)), torch.randint(0, V, (1, 12))
    q = make_query(model, "cosine", xd)
    shifted = model.encode_context(context, q, chunk_positions=[[i + shift for i in range(n)]])
    assert torch.equal(shifted.cos, rope_cos_sin(rope_inv_freq(model.cfg), torch.tensor([[n + shift]]))[0])
    with torch.no_grad():
        base = model(xd, memory=model.encode_context(context, q))
        assert torch.allclose(model(xd, memory=shifted), base, atol=1e-4)
    positions = [i * (shift + 1) for i in range(n)]
    gaps, plain = (model.encode_context(context, q, chunk_positions=p) for p in ([positions], None))
    turn = torch.tensor(positions).repeat_interleave(plain.k[0].size(2) // n)  # entries per chunk
    cos, sin = rope_cos_sin(rope_inv_freq(model.cfg), turn - turn.div(shift + 1, rounding_mode="floor"))
    for a, b in zip(gaps.k, plain.k):
        assert torch.allclose(a, apply_rope(b, cos, sin), atol=1e-3)  # fp32 angles near 2,000 rad


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), T=st.integers(2, 40), data=st.data())
def test_cached_decoding_with_fixed_memory_equals_recomputing(seed, T, data):
    model = tiny(seed % 5, gates=0.7)
    torch.manual_seed(seed)
    context, xd = torch.randint(0, V, (2, 3 * L)), torch.randint(0, V, (2, T))
    memory = model.encode_context(context, make_query(model, "cosine", xd))
    prefill = data.draw(st.integers(1, T - 1))
    with torch.no_grad():
        full = model(xd, memory=memory)
        cache = KVCache(model.cfg, 2, T)
        outs = [model(xd[:, :prefill], cache=cache, memory=memory)]
        outs += [model(xd[:, t:t + 1], cache=cache, memory=memory) for t in range(prefill, T)]
        last = model(xd, memory=memory, last_only=True)
    assert torch.allclose(torch.cat(outs, 1), full, atol=1e-5)
    assert torch.allclose(last, full[:, -1:], atol=1e-6)


@pytest.mark.parametrize("logn", [False, True])
def test_batched_sequences_with_different_lengths_equal_each_alone(logn):
    """Padding the memory of a shorter context and masking it changes nothing for that sequence (nor its logn
    factor, counted on its own entries)."""
    model = tiny(1, gates=0.9, logn=logn)
    torch.manual_seed(0)
    contexts, xd = [torch.randint(0, V, (4 * L,)), torch.randint(0, V, (1 * L,))], torch.randint(0, V, (2, 12))
    q = make_query(model, "cosine", xd)
    with torch.no_grad():
        both = model(xd, memory=model.encode_context(contexts, q))
        for b in range(2):
            alone = model(xd[b:b + 1], memory=model.encode_context([contexts[b]], q[b:b + 1]))
            assert torch.allclose(both[b], alone[0], atol=1e-5)


def test_logn_changes_nothing_for_one_chunk_and_sharpens_many():
    """The factor is 1 for a one-chunk memory (a one-chunk-trained adapter reads it as before) and > 1 beyond."""
    plain, logn = tiny(3, gates=0.8), tiny(3, gates=0.8, logn=True)
    torch.manual_seed(0)
    xd = torch.randint(0, V, (1, 10))
    with torch.no_grad():
        for n in (1, 4):
            context = torch.randint(0, V, (1, n * L))
            a, b = plain(xd, memory=plain.encode_context(context)), logn(xd, memory=logn.encode_context(context))
            assert torch.allclose(a, b, atol=1e-6) == (n == 1)


def test_group_size_and_padded_nodes_change_nothing():
    """Chunks encoded in groups of 1 equal one big group; noisy (right-padded) nodes equal each node alone."""
    model = tiny(2)
    torch.manual_seed(0)
    context = torch.randint(0, V, (1, 5 * L))
    q = make_query(model, "maxsim", torch.randint(0, V, (1, 30)))
    a, b = model.encode_context(context, q, group=1), model.encode_context(context, q, group=16)
    assert a.trees == b.trees
    assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(a.k + a.v, b.k + b.v))
    b = model.encode_context(context, q, generator=torch.Generator().manual_seed(3))  # unequal node lengths
    strides = tree.strides(3)
    for c, nodes in enumerate(b.trees[0]):  # one node alone through the same layers, no padding around it
        node = nodes[1]
        before = [n for chunk in b.trees[0][:c] for n in chunk] + nodes[:1]
        start = tree.entries(before, strides)
        alone = model.lower(context[:, c * L + node.start:c * L + node.end], strides[node.level - 1])
        e = len(tree.kept_positions(node, strides))
        assert torch.allclose(b.v[1][0, :, start:start + e], alone[1][1][0], atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), counts=st.lists(st.integers(1, 5), min_size=1, max_size=3),
       policy=st.sampled_from(["right", "cosine", "maxsim"]), stride=st.sampled_from([1, 4]), moved=st.booleans())
def test_memory_from_the_pool_equals_encode_context(seed, counts, policy, stride, moved):
    """Sequences made of pool chunks (repeats allowed) and fresh chunks (-1), at any chunk positions: the memory
    gathered from the pool equals encode_context on the same tokens, node for node."""
    model = tiny(seed % 5, finest_stride=stride)
    rng = torch.Generator().manual_seed(seed)
    pool_chunks = torch.randint(0, V, (6, L), generator=rng)
    picks = [torch.randint(-1, 6, (n,), generator=rng).tolist() for n in counts]
    fresh = torch.randint(0, V, (sum(p.count(-1) for p in picks), L), generator=rng)
    rows = iter(fresh)
    tokens = [torch.cat([next(rows) if r < 0 else pool_chunks[r] for r in p]) for p in picks]
    positions = [sorted(torch.randperm(300, generator=rng)[:n].tolist()) for n in counts] if moved else None
    xd = torch.randint(0, V, (len(counts), 20), generator=rng)
    query = make_query(model, policy, xd)
    want = model.encode_context(tokens, query, chunk_positions=positions)
    got = model.memory_from_pool(model.encode_pool(pool_chunks, group=4), picks, query, positions, fresh=fresh)
    assert got.trees == want.trees
    assert (got.mask is None) == (want.mask is None) and (got.mask is None or torch.equal(got.mask, want.mask))
    assert torch.equal(got.cos, want.cos) and torch.equal(got.sin, want.sin)
    for a, b in zip(got.k + got.v, want.k + want.v):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5)


def test_layer0_reuse_equals_recomputing():
    model = tiny(3)
    tokens = torch.randint(0, V, (3, 40))
    reused = model.lower(tokens, 4, x1=model.layer0_states(tokens)[1])
    fresh = model.lower(tokens, 4)
    assert all(torch.allclose(a, b, atol=1e-6) for kv1, kv2 in zip(reused, fresh) for a, b in zip(kv1, kv2))


def test_lower_pass_is_the_bottom_layers_of_the_same_model():
    model = tiny(4)
    M, cfg = model.cfg.n_inject, model.cfg
    base = tiny(4, n_inject=1)  # the same Llama; count its parameters without the extra cross-attention
    per_layer_extra = 2 * cfg.dim * cfg.n_heads * cfg.head_dim + cfg.dim + 1  # wq, wo, norm, gate
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == sum(p.numel() for p in base.parameters()) + (M - 1) * per_layer_extra  # no second copy
    context = torch.randint(0, V, (1, 2 * L))
    before = model.encode_context(context)
    with torch.no_grad():
        model.layers[M].attention.wk.weight.mul_(3)  # above the lower model: memory must not change
        model.layers[M].feed_forward.w2.weight.mul_(3)
    same = model.encode_context(context)
    assert all(torch.equal(a, b) for a, b in zip(before.k + before.v, same.k + same.v))
    with torch.no_grad():
        model.layers[0].feed_forward.w2.weight.mul_(3)  # inside it: every layer above 0 changes
    changed = model.encode_context(context)
    assert torch.equal(before.k[0], changed.k[0]) and not torch.allclose(before.k[1], changed.k[1])


@pytest.mark.parametrize("logn", [False, True])
def test_cross_attention_matches_a_manual_softmax(logn):
    """The memory read, written out by hand: softmax(q k^T / sqrt(D)) v with chunk-level RoPE positions; with
    logn the logits are multiplied by log(entries) / log(entries per chunk)."""
    model = tiny(5, gates=0.6, logn=logn)
    torch.manual_seed(1)
    memory = model.encode_context(torch.randint(0, V, (1, 3 * L)))
    x = torch.randn(1, 9, model.cfg.dim)
    ca, cfg = model.layers[1].cross_attention, model.cfg
    k, v = memory.k[1], memory.v[1]
    with torch.no_grad():
        got = ca(x, k, v, memory)
        q = ca.wq(ca.norm(x)).view(1, 9, cfg.n_heads, cfg.head_dim).transpose(1, 2)
        from sharedllm import apply_rope, rope_cos_sin, rope_inv_freq
        cos, sin = rope_cos_sin(rope_inv_freq(cfg), torch.tensor([3]))  # n = 3 chunks
        q = apply_rope(q, cos, sin) * (math.log(k.shape[2]) / math.log(k.shape[2] / 3) if logn else 1)
        rep = cfg.n_heads // cfg.n_kv_heads
        att = (q @ k.repeat_interleave(rep, 1).transpose(-1, -2) / math.sqrt(cfg.head_dim)).softmax(-1)
        y = (att @ v.repeat_interleave(rep, 1)).transpose(1, 2).reshape(1, 9, -1)
        want = math.tanh(0.6) * ca.wo(y)
    assert torch.allclose(got, want, atol=1e-5)
    assert memory.k[1].shape[2] == 3 * L // 8  # L / beta entries per chunk at the defaults


@pytest.mark.parametrize("policy", ["cosine", "maxsim"])
def test_query_aware_descent_finds_a_planted_copy_of_the_query(policy):
    """Plant the question text in a different quarter of each chunk; descent must end in that quarter."""
    model = tiny(6)
    torch.manual_seed(2)
    n, qlen = 4, 6
    question = torch.randint(0, V, (qlen,))
    context = torch.randint(0, V, (n, L))
    # cosine compares last tokens, so the copy must end the half it sits in (quarters 1 and 3, 0-based);
    # MaxSim finds it anywhere inside a quarter
    quarters = [1, 3, 1, 3] if policy == "cosine" else [0, 2, 3, 1]
    for c, quarter in enumerate(quarters):
        end = (quarter + 1) * L // 4 - (0 if policy == "cosine" else 3)
        context[c, end - qlen:end] = question
    xd = torch.cat([torch.randint(0, V, (20,)), question])[None]
    query = make_query(model, policy, xd, qlen)
    memory = model.encode_context(context.reshape(1, -1), query)
    for c, quarter in enumerate(quarters):
        finest = [node for node in memory.trees[0][c] if node.level == 3]
        assert (finest[0].start, finest[1].end) == (quarter * L // 4, (quarter + 1) * L // 4), (c, finest)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31), counts=st.lists(st.integers(1, 6), min_size=1, max_size=3),
       top=st.integers(1, 4), moved=st.booleans())
def test_top_chunks_keeps_the_chunks_with_the_question_and_equals_encode_context_on_them(seed, counts, top, moved):
    """Plant the question in one chunk per sequence: with top_chunks it is kept, and the memory equals
    encode_context on the kept chunks alone (at their positions); dropped chunks have no tree."""
    model = tiny(seed % 5)
    rng = torch.Generator().manual_seed(seed)
    question = torch.randint(0, V, (2, 6), generator=rng)
    context = [torch.randint(0, V, (n, L), generator=rng) for n in counts]
    planted = [int(torch.randint(0, n, (), generator=rng)) for n in counts]
    for b, (c, at) in enumerate(zip(context, planted)):
        c[at, 20:26] = question[b % 2]
    xd = torch.cat([torch.randint(0, V, (len(counts), 10), generator=rng), question[[b % 2 for b in range(len(counts))]]], 1)
    query = make_query(model, "maxsim", xd)
    positions = [sorted(torch.randperm(300, generator=rng)[:n].tolist()) for n in counts] if moved else None
    got = model.encode_context([c.flatten() for c in context], query, chunk_positions=positions, top_chunks=top)
    kept = [[i for i, t in enumerate(trees) if t] for trees in got.trees]
    assert [len(k) for k in kept] == [min(top, n) for n in counts]
    assert all(at in k for at, k in zip(planted, kept))
    want = model.encode_context([c[k].flatten() for c, k in zip(context, kept)], query,
                                chunk_positions=positions and [[p[i] for i in k] for p, k in zip(positions, kept)])
    assert [[t for t in trees if t] for trees in got.trees] == want.trees
    assert torch.equal(got.cos, want.cos) and (got.mask is None) == (want.mask is None)
    for a, b in zip(got.k + got.v, want.k + want.v):
        assert torch.equal(a, b)
