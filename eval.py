"""Measure SharedLLM: benchmarks, not tests. Run them on a quiet machine; tables go to stdout.

    python eval.py speed                             # 4K..128K, three modes, one process
    python eval.py speed --question --lengths 131072 --modes sharedllm   # the QA path
    python eval.py ppl --files kjv.txt --modes sharedllm window other   # perplexity, a control
    python eval.py passkey --held_out --lengths 8192 32768 --plot pk.png # accuracy, length x depth
    python eval.py passkey --held_out --paper        # the same with the paper's method
    python eval.py descent --trials 200              # does the tree keep a hidden key finely?
    python eval.py tree --plot tree.png              # draw the demo's context tree
"""
import argparse
import importlib.util
import math
import random
import re
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils import benchmark
from torch.utils.flop_counter import FlopCounterMode

import tree
from data import (FACTS, LOOKUPS, NAMES, NEEDLE, NEEDLES, QUESTIONS, THINGS, builtin_docs,
                  demo_document, format_input, held_out_code, insert, pass_key_prefix, token_span)
from generate import (DTYPES, LM_RUNNING, QA_RUNNING, add_method_flags, at_least, checked,
                      dtype_name, generate, layout, method, pick_dtype, prepare)
from load_llama import LoadError, load_model

parser = argparse.ArgumentParser(description="Benchmarks for SharedLLM.")
sub = parser.add_subparsers(dest="command", required=True)
MODES = ["sharedllm", "window", "full"]
GREEDY = lambda logits: int(logits.argmax())  # noqa: E731  (no stop token: every token asked for)


def command(name, helptext, lengths=None, modes=None):
    p = sub.add_parser(name, help=helptext)
    p.add_argument("--model", default="smollm2-135m", help="HF Llama folder, or 'smollm2-135m'")
    p.add_argument("--adapter", default="auto", help="trained weights; 'none': gates at 0; 'auto': "
                   "the shipped one (question answering for passkey, descent, tree, speed "
                   "--question)")
    p.add_argument("--seed", type=int, default=0, help="where windows, keys and offsets are drawn")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda")
    p.add_argument("--dtype", default="auto", choices=DTYPES, help="auto: bf16 where it is fast")
    add_method_flags(p)
    if lengths:
        p.add_argument("--lengths", nargs="+", type=at_least(1), default=lengths,
                       help="input lengths in tokens")
        p.add_argument("--modes", nargs="+", choices=MODES + ["other"] * (name == "ppl"),
                       default=modes, help="what reads the input: sharedllm, window (X_D alone), "
                       "full (ppl: also other, the memory of an unrelated place: a control)")
    return p


speed = command("speed", "time and peak memory vs input length, the modes side by side",
                [4096, 8192, 16384, 32768, 65536, 131072], MODES)
speed.add_argument("--new_tokens", type=at_least(2), default=32, help="tokens decoded")
speed.add_argument("--full_max", type=int, default=32768, help="longest input for --mode full")
speed.add_argument("--question", action="store_true", help="sharedllm as generate.py --prompt: "
                   "chat format, the question-answering adapter, chunk selection")
ppl = command("ppl", "perplexity of the last 256 tokens", [4096, 8192, 32768, 131072], MODES)
ppl.add_argument("--files", nargs="*", default=[], help="text files (default: the standard "
                 "library's packages, never trained on)")
ppl.add_argument("--windows", type=at_least(1), default=8, help="windows, shared by all lengths")
ppl.add_argument("--full_max", type=int, default=8192, help="longest input for --mode full")
passkey = command("passkey", "pass-key accuracy, length x depth", [8192, 32768, 131072],
                  MODES[:2])
passkey.add_argument("--task", choices=["passkey", "lookup"], default="passkey", help="passkey: "
                     "one key; lookup: the named fact asked for among --facts of one kind")
passkey.add_argument("--facts", default=4, help="lookup: named facts hidden, the others anywhere",
                     type=checked(int, lambda n: 1 <= n <= len(NAMES),
                                  f"a lookup hides 1 to {len(NAMES)} named facts"))
passkey.add_argument("--depths", nargs="+", default=[0, 0.25, 0.5, 0.75, 1],
                     type=checked(float, lambda d: 0 <= d <= 1,
                                  "a depth is a fraction from 0 to 1"),
                     help="needle depths (fractions)")
passkey.add_argument("--trials", type=at_least(1), default=4, help="keys per length and depth")
passkey.add_argument("--kept_at", choices=["0..k-1", "text"], default="0..k-1", help="where kept "
                     "chunks sit (Eq. 2): at positions 0..k-1, as generate.py, or with the text's "
                     "gaps between them (an ablation)")
passkey.add_argument("--held_out", action="store_true", help="filler and wordings that training "
                     "never uses (the standard library's packages; the held-out wordings)")
passkey.add_argument("--plot", help="write the accuracy heatmap to this PNG (needs matplotlib)")
descent = command("descent", "how often descent keeps a hidden pass key at the finest level")
descent.add_argument("--trials", type=at_least(1), default=200, help="needles, at random offsets")
descent.add_argument("--mass_trials", type=at_least(0), default=20, help="of them, with the "
                     "attention measured")
draw = command("tree", "draw the demo's context tree: kept spans and strides, chunk by chunk")
draw.add_argument("--plot", required=True, help="the PNG to write (needs matplotlib)")


def peak_mb(device, reset=False) -> float:
    """Peak memory since the reset: the RSS high-water mark on CPU (Linux), the allocator's on
    CUDA."""
    if device.type == "cuda":
        if reset:
            return torch.cuda.reset_peak_memory_stats()
        return torch.cuda.max_memory_allocated() / 2**20
    if reset:
        return Path("/proc/self/clear_refs").write_text("5")
    return int(re.search(r"VmHWM:\s*(\d+)", Path("/proc/self/status").read_text())[1]) / 1024


def matmul_rate(device, dtype, n=4096) -> float:
    """FLOP/s of an n x n x n matmul (median of repeats): the practical peak for this dtype."""
    timer = benchmark.Timer("a @ a", globals={"a": torch.randn(n, n, device=device, dtype=dtype)},
                            num_threads=torch.get_num_threads())
    return 2 * n**3 / timer.blocked_autorange(min_run_time=2).median


def text_tokens(tokenizer, n: int, held_out: bool = False) -> list[int]:
    """n tokens of real text: Python's docs and standard library (what training reads), repeated;
    held_out: the standard library's packages (asyncio, email, ...), which training never reads."""
    text = held_out_code() if held_out else "\n\n".join(builtin_docs())
    ids = tokenizer.encode(text[:8 * n]).ids  # text is ~4 characters a token
    return (ids * (n // len(ids) + 1))[:n]


def table(title, header, rows):
    print(f"\n{title}\n\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(map(str, row)) + " |")


def run_speed(args, model, tokenizer):
    device, dtype = model.output.weight.device, model.output.weight.dtype
    name, cfg, L = dtype_name(dtype), model.cfg, model.cfg.chunk_len
    args.running = args.running or (QA_RUNNING if args.question else LM_RUNNING)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    question = tokenizer.encode("\n\nQuestion: what is this text about? Answer:").ids
    ids = text_tokens(tokenizer, max(args.lengths))
    peak_rate, threads = matmul_rate(device, dtype), torch.get_num_threads()
    print(f"{name} matmul: {peak_rate / 1e12:.2f} TFLOP/s; {threads} threads", file=sys.stderr)
    ask = lambda x: model.query_states(x, x.size(1) - len(question), x.size(1) - 1)  # noqa: E731

    # 1. Tree FLOPs per chunk (torch counts the matmuls of a 4-chunk context: every chunk costs the
    # same) and of the query pass, to turn tree time into achieved FLOP/s.
    with FlopCounterMode(display=False) as query_counter:
        query = ask(torch.tensor([ids[:args.running]], device=device))
    with FlopCounterMode(display=False) as counter:
        model.encode_context(torch.tensor([ids[:4 * L]], device=device), query)
    query_flops, chunk_flops = query_counter.get_total_flops(), counter.get_total_flops() / 4

    rows = []
    for T in args.lengths:
        tokens = ids[:T - len(question)] + question
        n = layout(T, cfg.max_seq_len, L, args.running, args.new_tokens)
        for mode in args.modes:
            if mode == "full" and T > args.full_max:
                continue
            split = 0 if mode == "full" else n * L
            running = torch.tensor([tokens[split:]], device=device)
            print(f"{mode} at {T} tokens ...", file=sys.stderr)
            peak_mb(device, reset=True)
            sync()
            t0 = time.perf_counter()
            memory, kept = None, n
            if mode == "sharedllm" and args.question:  # 2. the tree, as generate.py --prompt does
                _, n, running, memory, _ = prepare(model, tokenizer, tokenizer.decode(ids[:T - 32]),
                                                   "What is this text about?", "", "sharedllm",
                                                   args.new_tokens, args.running,
                                                   top_chunks=args.top_chunks)
                kept = sum(map(bool, memory.trees[0])) if memory is not None else 0
            elif mode == "sharedllm" and n > 0:  # 2. the tree, every chunk, against the question
                context = torch.tensor([tokens[:split]], device=device)
                memory = model.encode_context(context, ask(running))
            sync()
            t1, steps = time.perf_counter(), []
            for _ in generate(model, running, memory, args.new_tokens, set(), GREEDY):  # 3. prefill
                sync()  # and decode
                steps.append(time.perf_counter())
            total = steps[-1] - t0
            decode = (len(steps) - 1) / (steps[-1] - steps[0])
            flops = n * chunk_flops + query_flops  # every chunk's tree: not the --question path
            tree_rate = flops / (t1 - t0) / peak_rate if memory and not args.question else 0
            chunks = (f"{kept} of {n}" if args.question else n) if mode == "sharedllm" else 0
            rows.append([T, mode, chunks, running.size(1), f"{t1 - t0:.1f}", f"{steps[0] - t1:.1f}",
                         f"{decode:.1f}", f"{total:.1f}", f"{peak_mb(device):.0f}",
                         f"{tree_rate:.0%}" if tree_rate else "", total])

    # 4. The table, with each length's speed-up of sharedllm over full attention.
    full = {r[0]: r[-1] for r in rows if r[1] == "full"}
    for r in rows:
        r[-1] = f"{full[r[0]] / r[-1]:.1f}x" if r[1] == "sharedllm" and r[0] in full else ""
    table(f"{name}, {threads} threads on {device.type}; matmul peak {peak_rate / 1e12:.2f} TFLOP/s "
          f"(start) / {matmul_rate(device, dtype) / 1e12:.2f} (end); {args.new_tokens} new tokens",
          ["tokens", "mode", "chunks", "running", "tree s", "prefill s", "decode tok/s", "total s",
           "peak MB", "tree % of peak", "full / sharedllm"], rows)


def run_ppl(args, model, tokenizer):
    """X_D = the last 4096 tokens (2048 at 4K), loss on its last 256; the context = the chunks
    before it. window = X_D alone; full = plain attention over all T tokens; other = the memory of a
    place half the text away (a control: no help but its style). Every length ends at the same
    place, so all lengths score the same 256 tokens and differ only in how much comes before."""
    L, rng = model.cfg.chunk_len, random.Random(args.seed)
    try:
        texts = [Path(f).read_text(errors="replace") for f in args.files] or [held_out_code()]
    except OSError as e:
        sys.exit(f"error: cannot read {e.filename} ({e.strerror}); give readable text files")
    ids = [t for enc in tokenizer.encode_batch(texts) for t in enc.ids]
    lengths, modes = [T for T in args.lengths if T <= len(ids)], args.modes
    if not lengths:
        sys.exit(f"error: the text has only {len(ids)} tokens; give more text or shorter --lengths")
    ends = [rng.randrange(max(lengths), len(ids) + 1) for _ in range(args.windows)]
    losses, window_loss = {}, {}  # window: the same last 4096 tokens at every length from 8K on
    for T in lengths:
        D = T - (T - min(4096, T // 2)) // L * L  # the context is whole chunks; X_D the rest
        fits = {"full": T <= args.full_max, "other": 4 * T <= len(ids)}
        run = [m for m in modes if fits.get(m, True)]
        if "other" in modes and "other" not in run:  # half the text away could overlap the window
            print(f"{T}: no 'other' row; it needs {4 * T} tokens of text, not {len(ids)}",
                  file=sys.stderr)
        for end in ends:
            window = torch.tensor([ids[end - T:end]], device=model.output.weight.device)
            targets = window.clone()
            targets[:, :-256] = -100  # loss on the last 256 tokens only
            for mode in run:
                if mode == "full":
                    loss = model(window[:, :-1], targets[:, 1:])[1]
                elif mode == "window" and (end, D) in window_loss:  # computed at a shorter length
                    loss = window_loss[(end, D)]
                else:
                    far = (end - T + len(ids) // 2) % (len(ids) - T + 1)
                    context = window[:, :T - D] if mode == "sharedllm" else \
                        torch.tensor([ids[far:far + T - D]], device=window.device)
                    memory = model.encode_context(context) if mode != "window" else None
                    loss = model(window[:, T - D:-1], targets[:, T - D + 1:], memory=memory)[1]
                    if mode == "window":
                        window_loss[(end, D)] = loss
                losses.setdefault((T, mode), []).append(loss.item())
            now = [f"{m} {math.exp(losses[(T, m)][-1]):.3f}" for m in modes if (T, m) in losses]
            print(f"{T} ending at {end}: " + ", ".join(now), file=sys.stderr)
    rivals = [m for m in ("window", "other") if m in modes and "sharedllm" in modes]
    rows = []
    for T in lengths:
        cells = [f"{math.exp(statistics.mean(losses[(T, m)])):.3f}" if (T, m) in losses else ""
                 for m in modes]
        for m in rivals:
            theirs = losses.get((T, m), [])
            wins = sum(a < b for a, b in zip(losses[(T, "sharedllm")], theirs))
            cells.append(f"{wins}/{len(theirs)}")
        rows.append([T] + cells)
    table(f"perplexity of the same last 256 tokens of {args.windows} windows (exp of the mean "
          f"loss); then the windows where sharedllm's loss was lower",
          ["tokens"] + modes + [f"sharedllm < {m}" for m in rivals], rows)


def run_passkey(args, model, tokenizer):
    """A pass key at each depth of real filler; 'What is the pass key?'; correct when the first
    number generated after "The pass key is " equals the key. --task lookup: --facts named facts
    ("The locker code of Ada is 12345."), the one asked for at the depth, the others anywhere."""
    rng, lengths, depths, modes = random.Random(args.seed), args.lengths, args.depths, args.modes
    held, key_prefix = args.held_out, pass_key_prefix(tokenizer)
    filler = text_tokens(tokenizer, max(lengths), held)
    needles, questions = (NEEDLES[1], QUESTIONS[1]) if held else ([NEEDLE], [QUESTIONS[0][0]])
    facts, lookups = (FACTS[1], LOOKUPS[1]) if held else (FACTS[0][:1], LOOKUPS[0][:1])
    correct, outside = {}, {}  # outside: trials whose key lay before the running text (the tree)
    if args.kept_at == "text":  # every kept chunk at its own chunk index: the text's distances
        encode, L = model.encode_context, model.cfg.chunk_len
        model.encode_context = lambda context, query=None, **kw: encode(
            context, query, chunk_positions=[list(range(c.numel() // L)) for c in context], **kw)
    for T in lengths:
        for depth in depths:
            for _ in range(args.trials):
                key = rng.randint(10000, 99999)
                start = rng.randrange(max(len(filler) - T, 1))
                if args.task == "passkey":
                    hidden = [(depth, rng.choice(needles).format(key=key))]
                    question, prefix = rng.choice(questions), key_prefix
                else:  # the fact asked for at the depth, the other names' facts anywhere
                    names, thing = rng.sample(NAMES, args.facts), rng.choice(THINGS)
                    hidden = [(depth if i == 0 else rng.random(), rng.choice(facts).format(
                        thing=thing, name=name, key=key if i == 0 else rng.randint(10000, 99999)))
                        for i, name in enumerate(names)]
                    question = rng.choice(lookups).format(thing=thing, name=names[0])
                    prefix = pass_key_prefix(tokenizer, f"The {thing} of {names[0]} is")
                text = tokenizer.decode(filler[start:start + T - 40 - 16 * (len(hidden) - 1)])
                text = insert(text, [(int(d * len(text)), sentence) for d, sentence in hidden])
                digits = tokenizer.encode(f" {key}").ids
                for mode in modes:
                    ids, n, tokens, memory, _ = prepare(model, tokenizer, text, question, prefix,
                                                        mode, 8, args.running,
                                                        top_chunks=args.top_chunks)
                    out = list(generate(model, tokens, memory, 8, set(), GREEDY))
                    found = re.findall(r"\d+", tokenizer.decode(out))
                    hit = bool(found) and found[0] == str(key)
                    correct.setdefault((mode, T, depth), []).append(hit)
                    at = max((i for i in range(len(ids)) if ids[i:i + len(digits)] == digits),
                             default=len(ids))
                    if at < n * model.cfg.chunk_len:  # its last mention too
                        outside.setdefault((mode, T), []).append(hit)
            done = [f"{m} {sum(correct[(m, T, depth)])}/{args.trials}" for m in modes]
            print(f"{T} depth {depth}: " + ", ".join(done), file=sys.stderr)
    rate = {(m, T): [statistics.mean(correct[(m, T, d)]) for d in depths]
            for m in modes for T in lengths}
    rows = []
    for (m, T), cells in rate.items():
        kept = outside.get((m, T), [])
        rows.append([m, T] + [f"{c:.0%}" for c in cells + [statistics.mean(cells)]] +
                    [f"{sum(kept)}/{len(kept)}"])
    what = "pass-key" if args.task == "passkey" else f"lookup ({args.facts} named facts)"
    table(f"{what} accuracy, {args.trials} keys per cell; then the keys found of those that lay "
          f"before the running text", ["mode", "tokens"] + [f"depth {d:.0%}" for d in depths] +
          ["all", "key before the running text"], rows)
    if args.plot:
        plot_heatmap(args.plot, rate, modes, lengths, depths, args.trials)


def plot_heatmap(path, rate, modes, lengths, depths, trials):
    """Accuracy per depth (rows) and length (columns), the value written in each cell."""
    import matplotlib.pyplot as plt  # optional: main checked that it is there
    fig, axes = plt.subplots(1, len(modes), figsize=(1.3 * len(lengths) * len(modes) + 2, 3.4),
                             squeeze=False, layout="constrained")
    for ax, mode in zip(axes[0], modes):
        grid = [[rate[(mode, T)][i] for T in lengths] for i in range(len(depths))]
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                ax.text(j, i, f"{value:.0%}", ha="center", va="center", fontsize=9)
        ax.set(title=f"{mode} ({trials} keys a cell)", xlabel="input tokens",
               ylabel="depth of the key", xticks=range(len(lengths)), yticks=range(len(depths)),
               xticklabels=[f"{T // 1024}K" for T in lengths],
               yticklabels=[f"{d:.0%}" for d in depths])
    fig.colorbar(image, ax=axes[0].tolist(), label="keys found")
    fig.savefig(path, dpi=120)
    print(f"wrote {path}", file=sys.stderr)


def run_tree(args, model, tokenizer):
    """The demo's input through the tree, one row per chunk: each kept span coloured by its stride
    (darker: finer), dropped chunks blank, the pass key marked; the answer in the title."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    document, key, _ = demo_document(tokenizer, args.seed)
    ids, n, tokens, memory, _ = prepare(model, tokenizer, document, "What is the pass key?",
                                        pass_key_prefix(tokenizer), "sharedllm", 12, args.running,
                                        top_chunks=args.top_chunks)
    answer = tokenizer.decode(list(generate(model, tokens, memory, 12, set(), GREEDY)))
    found = (re.findall(r"\d+", answer) or ["no number"])[0]
    L, cfg = model.cfg.chunk_len, model.cfg
    strides = tree.strides(cfg.tree_depth, cfg.finest_stride)
    grid = torch.zeros(n, L)  # 0: not kept; d: kept at level d
    for c, nodes in enumerate(memory.trees[0]):
        for node in nodes:
            grid[c, node.start:node.end] = node.level
    digits = tokenizer.encode(f" {key}").ids
    at = next(i for i in range(len(ids)) if ids[i:i + len(digits)] == digits)
    colours = ["#f2f2f2"] + [plt.cm.Blues(0.35 + 0.6 * d / cfg.tree_depth)
                             for d in range(1, cfg.tree_depth + 1)]
    fig, ax = plt.subplots(figsize=(6, 6.5), layout="constrained")
    ax.imshow(grid, cmap=ListedColormap(colours), vmin=0, vmax=cfg.tree_depth, aspect="auto",
              interpolation="nearest")
    ax.plot([at % L], [at // L], marker="<", color="red", markersize=9, label="the pass key")
    for d, s in enumerate(strides, 1):
        every = {1: "every token", 2: "every 2nd token"}.get(s, f"every {s}th token")
        ax.plot([], [], "s", color=colours[d], label=f"level {d}: {every} kept")
    kept = sum(map(bool, memory.trees[0]))
    ax.set(xlabel="token offset in the chunk", ylabel="chunk (text order)",
           title=f"{'the paper' if args.paper else 'this project'}: {cfg.policy} descent, "
                 f"{kept} of {n} chunks kept\nanswer {found} "
                 f"({'correct' if found == str(key) else f'wrong, the key is {key}'})")
    ax.legend(loc="lower left", fontsize=8, framealpha=0.9)
    fig.savefig(args.plot, dpi=110)
    print(f"wrote {args.plot}: answer {found}, key {key}", file=sys.stderr)


def run_descent(args, model, tokenizer):
    """A pass-key sentence at a random offset of a chunk of real text; the running text ends with
    the question. A trial succeeds when the key's digits land in the finest (level-h) nodes; random
    descent: 1 in 2^(h-1). Then, in the first --mass_trials, with MaxSim's memory: the
    cross-attention mass on the key's entries when its first digit is due, per injection layer,
    against the key's share of the entries (uniform attention)."""
    L, rng, cfg = model.cfg.chunk_len, random.Random(args.seed), model.cfg
    device, filler = model.output.weight.device, text_tokens(tokenizer, 400_000)
    strides = tree.strides(cfg.tree_depth, cfg.finest_stride)
    wins, mass = {"right": 0, "cosine": 0, "maxsim": 0}, [[] for _ in range(cfg.n_inject + 1)]

    def attention_mass(j, module, inputs, output):  # a hook: cross-attention j, last position
        x, k, _, memory = inputs  # k: (B, Hkv, S, D)
        k = k.repeat_interleave(module.n_heads // k.size(1), 1)
        logits = module.queries(x[:, -1:], memory) @ k.transpose(-1, -2) * module.head_dim ** -0.5
        p = logits.float().softmax(-1)
        mass[j].append(p[0, :, 0][:, on].sum(-1).mean().item())  # the key's entries, mean over H
    for j, layer in enumerate(model.layers[:cfg.n_inject]):
        layer.cross_attention.register_forward_hook(lambda *a, j=j: attention_mass(j, *a))
    for trial in range(args.trials):
        key = rng.randint(10000, 99999)
        needle = tokenizer.encode(" " + NEEDLE.format(key=key) + " ").ids
        digits = tokenizer.encode(f" {key}").ids
        start = rng.randrange(len(filler) - L - 4096)
        offset = rng.randrange(L - len(needle))
        rest = filler[start + offset:start + L - len(needle)]
        chunk = filler[start:start + offset] + needle + rest
        at = offset + next(i for i in range(len(needle)) if needle[i:i + len(digits)] == digits)
        text, span = format_input(tokenizer, tokenizer.decode(filler[start + L:start + L + 4000]),
                                  "What is the pass key?", pass_key_prefix(tokenizer))
        enc = tokenizer.encode(text)
        running = torch.tensor([enc.ids], device=device)
        block = model.query_states(running, *token_span(enc.offsets, span))
        for policy in wins:  # the last, MaxSim, leaves its nodes and memory for the hooks
            if policy != "right":
                model.cfg.policy = policy
            query = block if policy != "right" else None
            memory = model.encode_context(torch.tensor([chunk], device=device), query)
            nodes = memory.trees[0][0]
            finest = [n for n in nodes if n.level == cfg.tree_depth]
            wins[policy] += finest[0].start <= at and at + len(digits) <= finest[-1].end
        if trial >= args.mass_trials:
            continue
        on = torch.tensor([at <= o < at + len(digits) for n in nodes
                           for o in tree.kept_positions(n, strides)], device=device)
        mass[-1].append(on.float().mean().item())
        model(running, memory=memory, last_only=True)  # the hooks measure
    table(f"key digits kept at the finest level, {args.trials} trials, {L}-token chunks, depth "
          f"{cfg.tree_depth}:", ["policy", "hit rate"],
          [(policy, f"{hits / args.trials:.0%}") for policy, hits in wins.items()])
    if mass[-1]:
        table(f"cross-attention mass on the key's entries when its first digit is due (MaxSim's "
              f"memory, {len(mass[-1])} trials; uniform attention: the key's share of entries):",
              [f"layer {j}" for j in range(cfg.n_inject)] + ["uniform"],
              [[f"{statistics.mean(m):.3f}" for m in mass]])


if __name__ == "__main__":
    args = parser.parse_args()
    if getattr(args, "plot", None) and importlib.util.find_spec("matplotlib") is None:
        sys.exit("error: --plot needs matplotlib (pip install matplotlib); or run without --plot "
                 "for the table")
    dtype, why = pick_dtype(args.dtype, args.device)
    question = args.command in ("passkey", "descent", "tree") or getattr(args, "question", False)
    try:
        model, tokenizer, adapter = load_model(args.model, args.adapter, torch.device(args.device),
                                               dtype, question, **method(args))
    except LoadError as e:
        sys.exit(f"error: {e}")
    print(f"adapter: {adapter}; {dtype_name(dtype)} ({why})", file=sys.stderr)
    torch.set_grad_enabled(False)  # measurement only
    run = {"speed": run_speed, "descent": run_descent, "ppl": run_ppl, "passkey": run_passkey,
           "tree": run_tree}
    run[args.command](args, model, tokenizer)
