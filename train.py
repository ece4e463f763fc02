"""Train SharedLLM on long sequences: context chunks through the tree, running text through the full model.

    python train.py --seq 8192                                  # built-in data (Python's docs + retrieval tasks)
    python train.py --data books/ qa.jsonl --tune top --steps 2000 --out out/books
    torchrun --nproc_per_node 2 train.py --seq 8192              # data parallel: gloo on CPU, nccl on CUDA

Writes out/ckpt.safetensors (trainable tensors + optimizer moments, for --resume), out/ckpt.json, and
out/adapter.safetensors (trainable tensors only: what `generate.py --adapter` reads).
"""
import argparse
import hashlib
import json
import math
import os
import random
import signal
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.distributed as dist
from pydoc_data import topics
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from generate import DTYPES, NEEDLE, at_least, checked, dtype_name, format_input, pick_dtype
from load_llama import LoadError, load_adapter, load_llama
from sharedllm import Pool

TASKS = {"passkey": 0.4, "lookup": 0.3, "quote": 0.3}  # the built-in retrieval mix (--tasks picks some)
FRACTION = checked(float, lambda x: 0 <= x <= 1, "must be a fraction from 0 to 1")
parser = argparse.ArgumentParser(description="Train SharedLLM's cross-attention (and optionally more).")
parser.add_argument("--data", nargs="*", default=[], help="text/markdown files, folders, .jsonl ({'text'} or "
                    "{'prompt','response'}); none: the built-in offline mix")
parser.add_argument("--model", default="smollm2-135m", help="HF Llama folder, or 'smollm2-135m'")
parser.add_argument("--out", default="out", help="folder for checkpoints and the adapter")
parser.add_argument("--seq", type=at_least(2), default=8192, help="tokens per language-modelling sequence")
parser.add_argument("--chunk", type=at_least(1), default=1024, help="L: context chunk length")
parser.add_argument("--running", type=at_least(1), default=4096, help="D: running-text tokens")
parser.add_argument("--n_inject", type=at_least(1), help="M: injection layers (default 4, or the model's depth)")
parser.add_argument("--finest_stride", type=at_least(1), default=4, help="keep every s-th token of the finest nodes")
parser.add_argument("--tune", default="xattn", choices=["xattn", "top", "all"],
                    help="xattn: cross-attention + gates; top: also layers M..N-1; all: the whole model")
parser.add_argument("--policy", default="cosine", choices=["cosine", "maxsim"], help="query-aware descent (QA)")
parser.add_argument("--logn", action="store_true", help="scale cross-attention logits by log(entries) / log(entries "
                    "per chunk): 1 for one chunk, sharper over many (Qwen's log-n; a departure from the paper)")
parser.add_argument("--retrieval", type=FRACTION, help="share of generated retrieval samples, their filler from the "
                    "data (default: 0.5 with the built-in mix, 0 with --data)")
parser.add_argument("--in_running", type=FRACTION, default=0.0, help="share of retrieval samples whose asked fact "
                    "lies in the running text, shortly before the question, instead of the context")
parser.add_argument("--lookup_facts", type=at_least(1), default=1, help="fewest named facts of one kind in a lookup")
parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS), help="the generated retrieval "
                    "tasks (their shares renormalised): pass keys among other codes, named-fact lookups, quotes")
parser.add_argument("--max_chunks", type=at_least(1), help="most context chunks of a retrieval sample (default: "
                    "what --seq holds); more than --seq holds is cheap with --pool")
parser.add_argument("--min_chunks", type=at_least(1), default=1, help="fewest context chunks of a retrieval sample")
parser.add_argument("--pool", type=at_least(0), default=0, help="retrieval samples take their filler chunks from a "
                    "pool of this many, encoded once (exact halves, no split noise); 0: every chunk per sample")
parser.add_argument("--pool_cache", help="a .safetensors file for the encoded pool: read if it exists (refused if "
                    "built for another model, dtype, M, chunk length, stride or rows), else written after encoding")
parser.add_argument("--positions", type=at_least(0), default=0, help="place a retrieval sample's n chunks at sorted "
                    "random positions below this (PoSE-style: few chunks, far distances); 0: positions 0..n-1")
parser.add_argument("--steps", type=at_least(1), default=300, help="optimizer steps")
parser.add_argument("--grad_accum", type=at_least(1), default=4, help="sequences per step and process")
parser.add_argument("--lr", type=at_least(0, float), default=1e-3,
                    help="learning rate of the copied norm/wq/wo (and layers)")
parser.add_argument("--gate_lr", type=at_least(0, float), default=1e-1,
                    help="learning rate of the tanh gates (they start at 0)")
parser.add_argument("--weight_decay", type=at_least(0, float), default=0.0, help="AdamW weight decay")
parser.add_argument("--warmup", type=at_least(0), default=10, help="linear warm-up steps, then cosine to 10%%")
parser.add_argument("--clip", type=checked(float, lambda x: x > 0, "must be positive"), default=1.0,
                    help="gradient norm clipping")
parser.add_argument("--dtype", default="auto", choices=DTYPES, help="compute dtype: bfloat16 autocast over fp32 "
                    "weights, or float32; auto: bfloat16 on CUDA and on CPUs with native bf16 matmuls")
parser.add_argument("--checkpointing", action="store_true", help="recompute activations in backward (less memory)")
parser.add_argument("--seed", type=int, default=0, help="data order, split noise and generated samples")
parser.add_argument("--save_every", type=at_least(1), default=50, help="checkpoint every N steps (and at the end)")
parser.add_argument("--log_every", type=at_least(1), default=10, help="a log line every N steps")
parser.add_argument("--val", type=at_least(0), default=8, help="held-out sequences for the final validation")
parser.add_argument("--resume", action="store_true", help="continue from --out/ckpt.safetensors")
parser.add_argument("--init", help="start from these trained weights (an adapter.safetensors), with a fresh optimizer")
parser.add_argument("--on_bad_line", default="skip", choices=["skip", "stop"], help="malformed .jsonl lines")
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")


class DataError(Exception):
    """Training data that cannot be used; the message says what to do."""


# -----------------------------------------------------------------------------
# Data: a token stream for language modelling, and (prompt, response) pairs for question answering.

TEXT = {".txt", ".md", ".markdown", ".rst", ".text"}


def read_data(paths, on_bad_line):
    """-> (documents, qa pairs), from files and folders."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix in TEXT | {".jsonl"})
            if not found:
                raise DataError(f"folder {p} holds no .txt/.md/.rst/.jsonl files")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"--data {p} does not exist")
    docs, qa = [], []
    for f in files:
        if f.suffix != ".jsonl":
            docs.append(f.read_text(errors="replace"))
            continue
        for n, line in enumerate(f.read_text(errors="replace").splitlines(), 1):
            try:
                row = json.loads(line) if line.strip() else None
                if row is None:
                    continue
                if "text" in row:
                    docs.append(str(row["text"]))
                else:
                    qa.append((str(row["prompt"]), str(row["response"])))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                msg = f"{f}:{n}: not a JSON object with 'text' or 'prompt' + 'response' ({type(e).__name__})"
                if on_bad_line == "stop":
                    raise DataError(msg + "; fix it, or pass --on_bad_line skip")
                print(f"skipped {msg}", file=sys.stderr)
    return docs, qa


def builtin_docs():
    """Python's own documentation and standard-library sources: ~1.3M tokens on every machine."""
    docs = [topics.topics[k] for k in sorted(topics.topics)]
    docs += [f.read_text(errors="replace") for f in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))]
    return docs


def held_out_code():
    """What training never reads (eval.py ppl's default): the standard library's packages (asyncio, email, ...)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return "\n\n".join(f.read_text(errors="replace") for f in sorted(root.glob("*/*.py"))
                        if "test" not in f.parts[-2] and "site-packages" not in str(f))


# Generated retrieval tasks: the wording of the needle and the question, the key format, the filler and the
# context length all vary. split=0 is for training, split=1 for validation (wording never seen in training).
NEEDLES = [[NEEDLE, "Remember this pass key: {key}.", "Note that the pass key is {key}, keep it in mind.",
            "The secret pass key you will need later is {key}."],
           ["Important: the pass key is {key}.", "Keep this pass key safe: {key}."]]
QUESTIONS = [["What is the pass key?", "Which pass key was mentioned in the text?", "Tell me the pass key."],
             ["What pass key did the text give?", "Recall the pass key from the document."]]
FACTS = [["The {thing} of {name} is {key}.", "{name}'s {thing} is {key}."], ["For {name}, the {thing} is {key}."]]
LOOKUPS = [["What is the {thing} of {name}?", "Tell me {name}'s {thing}."], ["Which {thing} does {name} have?"]]
THINGS, NAMES = ["locker code", "room number", "badge id", "account pin"], ["Ada", "Linus", "Grace", "Guido", "Alan",
                                                                           "Barbara", "Ken", "Margaret", "Dennis"]
QUOTES = [["{name} left the {item} {place}.", "Yesterday {name} hid the {item} {place}."],
          ["According to {name}, the {item} is kept {place}."]]
QUOTE_QUESTIONS = [["Quote the sentence about {name}.", "Repeat word for word what the text says about {name}."],
                   ["Which sentence mentions {name}? Quote it exactly."]]
ITEMS = ["spare key", "old map", "red ledger", "brass lamp", "signed contract", "backup drive"]
PLACES = ["under the third stair", "behind the blue door", "in the north tower", "beside the broken clock",
          "inside the piano", "on the top shelf of the library"]


def key_formatter(rng):
    return rng.choice([lambda: str(rng.randint(10000, 99999)), lambda: str(rng.randint(10**6, 10**7 - 1)),
                       lambda: f"{rng.choice('ABCDEFGHJK')}{rng.randint(100, 999)}-{rng.randint(1000, 9999)}"])


def retrieval_task(rng, key_format, n_facts, split, tasks=tuple(TASKS), lookup_facts=1):
    """n_facts sentences to hide (a lookup: at least lookup_facts), a question about the first, its answer
    -> (facts, question, answer)."""
    draw, total, kind = rng.random() * sum(TASKS[t] for t in tasks), 0.0, tasks[-1]
    for t in tasks:  # the tasks' shares, renormalised
        total += TASKS[t]
        if draw < total:
            kind = t
            break
    if kind == "passkey":
        key = key_format()
        facts = [rng.choice(NEEDLES[split]).format(key=key)] + [
            rng.choice(NEEDLES[split]).format(key=key_format()) for _ in range(n_facts - 1)]
        facts = facts[:1] + [f.replace("pass key", "backup code") for f in facts[1:]]  # distractors: other names
        return facts, rng.choice(QUESTIONS[split]), f"The pass key is {key}."
    if kind == "lookup":  # several named facts: a key-value lookup
        names, thing = rng.sample(NAMES, max(n_facts, lookup_facts)), rng.choice(THINGS)
        keys = [key_format() for _ in names]
        facts = [rng.choice(FACTS[split]).format(thing=thing, name=n, key=k) for n, k in zip(names, keys)]
        question = rng.choice(LOOKUPS[split]).format(thing=thing, name=names[0])
        return facts, question, f"The {thing} of {names[0]} is {keys[0]}."
    names = rng.sample(NAMES, n_facts)  # a fact to quote: the answer is the hidden sentence itself
    facts = [rng.choice(QUOTES[split]).format(name=n, item=rng.choice(ITEMS), place=rng.choice(PLACES)) for n in names]
    return facts, rng.choice(QUOTE_QUESTIONS[split]).format(name=names[0]), facts[0]


def retrieval_sample(rng, filler, tokenizer, n_ctx, L, D, split=0, tasks=tuple(TASKS), lookup_facts=1,
                     in_running=False):
    """A long document of real text with one or several facts hidden at random depths; a question about one;
    its answer: a pass key among differently named codes, a key-value lookup, or a sentence to quote word for word.
    in_running: the asked fact goes into the document's last ~D/2 tokens (the running text), the others before.
    -> (document, question, answer)."""
    key_format = key_formatter(rng)
    length = n_ctx * L + D + 64  # enough that the prompt yields n_ctx whole chunks before the running text
    start = rng.randrange(len(filler) - length)
    text = tokenizer.decode(filler[start:start + length])
    in_context = int(len(text) * n_ctx * L / length)  # facts go into the context chunks, never the running text
    cuts = sorted(rng.randrange(in_context) for _ in range(rng.choice([1, 1, 2, 3])))
    facts, question, answer = retrieval_task(rng, key_format, len(cuts), split, tasks, lookup_facts)
    cuts += sorted(rng.randrange(in_context) for _ in facts[len(cuts):])  # a lookup's extra facts
    order = list(range(len(cuts)))
    rng.shuffle(order)
    if in_running:  # ~4 characters a token: within the document's last D/2 tokens, which the running text holds
        cuts[order.index(0)] = len(text) - rng.randrange(1, 2 * D)
    for cut, i in sorted(zip(cuts, order), reverse=True):
        text = text[:cut] + f" {facts[i]} " + text[cut:]
    return text, question, answer


def pooled_sample(rng, filler, tokenizer, n_ctx, L, D, pool_size, split=0, tasks=tuple(TASKS), lookup_facts=1,
                  in_running=False):
    """A retrieval sample laid out chunk by chunk for training with a pool (DESIGN Sec. 11): chunk 0 (the chat
    header and filler) and the chunks that hold a fact are fresh; every other chunk is a row of the filler pool.
    -> (fresh chunks (k, L), the n_ctx chunks in order as pool rows or -1 for the next fresh one, the running
    text's ids with the answer, question (first, last) and answer start in running-text coordinates).
    in_running: the asked fact is hidden in the running text instead."""
    key_format, n_facts = key_formatter(rng), rng.choice([1, 1, 2, 3])
    facts, question, answer = retrieval_task(rng, key_format, n_facts, split, tasks, lookup_facts)
    text, span = format_input(tokenizer, "\x00", question)  # the chat format, split around the document
    cut = text.index("\x00")
    head, tail = tokenizer.encode(text[:cut]).ids, tokenizer.encode(text[cut + 1:], add_special_tokens=False)
    homes = [-1 if in_running and i == 0 else rng.randrange(n_ctx) for i in range(len(facts))]  # each fact's chunk
    order, fresh = [], []
    for c in range(n_ctx):
        mine = [tokenizer.encode(f" {f} ", add_special_tokens=False).ids for f, h in zip(facts, homes) if h == c]
        if c > 0 and not mine:
            order.append(rng.randrange(pool_size))
            continue
        room = L - len(head) * (c == 0) - sum(map(len, mine))
        assert room > 0, f"--chunk {L} cannot hold the facts of a retrieval sample; use a longer --chunk"
        start = rng.randrange(len(filler) - room)
        body = filler[start:start + room]
        for ids in mine:  # each fact at a random token offset
            at = rng.randrange(len(body) + 1)
            body = body[:at] + ids + body[at:]
        fresh.append(head * (c == 0) + body)
        order.append(-1)
    start = rng.randrange(len(filler) - D)
    running = filler[start:start + D]  # the document's last D tokens, then the question
    if in_running:
        at = rng.randrange(D // 2, D + 1)
        running = running[:at] + tokenizer.encode(f" {facts[0]} ", add_special_tokens=False).ids + running[at:]
    q = (span[0] - cut - 1, span[1] - cut - 1)  # the question's characters in the tail
    inside = [len(running) + i for i, (a, b) in enumerate(tail.offsets) if a < q[1] and b > q[0]]
    running += tail.ids
    return torch.tensor(fresh), order, running + response_ids(tokenizer, answer), (inside[0], inside[-1]), len(running)


def response_ids(tokenizer, response):
    """The answer's tokens and the chat format's end-of-turn token."""
    end = [tokenizer.token_to_id(t) for t in ("<|im_end|>", "<|eot_id|>", "</s>") if tokenizer.token_to_id(t)]
    return tokenizer.encode(response, add_special_tokens=False).ids + end[:1]


def encode_qa(tokenizer, document, prompt, response, L, D):
    """Tokenise a QA sample -> (ids, n context chunks, first and last question token, first response token)."""
    text, span = format_input(tokenizer, document, prompt)
    enc = tokenizer.encode(text)
    inside = [i for i, (a, b) in enumerate(enc.offsets) if a < span[1] and b > span[0]]
    n = max((len(enc.ids) - D) // L, 0)
    return enc.ids + response_ids(tokenizer, response), n, inside[0], inside[-1], len(enc.ids)


def make_example(ids, n, L, q=None, answer_from=None):
    """Split a sample into context (n*L,) and running text; targets shift by one; -100 everywhere but the
    answer for QA. q: (first, last) question token, in running-text coordinates."""
    ids = torch.tensor(ids)
    context, running = ids[:n * L], ids[n * L:]
    targets = running[1:].clone()
    if answer_from is not None:  # loss on the response only
        targets[: answer_from - n * L - 1] = -100
    query = None if q is None else (q[0] - n * L, q[1] - n * L)
    return context, running[:-1], targets, query


# -----------------------------------------------------------------------------

def main(argv=None):
    args = parser.parse_args(argv)
    L, D = args.chunk, args.running
    if args.seq <= D or (args.seq - D) % L:
        sys.exit(f"error: --seq {args.seq} must be {D} running tokens plus a whole number (>= 1) of {L}-token "
                 f"chunks, e.g. --seq {D + 4 * L}; adjust --seq, --running or --chunk")
    max_chunks = args.max_chunks or (args.seq - D) // L
    if args.min_chunks > max_chunks:
        sys.exit(f"error: --min_chunks {args.min_chunks} is more than --max_chunks {max_chunks}; lower it")
    if args.pool and L < 64:
        sys.exit(f"error: --pool needs --chunk 64 or more (a pooled sample's fresh chunk holds up to 3 facts), "
                 f"not {L}")
    ddp = "RANK" in os.environ
    if ddp:
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if args.device == "cuda" else "cpu")
    dtype, why = pick_dtype(args.dtype, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    if rank == 0:
        print(f"compute dtype: {dtype_name(dtype)} ({why})", file=sys.stderr)
    out = Path(args.out)

    # 1. Model: fp32 master weights; only the chosen part trains. The lower pass runs under no_grad.
    try:
        model, tokenizer = load_llama(args.model, device=device, n_inject=args.n_inject, chunk_len=L,
                                      finest_stride=args.finest_stride, policy=args.policy, logn=args.logn)
        if args.init:
            if not Path(args.init).is_file():
                sys.exit(f"error: --init {args.init} does not exist; give an adapter.safetensors that train.py wrote")
            load_adapter(model, args.init)
            model.cfg.chunk_len, model.cfg.finest_stride, model.cfg.policy = L, args.finest_stride, args.policy  # ours
            model.cfg.logn = args.logn
    except LoadError as e:
        sys.exit(f"error: {e}")
    cfg, M = model.cfg, model.cfg.n_inject
    if D > cfg.max_seq_len and rank == 0:
        print(f"warning: --running {D} is longer than the model's window of {cfg.max_seq_len} tokens, so the upper "
              f"model reads positions it was never trained on; use --running {cfg.max_seq_len} or less (the rest of "
              f"--seq goes to the tree)", file=sys.stderr)
    model.checkpointing = args.checkpointing
    for name, p in model.named_parameters():
        layer = int(name.split(".")[1]) if name.startswith("layers.") else -1
        p.requires_grad = (".cross_attention." in name or args.tune == "all" or (args.tune == "top" and layer >= M))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}

    # 2. Data: held-out sequences come from the end of the stream, and retrieval wording never used in training.
    try:
        docs, qa = read_data(args.data, args.on_bad_line) if args.data else (builtin_docs(), [])
    except DataError as e:
        sys.exit(f"error: {e}")
    eos = (cfg.eos_ids or (0,))[0]
    stream = [t for enc in tokenizer.encode_batch(docs) for t in enc.ids + [eos]]
    n_seq = len(stream) // args.seq
    retrieval = args.retrieval if args.retrieval is not None else 0.0 if args.data else 0.5
    if n_seq < args.val + 1 and (not qa or retrieval):
        sys.exit(f"error: the data has {len(stream)} tokens; {(args.val + 1) * args.seq} are needed for one "
                 f"training and {args.val} held-out sequences of --seq {args.seq}; add text or lower --val/--seq")
    n_train = max(n_seq - args.val, 0)
    fillers = (stream[:n_train * args.seq], stream[n_train * args.seq:])  # retrieval filler: training / held out
    pool = None
    if args.pool and retrieval:  # rows at random offsets of the training filler, a pure function of the seed
        starts = random.Random(f"{args.seed}/pool").choices(range(len(fillers[0]) - L), k=args.pool)
        rows, t = torch.tensor([fillers[0][s:s + L] for s in starts], device=device), time.time()
        try:
            pool = read_pool(args.pool_cache, model, args.model, rows, dtype) if args.pool_cache else None
        except PoolCacheError as e:
            sys.exit(f"error: {e}")
        how = f"read from {args.pool_cache}" if pool is not None else "encoded"
        if pool is None:
            with autocast:
                pool = model.encode_pool(rows, progress=rank == 0)
            if args.pool_cache and rank == 0:
                try:
                    write_pool(args.pool_cache, pool, model, args.model, dtype)
                except OSError as e:
                    print(f"warning: {e}; training goes on with the pool in memory", file=sys.stderr)
        if rank == 0:
            print(f"pool: {args.pool} filler chunks {how} in {time.time() - t:.0f} s", file=sys.stderr)

    def example(i, split=0):
        """Sample i, a pure function of (seed, i, split): resuming needs no saved random state."""
        rng = random.Random(f"{args.seed}/{split}/{i}")
        if qa and (not stream or rng.random() < len(qa) / (len(qa) + n_train)):
            prompt, response = qa[rng.randrange(len(qa))]
            ids, n, q0, q1, a = encode_qa(tokenizer, "", prompt, response, L, D)
            return *make_example(ids, n, L, (q0, q1), a), None, None
        if rng.random() < retrieval:
            n_ctx = rng.randint(args.min_chunks, max_chunks) if split == 0 else rng.randint(1, (args.seq - D) // L)
            near = bool(args.in_running) and rng.random() < args.in_running  # no draw at 0: old runs unchanged
            if pool is not None and split == 0:  # context: the fresh chunks only
                fresh, order, ids, q, a = pooled_sample(rng, fillers[0], tokenizer, n_ctx, L, D, args.pool, 0,
                                                         args.tasks, args.lookup_facts, near)
                parts = (fresh.view(-1), *make_example(ids, 0, L, q, a)[1:])
            else:
                doc, question, answer = retrieval_sample(rng, fillers[split], tokenizer, n_ctx, L, D, split,
                                                         args.tasks, args.lookup_facts, near)
                ids, n, q0, q1, a = encode_qa(tokenizer, doc, question, answer, L, D)
                order, parts = None, make_example(ids, n, L, (q0, q1), a)
            far = args.positions > n_ctx and split == 0  # Eq. 2's chunk positions, spread out (PoSE-style)
            return *parts, order, sorted(rng.sample(range(args.positions), n_ctx)) if far else None
        j = rng.randrange(n_train) if split == 0 else n_train + i % args.val
        return *make_example(stream[j * args.seq:(j + 1) * args.seq], (args.seq - D) // L, L), None, None

    def loss_of(i, split=0, use_memory=True):
        context, running, targets, query, order, positions = example(i, split)
        memory = None
        with autocast:
            if use_memory and context.numel():
                q = None
                if query is not None:
                    states = model.query_states(running[None].to(device))[0]
                    q = states[query[1]][None] if args.policy == "cosine" else states[query[0]:query[1] + 1][None]
                if order is not None:  # pool rows gathered, the fresh chunks (context) through the lower pass
                    memory = model.memory_from_pool(pool, [order], q, [positions] if positions else None,
                                                    fresh=context.view(-1, L).to(device))
                else:
                    noise = torch.Generator().manual_seed(hash((args.seed, split, i)) % 2**63)
                    memory = model.encode_context(context[None].to(device), q, generator=noise if split == 0 else None,
                                                  chunk_positions=[positions] if positions else None)
            return model(running[None].to(device), targets[None].to(device), memory=memory)[1], running.numel()

    # 3. Optimizer: AdamW; the gates get their own, much larger learning rate: a tanh gate at 0 barely moves at
    # the paper's 1e-5 (DESIGN Sec. 10: tanh(g) reached 0.9 within 100 steps at 1e-1).
    gates = [p for n, p in trainable.items() if n.endswith(".gate")]
    rest = [p for n, p in trainable.items() if not n.endswith(".gate")]
    opt = torch.optim.AdamW([{"params": rest, "lr": args.lr, "weight_decay": args.weight_decay},
                             {"params": gates, "lr": args.gate_lr, "weight_decay": 0.0}], betas=(0.9, 0.999))
    base_lr = [args.lr, args.gate_lr]
    step = 0
    if args.resume:
        step = load_checkpoint(out / "ckpt.safetensors", model, opt, trainable, args)

    def schedule(s):  # linear warm-up, then cosine down to 10%
        if s < args.warmup:
            return (s + 1) / args.warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - args.warmup) / max(args.steps - args.warmup, 1)))

    # 4. The loop. Each step: grad_accum sequences per process, gradients averaged across processes.
    model.train()
    bar = tqdm(total=args.steps, initial=step, desc="train", disable=rank != 0)
    t0, tokens, losses, stop = time.time(), 0, [], []
    on_term = signal.signal(signal.SIGTERM, lambda *_: stop.append(1))  # kill, a scheduler: save like Ctrl-C
    try:
        while step < args.steps:
            for group, lr in zip(opt.param_groups, base_lr):
                group["lr"] = lr * schedule(step)
            for micro in range(args.grad_accum):
                loss, n_tok = loss_of((step * args.grad_accum + micro) * world + rank)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss is {loss.item()} at step {step}")
                (loss / args.grad_accum).backward()
                losses.append(loss.item())
                tokens += n_tok * world
            if ddp:
                for p in trainable.values():
                    p.grad = torch.zeros_like(p) if p.grad is None else p.grad
                    dist.all_reduce(p.grad)
                    p.grad /= world
            torch.nn.utils.clip_grad_norm_(trainable.values(), args.clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            bar.update()
            if rank == 0 and step % args.log_every == 0:
                gate = " ".join(f"{torch.tanh(p).item():.2f}" for p in gates)
                tqdm.write(f"step {step} loss {sum(losses) / len(losses):.3f} lr {opt.param_groups[0]['lr']:.2e} "
                           f"tanh(gates) {gate} {tokens / (time.time() - t0):.0f} tok/s {time.time() - t0:.0f} s",
                           file=sys.stderr)
                losses = []
            if rank == 0 and (step % args.save_every == 0 or step == args.steps):
                save_checkpoint(out, model, opt, trainable, args, step, world)
            if stop:  # at a step boundary, so that --resume continues exactly
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        if rank == 0:
            save_checkpoint(out, model, opt, trainable, args, step, world)
            print(f"\ninterrupted: saved step {step} to {out}; continue with --resume", file=sys.stderr)
        sys.exit(130)
    except FloatingPointError as e:
        sys.exit(f"error: {e}; stopped without saving, so {out / 'ckpt.safetensors'} still holds the last good "
                 f"step; lower --lr or --gate_lr, or use --dtype float32")
    except OSError as e:
        sys.exit(f"error: {e}")
    finally:
        signal.signal(signal.SIGTERM, on_term)
    bar.close()

    # 5. Validation on held-out data, with the context and without it (the running text alone).
    if rank == 0 and args.val > 0:
        model.eval()
        with torch.no_grad():
            with_ctx = sum(loss_of(i, 1)[0].item() for i in range(args.val)) / args.val
            without = sum(loss_of(i, 1, use_memory=False)[0].item() for i in range(args.val)) / args.val
        print(f"validation loss on {args.val} held-out samples: {with_ctx:.4f} with the context, {without:.4f} "
              f"without", file=sys.stderr)
    if ddp:
        dist.destroy_process_group()


# -----------------------------------------------------------------------------
# Checkpoints: trainable tensors and their AdamW moments in one safetensors file, written to a temporary name
# and renamed, so a crash or a full disk never leaves a half-written checkpoint in place of the last good one.

def checkpoint_config(model, args):
    keys = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "n_inject", "chunk_len", "tree_depth",
            "finest_stride", "policy", "logn")
    return {**{k: getattr(model.cfg, k) for k in keys}, "tune": args.tune}


def atomic_save(tensors, path: Path, metadata):
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OSError(f"could not write {path} ({e.strerror or e}); the file there before, if any, is kept") from None


def save_checkpoint(out: Path, model, opt, trainable, args, step, world):
    out.mkdir(parents=True, exist_ok=True)
    meta = {"config": json.dumps(checkpoint_config(model, args)), "args": json.dumps(vars(args)),
            "step": str(step), "data_position": str(step * args.grad_accum * world)}
    params = {n: p.detach().contiguous() for n, p in trainable.items()}
    moments = {}
    for n, p in trainable.items():
        for k, v in opt.state.get(p, {}).items():
            moments[f"optim.{k}.{n}"] = v.detach().reshape(v.shape).contiguous()
    atomic_save({**params, **moments}, out / "ckpt.safetensors", meta)
    atomic_save(params, out / "adapter.safetensors", {"config": meta["config"]})
    (out / "ckpt.json.tmp").write_text(json.dumps({k: json.loads(v) if k in ("config", "args") else int(v)
                                                   for k, v in meta.items()}, indent=2))
    os.replace(out / "ckpt.json.tmp", out / "ckpt.json")


# The chunk pool on disk (--pool_cache): its tensors plus what they were computed with. A file built for another
# model, compute dtype, M, chunk length, stride or set of rows is refused; it is written like a checkpoint
# (temporary name, then renamed), so an interrupted build or a full disk leaves no file trusted by mistake.

class PoolCacheError(Exception):
    pass


def pool_fingerprint(model, name, dtype):
    keys = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "n_inject", "chunk_len", "tree_depth",
            "finest_stride")
    lower = model.layers[model.cfg.n_inject - 1].attention.wk.weight.detach().float().cpu().numpy().tobytes()
    return {"model": str(name), "dtype": dtype_name(dtype), **{k: str(getattr(model.cfg, k)) for k in keys},
            "weights": hashlib.sha1(lower).hexdigest()[:16]}


def write_pool(path, pool: Pool, model, name, dtype):
    tensors = {"tokens": pool.tokens}
    for d, (states, layers) in enumerate(zip(pool.states, pool.kv)):
        tensors[f"states.{d}"] = states
        for j, (k, v) in enumerate(layers):
            tensors[f"k.{d}.{j}"], tensors[f"v.{d}.{j}"] = k, v
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_save({n: t.detach().contiguous().cpu() for n, t in tensors.items()}, Path(path),
                pool_fingerprint(model, name, dtype))


def read_pool(path, model, name, rows, dtype) -> Pool | None:
    """The pool stored at path, or None if there is none yet; PoolCacheError if it was built otherwise."""
    if not Path(path).is_file():
        return None
    try:
        with safe_open(path, framework="pt", device=str(rows.device)) as f:
            saved, ours = f.metadata() or {}, pool_fingerprint(model, name, dtype)
            diff = ", ".join(f"{k}={saved.get(k)} (now {v})" for k, v in ours.items() if saved.get(k) != v)
            if diff:
                raise PoolCacheError(f"--pool_cache {path} was built for {diff}; delete it or give another path")
            if not torch.equal(f.get_tensor("tokens"), rows):
                raise PoolCacheError(f"--pool_cache {path} holds other filler chunks (another --pool, --seed, --chunk "
                                     f"or data); delete it or give another path")
            levels = range(model.cfg.tree_depth)
            return Pool(rows, [f.get_tensor(f"states.{d}") for d in levels],
                        [[(f.get_tensor(f"k.{d}.{j}"), f.get_tensor(f"v.{d}.{j}")) for j in range(model.cfg.n_inject)]
                         for d in levels])
    except (OSError, SafetensorError) as e:
        raise PoolCacheError(f"--pool_cache {path} is not a readable pool ({e}); delete it or give another path")


def load_checkpoint(path: Path, model, opt, trainable, args) -> int:
    if not path.exists():
        sys.exit(f"error: --resume: no checkpoint at {path}; train without --resume first")
    with safe_open(path, framework="pt", device="cpu") as f:
        meta = f.metadata()
        saved = {"logn": False, **json.loads(meta["config"])}  # checkpoints from before --logn had none
        ours = checkpoint_config(model, args)
        if saved != ours:
            diff = ", ".join(f"{k}={saved.get(k)} (now {ours[k]})" for k in ours if saved.get(k) != ours[k])
            sys.exit(f"error: --resume: {path} was trained with another model or config: {diff}; use the same "
                     f"--model/--tune/--n_inject/--chunk/--logn, or another --out")
        with torch.no_grad():
            for n, p in trainable.items():
                p.copy_(f.get_tensor(n))
        names = set(f.keys())
        for n, p in trainable.items():
            state = {k: f.get_tensor(f"optim.{k}.{n}").to(p.device) for k in ("step", "exp_avg", "exp_avg_sq")
                     if f"optim.{k}.{n}" in names}
            if state:
                opt.state[p] = state
    print(f"resumed from {path} at step {meta['step']}", file=sys.stderr)
    return int(meta["step"])


if __name__ == "__main__":
    main()
