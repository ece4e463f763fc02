"""Measure SharedLLM. A benchmark, not a test: run it on a quiet machine; it prints a markdown table
to stdout.

    python eval.py speed                                        # 4K..128K, the three modes, one process
    python eval.py speed --lengths 4096 32768 --modes sharedllm full --new_tokens 16
    python eval.py speed --question --lengths 131072 --modes sharedllm   # the QA path (generate.py --prompt)
    python eval.py descent --trials 200                         # does the tree keep a hidden key finely?
    python eval.py ppl                                          # perplexity at 4K..128K, with and without context
    python eval.py passkey --lengths 8192 32768 131072 --plot   # pass-key accuracy, length x depth
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
                  format_input, held_out_code, insert, pass_key_prefix, token_span)
from generate import (DTYPES, LM_RUNNING, QA_RUNNING, add_method_flags, at_least, checked,
                      dtype_name, generate, layout, method, pick_dtype, prepare)
from load_llama import LoadError, load_model

parser = argparse.ArgumentParser(description="Benchmarks for SharedLLM.")
sub = parser.add_subparsers(dest="command", required=True)


MODES = ["sharedllm", "window", "full"]
GREEDY = lambda logits: int(logits.argmax())  # noqa: E731  (and no stop token: always the tokens asked for)


def command(name, helptext, lengths=None, modes=None):
    p = sub.add_parser(name, help=helptext)
    p.add_argument("--model", default="smollm2-135m", help="HF Llama folder, or 'smollm2-135m'")
    p.add_argument("--adapter", default="auto", help="trained weights; 'none': gates at 0; 'auto': the shipped one "
                   "(passkey, descent: the question-answering one if shipped)")
    p.add_argument("--seed", type=int, default=0, help="where windows, keys and offsets are drawn")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="auto", choices=DTYPES, help="weights and activations (auto: bf16 where fast)")
    add_method_flags(p)
    if lengths:
        p.add_argument("--lengths", nargs="+", type=at_least(1), default=lengths, help="input lengths in tokens")
        p.add_argument("--modes", nargs="+", choices=MODES + ["other"] * (name == "ppl"), default=modes,
                       help="what reads the input: sharedllm, window (X_D alone), full (ppl: also other, a control)")
    return p


speed = command("speed", "time and peak memory vs input length, three modes side by side",
                [4096, 8192, 16384, 32768, 65536, 131072], MODES)
speed.add_argument("--new_tokens", type=at_least(2), default=32, help="tokens decoded after the prefill")
speed.add_argument("--full_max", type=int, default=32768, help="longest input for --mode full (32K: ~6 min on 2 cores)")
speed.add_argument("--question", action="store_true", help="sharedllm as generate.py --prompt: chat format, the "
                   "question-answering adapter ('auto'), its MaxSim descent over the question, --top_chunks")
descent = command("descent", "how often query-aware descent keeps a hidden pass key at the finest level")
descent.add_argument("--trials", type=at_least(1), default=200, help="needles, each at a random offset of its chunk")
descent.add_argument("--mass_trials", type=at_least(0), default=20, help="of them, with the attention measured")
ppl = command("ppl", "perplexity of the last 256 tokens (DESIGN Sec. 7)", [4096, 8192, 32768, 131072], MODES)
ppl.add_argument("--files", nargs="*", default=[], help="text files (default: the stdlib's packages, never trained on)")
ppl.add_argument("--windows", type=at_least(1), default=8, help="windows (end positions), shared by all lengths")
ppl.add_argument("--full_max", type=int, default=8192, help="longest input for --mode full")
passkey = command("passkey", "pass-key retrieval accuracy, length x depth", [8192, 32768, 131072], MODES[:2])
passkey.add_argument("--task", choices=["passkey", "lookup"], default="passkey", help="passkey: one key to find; "
                     "lookup: the named fact asked for among --facts of one kind (\"The locker code of Ada is ...\")")
passkey.add_argument("--facts", default=4, help="lookup: named facts hidden, the others at random depths",
                     type=checked(int, lambda n: 1 <= n <= len(NAMES), f"a lookup hides 1 to {len(NAMES)} named facts"))
passkey.add_argument("--depths", nargs="+", default=[0, 0.25, 0.5, 0.75, 1], help="needle depths (fractions)",
                     type=checked(float, lambda d: 0 <= d <= 1, "a depth is a fraction from 0 to 1"))
passkey.add_argument("--trials", type=at_least(1), default=4, help="keys per length and depth")
passkey.add_argument("--kept_at", choices=["0..k-1", "text"], default="0..k-1", help="where --top_chunks' kept chunks "
                     "sit (Eq. 2): at positions 0..k-1 (as generate.py does), or with the text's gaps between them "
                     "(an ablation; the queries one past the last kept chunk)")
passkey.add_argument("--held_out", action="store_true", help="filler, needle and question wordings that training "
                     "never uses (the stdlib's packages; train.py's validation wordings)")
passkey.add_argument("--plot", help="write the accuracy heatmap to this PNG (needs matplotlib)")


def peak_mb(device, reset=False) -> float:
    """Peak memory since the reset: the high-water mark of the RSS on CPU (Linux), the allocator's
    on CUDA."""
    if device.type == "cuda":
        return torch.cuda.reset_peak_memory_stats() if reset else torch.cuda.max_memory_allocated() / 2**20
    if reset:
        return Path("/proc/self/clear_refs").write_text("5")
    return int(re.search(r"VmHWM:\s*(\d+)", Path("/proc/self/status").read_text())[1]) / 1024


def matmul_rate(device, dtype, n=4096) -> float:
    """FLOP/s of an n x n x n matmul (median of repeats): the machine's practical peak for this
    dtype."""
    timer = benchmark.Timer("a @ a", globals={"a": torch.randn(n, n, device=device, dtype=dtype)},
                            num_threads=torch.get_num_threads())
    return 2 * n**3 / timer.blocked_autorange(min_run_time=2).median


def text_tokens(tokenizer, n: int, held_out: bool = False) -> list[int]:
    """n tokens of real text: Python's docs, then its standard library's sources (train.py's
    corpus), repeated; held_out: the standard library's packages (asyncio, email, ...), which
    training never reads."""
    text = held_out_code() if held_out else "\n\n".join(builtin_docs())
    ids = tokenizer.encode(text[:8 * n]).ids  # text is ~4 characters a token
    return (ids * (n // len(ids) + 1))[:n]


def table(title, header, rows):
    print(f"\n{title}\n\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(map(str, row)) + " |")


def run_speed(args, model, tokenizer):
    device, dtype = model.output.weight.device, model.output.weight.dtype
    name = dtype_name(dtype)
    cfg, L = model.cfg, model.cfg.chunk_len
    args.running = args.running or (QA_RUNNING if args.question else LM_RUNNING)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    question = tokenizer.encode("\n\nQuestion: what is this text about? Answer:").ids
    ids = text_tokens(tokenizer, max(args.lengths))
    peak_rate = matmul_rate(device, dtype)
    print(f"{name} matmul: {peak_rate / 1e12:.2f} TFLOP/s; {torch.get_num_threads()} threads", file=sys.stderr)

    # 1. Tree FLOPs per chunk (matmuls, counted by torch on a 4-chunk context: every chunk costs the same at
    # inference) and of the query pass, to turn tree time into achieved FLOP/s.
    with FlopCounterMode(display=False) as query_counter:
        x = torch.tensor([ids[:args.running]], device=device)
        query = model.query_states(x, x.size(1) - len(question), x.size(1) - 1)
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
            if mode == "sharedllm" and args.question:  # 2. the context tree: as generate.py --prompt builds it
                _, n, running, memory, _ = prepare(model, tokenizer, tokenizer.decode(ids[:T - 32]),
                                                   "What is this text about?", "", "sharedllm",
                                                   args.new_tokens, args.running,
                                                   top_chunks=args.top_chunks)
                kept = sum(map(bool, memory.trees[0])) if memory is not None else 0
            elif mode == "sharedllm" and n > 0:  # 2. the context tree, query-aware (the question)
                query = model.query_states(running, running.size(1) - len(question),
                                           running.size(1) - 1)
                memory = model.encode_context(torch.tensor([tokens[:split]], device=device), query)
            sync()
            t1 = time.perf_counter()
            steps = []
            for _ in generate(model, running, memory, args.new_tokens, set(), GREEDY):  # 3. prefill, decode
                sync()
                steps.append(time.perf_counter())
            total = steps[-1] - t0
            decode = (len(steps) - 1) / (steps[-1] - steps[0])
            tree_rate = (n * chunk_flops + query_flops) / (t1 - t0) / peak_rate if memory is not None else 0
            tree_rate *= not args.question  # the FLOPs counted above are those of every chunk's tree
            rows.append([T, mode, (f"{kept} of {n}" if args.question else n) if mode == "sharedllm" else 0,
                         running.size(1), f"{t1 - t0:.1f}",
                         f"{steps[0] - t1:.1f}", f"{decode:.1f}", f"{total:.1f}", f"{peak_mb(device):.0f}",
                         f"{tree_rate:.0%}" if tree_rate else "", total])

    # 4. The table, with each length's speed-up of sharedllm over full attention.
    full = {r[0]: r[-1] for r in rows if r[1] == "full"}
    table(f"{name}, {torch.get_num_threads()} threads on {device.type}; matmul peak {peak_rate / 1e12:.2f} "
          f"TFLOP/s (start) / {matmul_rate(device, dtype) / 1e12:.2f} (end); {args.new_tokens} new tokens",
          ["tokens", "mode", "chunks", "running", "tree s", "prefill s", "decode tok/s", "total s", "peak MB",
           "tree % of peak", "full / sharedllm"],
          [r[:-1] + [f"{full[r[0]] / r[-1]:.1f}x" if r[1] == "sharedllm" and r[0] in full else ""] for r in rows])


def run_ppl(args, model, tokenizer):
    """DESIGN Sec. 7: X_D = the last 4096 tokens (2048 at 4K), loss on its last 256; the context =
    the chunks before it. window = X_D alone; full = plain attention over all T tokens. Every length
    ends at the same place in a window, so all lengths score the same 256 tokens and differ only in
    how much comes before."""
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
    losses, window_loss = {}, {}  # window: X_D alone, the same last 4096 tokens at every length from 8K on
    for T in lengths:
        D = T - (T - min(4096, T // 2)) // L * L  # the context is whole chunks; X_D takes the rest
        run = [m for m in modes if {"full": T <= args.full_max, "other": 4 * T <= len(ids)}.get(m, True)]
        if "other" in modes and "other" not in run:  # its context, half the text away, could overlap the window
            print(f"{T}: no 'other' row; it needs a text of {4 * T} tokens, not {len(ids)}", file=sys.stderr)
        for end in ends:
            window = torch.tensor([ids[end - T:end]], device=model.output.weight.device)
            targets = window.clone()
            targets[:, :-256] = -100  # loss on the last 256 tokens only
            for mode in run:
                if mode == "full":
                    loss = model(window[:, :-1], targets[:, 1:])[1]
                elif mode == "window" and (end, D) in window_loss:  # computed at a shorter length already
                    loss = window_loss[(end, D)]
                else:  # control "other": the context of a place half the text away, so no help but its style
                    far = (end - T + len(ids) // 2) % (len(ids) - T + 1)
                    context = window[:, :T - D] if mode == "sharedllm" else torch.tensor([ids[far:far + T - D]])
                    memory = model.encode_context(context.to(window.device)) if mode != "window" else None
                    loss = model(window[:, T - D:-1], targets[:, T - D + 1:], memory=memory)[1]
                    if mode == "window":
                        window_loss[(end, D)] = loss
                losses.setdefault((T, mode), []).append(loss.item())
            print(f"{T} ending at {end}: " + ", ".join(f"{m} {math.exp(losses[(T, m)][-1]):.3f}" for m in modes
                                                       if (T, m) in losses), file=sys.stderr)
    rivals = [m for m in ("window", "other") if m in modes and "sharedllm" in modes]
    rows = []
    for T in lengths:
        cells = [f"{math.exp(statistics.mean(losses[(T, m)])):.3f}" if (T, m) in losses else "" for m in modes]
        wins = [sum(a < b for a, b in zip(losses[(T, "sharedllm")], losses.get((T, m), []))) for m in rivals]
        rows.append([T] + cells + [f"{w}/{len(losses.get((T, m), []))}" for w, m in zip(wins, rivals)])
    table(f"perplexity of the same last 256 tokens of {args.windows} windows (exp of the mean loss); then the "
          f"windows where sharedllm's loss was lower", ["tokens"] + modes + [f"sharedllm < {m}" for m in rivals], rows)


def run_passkey(args, model, tokenizer):
    """A pass key at each depth of real filler (Python's docs); 'What is the pass key?'; correct
    when the first number generated after "The pass key is " equals the key. --task lookup: --facts
    named facts ("The locker code of Ada is 12345."), the one asked for at the depth, the others
    anywhere; the answer starts "The locker code of Ada is "."""
    rng = random.Random(args.seed)
    lengths, depths, modes = args.lengths, args.depths, args.modes
    filler, key_prefix = text_tokens(tokenizer, max(lengths), args.held_out), pass_key_prefix(tokenizer)
    needles, questions = (NEEDLES[1], QUESTIONS[1]) if args.held_out else ([NEEDLE], ["What is the pass key?"])
    facts, lookups = (FACTS[1], LOOKUPS[1]) if args.held_out else (FACTS[0][:1], LOOKUPS[0][:1])
    correct, outside = {}, {}  # outside: the trials whose key lay before the running text (sharedllm: in the tree)
    if args.kept_at == "text":  # every kept chunk at its own chunk index: the text's distances between them
        encode, L = model.encode_context, model.cfg.chunk_len
        model.encode_context = lambda context, query=None, **kw: encode(
            context, query, chunk_positions=[list(range(c.numel() // L)) for c in context], **kw)
    for T in lengths:
        for depth in depths:
            for _ in range(args.trials):
                key = rng.randint(10000, 99999)
                start = rng.randrange(max(len(filler) - T, 1))
                if args.task == "passkey":
                    hidden, question = [(depth, rng.choice(needles).format(key=key))], rng.choice(questions)
                    prefix = key_prefix
                else:  # the fact asked for at the depth, the other names' facts (other keys) anywhere
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
                    ids, n, tokens, memory, _ = prepare(model, tokenizer, text, question, prefix, mode,
                                                        8, args.running, top_chunks=args.top_chunks)
                    out = list(generate(model, tokens, memory, 8, set(), GREEDY))
                    found = re.findall(r"\d+", tokenizer.decode(out))
                    correct.setdefault((mode, T, depth), []).append(bool(found) and found[0] == str(key))
                    at = max((i for i in range(len(ids)) if ids[i:i + len(digits)] == digits), default=len(ids))
                    if at < n * model.cfg.chunk_len:  # its last mention too
                        outside.setdefault((mode, T), []).append(correct[(mode, T, depth)][-1])
            print(f"{T} depth {depth}: " + ", ".join(f"{m} {sum(correct[(m, T, depth)])}/{args.trials}"
                                                     for m in modes), file=sys.stderr)
    rate = {(m, T): [statistics.mean(correct[(m, T, d)]) for d in depths] for m in modes for T in lengths}
    what = "pass-key" if args.task == "passkey" else f"lookup ({args.facts} named facts)"
    table(f"{what} accuracy, {args.trials} keys per cell; then the keys found of those that lay before the running "
          f"text", ["mode", "tokens"] + [f"depth {d:.0%}" for d in depths] + ["all", "key before the running text"],
          [[m, T] + [f"{c:.0%}" for c in rate[(m, T)] + [statistics.mean(rate[(m, T)])]] +
           [f"{sum(outside.get((m, T), []))}/{len(outside.get((m, T), []))}"] for m, T in rate])
    if args.plot:
        import matplotlib.pyplot as plt  # optional: main checked that it is there
        fig, axes = plt.subplots(1, len(modes), figsize=(4 * len(modes), 3), squeeze=False, layout="constrained")
        for ax, mode in zip(axes[0], modes):
            ax.imshow([[rate[(mode, T)][i] for T in lengths] for i in range(len(depths))], vmin=0, vmax=1,
                      cmap="RdYlGn", aspect="auto")
            ax.set(title=mode, xlabel="tokens", ylabel="depth", xticks=range(len(lengths)), yticks=range(len(depths)),
                   xticklabels=[f"{T // 1024}K" for T in lengths], yticklabels=[f"{d:.0%}" for d in depths])
        fig.savefig(args.plot, bbox_inches="tight")
        print(f"wrote {args.plot}", file=sys.stderr)


def run_descent(args, model, tokenizer):
    """A pass-key sentence at a random offset of a chunk of real text; the running text ends with
    the question. A trial succeeds when the key's digits land in the finest (level-h) nodes. Random
    descent: 1 in 2^(h-1). Then, in the first --mass_trials, with MaxSim's memory: the
    cross-attention mass on the key's entries when the answer's first digit is due, per injection
    layer, against the key's share of the entries (uniform attention)."""
    L, rng, device, cfg = model.cfg.chunk_len, random.Random(args.seed), model.output.weight.device, model.cfg
    filler = text_tokens(tokenizer, 400_000)
    strides = tree.strides(cfg.tree_depth, cfg.finest_stride)
    wins, mass = {"right": 0, "cosine": 0, "maxsim": 0}, [[] for _ in range(cfg.n_inject + 1)]

    def attention_mass(j, module, inputs, output):  # a hook: what cross-attention j computed, at the last position
        x, k, _, memory = inputs  # k: (B, Hkv, S, D)
        k = k.repeat_interleave(module.n_heads // k.size(1), 1)
        p = (module.queries(x[:, -1:], memory) @ k.transpose(-1, -2) * module.head_dim ** -0.5).float().softmax(-1)
        mass[j].append(p[0, :, 0][:, on].sum(-1).mean().item())  # summed over the key's entries, mean over heads
    for j, layer in enumerate(model.layers[:cfg.n_inject]):
        layer.cross_attention.register_forward_hook(lambda *a, j=j: attention_mass(j, *a))
    for trial in range(args.trials):
        key = rng.randint(10000, 99999)
        needle = tokenizer.encode(" " + NEEDLE.format(key=key) + " ").ids
        digits = tokenizer.encode(f" {key}").ids
        start = rng.randrange(len(filler) - L - 4096)
        offset = rng.randrange(L - len(needle))
        chunk = filler[start:start + offset] + needle + filler[start + offset:start + L - len(needle)]
        at = offset + next(i for i in range(len(needle)) if needle[i:i + len(digits)] == digits)
        text, span = format_input(tokenizer, tokenizer.decode(filler[start + L:start + L + 4000]),
                                  "What is the pass key?", pass_key_prefix(tokenizer))
        enc = tokenizer.encode(text)
        running = torch.tensor([enc.ids], device=device)
        block = model.query_states(running, *token_span(enc.offsets, span))
        for policy in wins:
            if policy != "right":
                model.cfg.policy = policy
            query = block if policy != "right" else None
            memory = model.encode_context(torch.tensor([chunk], device=device), query)
            nodes = memory.trees[0][0]
            finest = [n for n in nodes if n.level == cfg.tree_depth]
            wins[policy] += finest[0].start <= at and at + len(digits) <= finest[-1].end
        if trial >= args.mass_trials:
            continue
        on = torch.tensor([at <= o < at + len(digits) for n in nodes for o in tree.kept_positions(n, strides)],
                          device=device)  # nodes and memory: MaxSim's, the loop's last policy
        mass[-1].append(on.float().mean().item())
        model(running, memory=memory, last_only=True)  # the hooks measure
    table(f"key digits kept at the finest level, {args.trials} trials, {L}-token chunks, depth {cfg.tree_depth}:",
          ["policy", "hit rate"], [(policy, f"{hits / args.trials:.0%}") for policy, hits in wins.items()])
    if mass[-1]:
        table(f"cross-attention mass on the key's entries when its first digit is due (MaxSim's memory, "
              f"{len(mass[-1])} trials; uniform attention: the key's share of the entries):",
              [f"layer {j}" for j in range(cfg.n_inject)] + ["uniform"], [[f"{statistics.mean(m):.3f}" for m in mass]])


if __name__ == "__main__":
    args = parser.parse_args()
    if getattr(args, "plot", None) and importlib.util.find_spec("matplotlib") is None:  # before the sweep
        sys.exit("error: --plot needs matplotlib (pip install matplotlib); or run without --plot for the table")
    dtype, why = pick_dtype(args.dtype, args.device)
    try:
        question = args.command in ("passkey", "descent") or getattr(args, "question", False)
        model, tokenizer, adapter = load_model(args.model, args.adapter, torch.device(args.device),
                                               dtype, question, **method(args))
    except LoadError as e:
        sys.exit(f"error: {e}")
    print(f"adapter: {adapter}; {dtype_name(dtype)} ({why})", file=sys.stderr)
    torch.set_grad_enabled(False)  # measurement only
    {"speed": run_speed, "descent": run_descent, "ppl": run_ppl, "passkey": run_passkey}[args.command](
        args, model, tokenizer)
