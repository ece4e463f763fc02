"""Train SharedLLM on long sequences: context chunks through the tree, running text through the
model.

    python train.py --seq 8192                       # built-in data: Python's docs, retrieval tasks
    python train.py --data books/ qa.jsonl --tune top --steps 2000 --out out/books
    torchrun --nproc_per_node 2 train.py --seq 8192  # data parallel: gloo on CPU, nccl on CUDA

Writes out/ckpt.safetensors (trainable tensors + optimizer moments, for --resume), out/ckpt.json,
and out/adapter.safetensors (trainable tensors only: what `generate.py --adapter` reads).
"""
import argparse
import hashlib
import json
import math
import os
import random
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from data import (TASKS, DataError, builtin_docs, encode_qa, pooled_sample, read_data,
                  retrieval_sample)
from generate import DTYPES, at_least, checked, dtype_name, pick_dtype
from load_llama import LoadError, load_model
from sharedllm import Pool

FRACTION = checked(float, lambda x: 0 <= x <= 1, "must be a fraction from 0 to 1")
parser = argparse.ArgumentParser(description="Train SharedLLM's cross-attention (and more).")
add = parser.add_argument
# Data
add("--data", nargs="*", default=[], help="text files, folders, .jsonl ({'text'} or {'prompt', "
    "'response'}); none: the built-in offline mix")
add("--seq", type=at_least(2), default=8192, help="tokens per language-modelling sequence")
add("--running", type=at_least(1), default=4096, help="D: running-text tokens; the rest is chunks")
add("--retrieval", type=FRACTION, help="share of generated retrieval samples, their filler from "
    "the data (default: 0.5 with the built-in mix, 0 with --data)")
add("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS), help="the generated tasks: "
    "pass keys among other codes, named-fact lookups, quotes")
add("--in_running", type=FRACTION, default=0.0, help="share of retrieval samples whose asked fact "
    "lies in the running text, before the question")
add("--lookup_facts", type=at_least(1), default=1, help="fewest named facts of a kind in a lookup")
add("--min_chunks", type=at_least(1), default=1, help="fewest context chunks of a retrieval sample")
add("--max_chunks", type=at_least(1), help="most context chunks of a retrieval sample (default: "
    "what --seq holds; more is cheap with --pool)")
add("--pool", type=at_least(0), default=0, help="retrieval samples take their filler chunks from a "
    "pool of this many, encoded once (exact halves, no split noise); 0: every chunk per sample")
add("--pool_cache", help="a .safetensors file for the encoded pool: read if it exists (refused if "
    "built otherwise), else written after encoding")
add("--positions", type=at_least(0), default=0, help="place a retrieval sample's n chunks at "
    "sorted random positions below this (PoSE-style: few chunks, far distances); 0: 0..n-1")
add("--on_bad_line", default="skip", choices=["skip", "stop"], help="malformed .jsonl lines")
# Model: the Llama, and the SharedLLM settings that travel with the adapter
add("--model", default="smollm2-135m", help="HF Llama folder, or 'smollm2-135m'")
add("--n_inject", type=at_least(1), help="M: injection layers (default 4, or the model's depth)")
add("--chunk", type=at_least(1), default=1024, help="L: context chunk length")
add("--finest_stride", type=at_least(1), default=4, help="keep every s-th token of the finest")
add("--policy", default="cosine", choices=["cosine", "maxsim"], help="descent for a question")
add("--logn", action="store_true", help="scale cross-attention logits by log(entries) / "
    "log(entries per chunk): sharper over many chunks (Qwen's log-n; not in the paper)")
add("--tune", default="xattn", choices=["xattn", "top", "all"], help="xattn: cross-attention + "
    "gates; top: also layers M..N-1 (the paper's LM setting); all: the whole model")
add("--init", help="start from these trained weights (an adapter.safetensors), fresh optimizer")
# Optimization
add("--steps", type=at_least(1), default=300, help="optimizer steps")
add("--grad_accum", type=at_least(1), default=4, help="sequences per step and process")
add("--lr", type=at_least(0, float), default=1e-3, help="learning rate of all but the gates")
add("--gate_lr", type=at_least(0, float), default=1e-1, help="learning rate of the tanh gates")
add("--weight_decay", type=at_least(0, float), default=0.0, help="AdamW weight decay")
add("--warmup", type=at_least(0), default=10, help="linear warm-up steps, then cosine to 10%%")
add("--clip", type=checked(float, lambda x: x > 0, "must be positive"), default=1.0,
    help="gradient norm clipping")
add("--dtype", default="auto", choices=DTYPES, help="compute dtype: bfloat16 autocast over fp32 "
    "weights, or float32; auto: bfloat16 where it is fast")
add("--checkpointing", action="store_true", help="recompute activations in backward (less memory)")
# Run
add("--out", default="out", help="folder for checkpoints and the adapter")
add("--seed", type=int, default=0, help="data order, split noise and generated samples")
add("--save_every", type=at_least(1), default=50, help="checkpoint every N steps (and at the end)")
add("--log_every", type=at_least(1), default=10, help="a log line every N steps")
add("--val", type=at_least(0), default=8, help="held-out sequences for the final validation")
add("--resume", action="store_true", help="continue from --out/ckpt.safetensors")
add("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")


def make_example(ids, n, L, question=None, answer_from=None):
    """Split a sample into context (n*L,) and running text; targets shift by one; with an answer,
    -100 everywhere else. question: (first, last) token -> the query's (first, last, end) in the
    running text, end the prompt's last token (the paper's cosine query)."""
    ids = torch.tensor(ids)
    context, running = ids[:n * L], ids[n * L:]
    targets = running[1:].clone()
    if answer_from is not None:  # loss on the response only
        targets[: answer_from - n * L - 1] = -100
    query = None if question is None else (question[0] - n * L, question[1] - n * L,
                                           answer_from - n * L - 1)
    return context, running[:-1], targets, query


def main(argv=None):
    args = parser.parse_args(argv)
    L, D = args.chunk, args.running
    if args.seq <= D or (args.seq - D) % L:
        sys.exit(f"error: --seq {args.seq} must be {D} running tokens plus a whole number (>= 1) "
                 f"of {L}-token chunks, e.g. --seq {D + 4 * L}; adjust --seq, --running or --chunk")
    max_chunks = args.max_chunks or (args.seq - D) // L
    if args.min_chunks > max_chunks:
        sys.exit(f"error: --min_chunks {args.min_chunks} is more than --max_chunks {max_chunks}")
    if args.pool and L < 64:
        sys.exit(f"error: --pool needs --chunk 64 or more (a chunk holds up to 3 facts), not {L}")
    if args.pool and args.tune == "all":
        sys.exit("error: --tune all trains the bottom layers that encoded the --pool, so the pool "
                 "would go stale; use --tune xattn or top with a pool, or drop --pool")
    ddp = "RANK" in os.environ
    if ddp:
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    cuda = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    device = torch.device(cuda if args.device == "cuda" else "cpu")
    dtype, why = pick_dtype(args.dtype, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    log = (lambda *a: print(*a, file=sys.stderr)) if rank == 0 else (lambda *a: None)
    log(f"compute dtype: {dtype_name(dtype)} ({why})")
    out = Path(args.out)

    # 1. Model: fp32 master weights; only the chosen part trains; the lower pass runs under no_grad.
    if args.init and not Path(args.init).is_file():
        sys.exit(f"error: --init {args.init} does not exist; give an adapter train.py wrote")
    try:
        model, tokenizer, _ = load_model(args.model, args.init or "none", device,
                                         n_inject=args.n_inject, chunk_len=L, policy=args.policy,
                                         finest_stride=args.finest_stride, logn=args.logn)
    except LoadError as e:
        sys.exit(f"error: {e}")
    cfg, M = model.cfg, model.cfg.n_inject
    if D > cfg.max_seq_len:
        log(f"warning: --running {D} is longer than the model's window of {cfg.max_seq_len} "
            f"tokens, so the upper model reads positions it never trained on; use --running "
            f"{cfg.max_seq_len} or less (the rest of --seq goes to the tree)")
    model.checkpointing = args.checkpointing
    for name, p in model.named_parameters():
        layer = int(name.split(".")[1]) if name.startswith("layers.") else -1
        top = args.tune == "all" or (args.tune == "top" and layer >= M)
        p.requires_grad = ".cross_attention." in name or top
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}

    # 2. Data: held-out sequences from the end of the stream; retrieval wordings never trained on.
    try:
        docs, qa = read_data(args.data, args.on_bad_line) if args.data else (builtin_docs(), [])
    except DataError as e:
        sys.exit(f"error: {e}")
    eos = (cfg.eos_ids or (0,))[0]
    stream = [t for enc in tokenizer.encode_batch(docs) for t in enc.ids + [eos]]
    n_seq = len(stream) // args.seq
    retrieval = args.retrieval if args.retrieval is not None else 0.0 if args.data else 0.5
    if n_seq < args.val + 1 and (not qa or retrieval):
        need = (args.val + 1) * args.seq
        sys.exit(f"error: the data has {len(stream)} tokens; {need} are needed for one training "
                 f"and {args.val} held-out sequences of --seq {args.seq}; add text or lower "
                 f"--val/--seq")
    n_train = max(n_seq - args.val, 0)
    fillers = (stream[:n_train * args.seq], stream[n_train * args.seq:])  # training / held out
    pool = None
    if args.pool and retrieval:
        with autocast:
            pool = build_pool(args, model, fillers[0], L, device, dtype, rank)

    def example(i, split=0):
        """Sample i, a pure function of (seed, i, split): resuming needs no saved random state."""
        rng = random.Random(f"{args.seed}/{split}/{i}")
        if qa and (not stream or rng.random() < len(qa) / (len(qa) + n_train)):
            prompt, response = qa[rng.randrange(len(qa))]
            ids, n, q0, q1, a = encode_qa(tokenizer, "", prompt, response, L, D)
            return *make_example(ids, n, L, (q0, q1), a), None, None
        if rng.random() < retrieval:
            n_ctx = rng.randint(args.min_chunks, max_chunks) if split == 0 else \
                rng.randint(1, (args.seq - D) // L)
            task = (args.tasks, args.lookup_facts, rng.random() < args.in_running)
            if pool is not None and split == 0:  # context: the fresh chunks only
                fresh, order, ids, q, a = pooled_sample(rng, fillers[0], tokenizer, n_ctx, L, D,
                                                         args.pool, 0, *task)
                parts = (fresh.view(-1), *make_example(ids, 0, L, q, a)[1:])
            else:
                doc, question, answer = retrieval_sample(rng, fillers[split], tokenizer, n_ctx, L,
                                                         D, split, *task)
                ids, n, q0, q1, a = encode_qa(tokenizer, doc, question, answer, L, D)
                order, parts = None, make_example(ids, n, L, (q0, q1), a)
            far = args.positions > n_ctx and split == 0  # Eq. 2's chunk positions, spread out
            return *parts, order, sorted(rng.sample(range(args.positions), n_ctx)) if far else None
        j = rng.randrange(n_train) if split == 0 else n_train + i % args.val
        lm = make_example(stream[j * args.seq:(j + 1) * args.seq], (args.seq - D) // L, L)
        return *lm, None, None

    def loss_of(i, split=0, use_memory=True):
        context, running, targets, query, order, positions = example(i, split)
        running, memory = running[None].to(device), None
        positions = [positions] if positions else None
        with autocast:
            if use_memory and context.numel():
                q = model.query_states(running, *query) if query is not None else None
                if order is not None:  # pool rows gathered, the fresh chunks through the lower pass
                    fresh = context.view(-1, L).to(device)
                    memory = model.memory_from_pool(pool, [order], q, positions, fresh=fresh)
                else:  # split noise in training (Sec. 3.1), exact halves for validation
                    seed = hash((args.seed, split, i)) % 2**63
                    noise = torch.Generator().manual_seed(seed) if split == 0 else None
                    memory = model.encode_context(context[None].to(device), q, positions, noise)
            loss = model(running, targets[None].to(device), memory=memory)[1]
        return loss, running.numel()

    # 3. Optimizer: AdamW; the gates get their own, much larger learning rate (a tanh gate at 0
    # barely moves at the paper's 1e-5; at 1e-1 it reaches 0.9 within 100 steps).
    gates = [p for n, p in trainable.items() if n.endswith(".gate")]
    rest = [p for n, p in trainable.items() if not n.endswith(".gate")]
    opt = torch.optim.AdamW([{"params": rest, "lr": args.lr, "weight_decay": args.weight_decay},
                             {"params": gates, "lr": args.gate_lr, "weight_decay": 0.0}],
                            betas=(0.9, 0.999))
    base_lr, step = [args.lr, args.gate_lr], 0
    if args.resume:
        step = load_checkpoint(out / "ckpt.safetensors", model, opt, trainable, args)

    def schedule(s):
        if s < args.warmup:  # 1. linear warm-up
            return (s + 1) / args.warmup
        progress = (s - args.warmup) / max(args.steps - args.warmup, 1)  # 2. cosine down to 10%
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    # 4. The loop: each step, grad_accum sequences per process, gradients averaged across them.
    model.train()
    bar = tqdm(total=args.steps, initial=step, desc="train", disable=rank != 0)
    t0, tokens, losses, stop = time.time(), 0, [], []
    on_term = signal.signal(signal.SIGTERM, lambda *_: stop.append(1))  # kill: save like Ctrl-C
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
                took = time.time() - t0
                tqdm.write(f"step {step} loss {sum(losses) / len(losses):.3f} lr "
                           f"{opt.param_groups[0]['lr']:.2e} tanh(gates) {gate} "
                           f"{tokens / took:.0f} tok/s {took:.0f} s", file=sys.stderr)
                losses = []
            if rank == 0 and (step % args.save_every == 0 or step == args.steps):
                save_checkpoint(out, model, opt, trainable, args, step, world)
            if stop:  # at a step boundary, so that --resume continues exactly
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        if rank == 0:
            save_checkpoint(out, model, opt, trainable, args, step, world)
            log(f"\ninterrupted: saved step {step} to {out}; continue with --resume")
        sys.exit(130)
    except FloatingPointError as e:
        sys.exit(f"error: {e}; stopped without saving, so {out / 'ckpt.safetensors'} still holds "
                 f"the last good step; lower --lr or --gate_lr, or use --dtype float32")
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
            alone = sum(loss_of(i, 1, False)[0].item() for i in range(args.val)) / args.val
        log(f"validation loss on {args.val} held-out samples: {with_ctx:.4f} with the context, "
            f"{alone:.4f} without")
    if ddp:
        dist.destroy_process_group()


# -----------------------------------------------------------------------------
# Checkpoints: trainable tensors and their AdamW moments in one safetensors file, written to a
# temporary name and renamed, so a crash or a full disk never replaces the last good one.

def checkpoint_config(model, args):
    keys = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "n_inject", "chunk_len",
            "tree_depth", "finest_stride", "policy", "logn")
    return {**{k: getattr(model.cfg, k) for k in keys}, "tune": args.tune}


def atomic_save(tensors, path: Path, metadata):
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OSError(f"could not write {path} ({e.strerror or e}); the file there before, if any, "
                      f"is kept") from None


def save_checkpoint(out: Path, model, opt, trainable, args, step, world):
    out.mkdir(parents=True, exist_ok=True)
    meta = {"config": json.dumps(checkpoint_config(model, args)), "args": json.dumps(vars(args)),
            "step": str(step), "data_position": str(step * args.grad_accum * world)}
    params = {n: p.detach().contiguous() for n, p in trainable.items()}
    moments = {f"optim.{k}.{n}": v.detach().contiguous()
               for n, p in trainable.items() for k, v in opt.state.get(p, {}).items()}
    atomic_save({**params, **moments}, out / "ckpt.safetensors", meta)
    atomic_save(params, out / "adapter.safetensors", {"config": meta["config"]})
    record = {k: json.loads(v) if k in ("config", "args") else int(v) for k, v in meta.items()}
    (out / "ckpt.json.tmp").write_text(json.dumps(record, indent=2))
    os.replace(out / "ckpt.json.tmp", out / "ckpt.json")


def load_checkpoint(path: Path, model, opt, trainable, args) -> int:
    if not path.exists():
        sys.exit(f"error: --resume: no checkpoint at {path}; train without --resume first")
    with safe_open(path, framework="pt", device="cpu") as f:
        meta = f.metadata()
        saved, ours = json.loads(meta["config"]), checkpoint_config(model, args)
        if saved != ours:
            diff = ", ".join(f"{k}={saved.get(k)} (now {ours[k]})" for k in ours
                             if saved.get(k) != ours[k])
            sys.exit(f"error: --resume: {path} was trained with another model or config: {diff}; "
                     f"use the same --model/--tune/--n_inject/--chunk/--logn, or another --out")
        names = set(f.keys())
        with torch.no_grad():
            for n, p in trainable.items():
                p.copy_(f.get_tensor(n))
                state = {k: f.get_tensor(f"optim.{k}.{n}").to(p.device)
                         for k in ("step", "exp_avg", "exp_avg_sq") if f"optim.{k}.{n}" in names}
                if state:
                    opt.state[p] = state
    print(f"resumed from {path} at step {meta['step']}", file=sys.stderr)
    return int(meta["step"])


# -----------------------------------------------------------------------------
# The chunk pool (training only): filler chunks encoded once (Transformer.encode_pool), optionally
# kept on disk. A file built for another model, dtype, M, chunk length, stride or set of rows is
# refused; it is written like a checkpoint, so an interrupted build leaves nothing to trust.

class PoolCacheError(Exception):
    pass


def build_pool(args, model, filler, L, device, dtype, rank) -> Pool:
    """Rows at random offsets of the training filler (a pure function of the seed), encoded or read
    from --pool_cache."""
    starts = random.Random(f"{args.seed}/pool").choices(range(len(filler) - L), k=args.pool)
    rows, t = torch.tensor([filler[s:s + L] for s in starts], device=device), time.time()
    try:
        pool = args.pool_cache and read_pool(args.pool_cache, model, args.model, rows, dtype)
    except PoolCacheError as e:
        sys.exit(f"error: {e}")
    how = f"read from {args.pool_cache}" if pool is not None else "encoded"
    if pool is None:
        pool = model.encode_pool(rows, progress=rank == 0)
        if args.pool_cache and rank == 0:
            try:
                write_pool(args.pool_cache, pool, model, args.model, dtype)
            except OSError as e:
                print(f"warning: {e}; training goes on with the pool in memory", file=sys.stderr)
    if rank == 0:
        print(f"pool: {args.pool} filler chunks {how} in {time.time() - t:.0f} s", file=sys.stderr)
    return pool


def pool_fingerprint(model, name, dtype):
    keys = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "n_inject", "chunk_len",
            "tree_depth", "finest_stride")
    lower = model.layers[model.cfg.n_inject - 1].attention.wk.weight.detach().float().cpu()
    return {"model": str(name), "dtype": dtype_name(dtype),
            **{k: str(getattr(model.cfg, k)) for k in keys},
            "weights": hashlib.sha1(lower.numpy().tobytes()).hexdigest()[:16]}


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
    """The pool stored at path, None if there is none yet; PoolCacheError if built otherwise."""
    if not Path(path).is_file():
        return None
    try:
        with safe_open(path, framework="pt", device=str(rows.device)) as f:
            saved, ours = f.metadata() or {}, pool_fingerprint(model, name, dtype)
            diff = ", ".join(f"{k}={saved.get(k)} (now {v})" for k, v in ours.items()
                             if saved.get(k) != v)
            if diff:
                raise PoolCacheError(f"--pool_cache {path} was built for {diff}; delete it or give "
                                     f"another path")
            if not torch.equal(f.get_tensor("tokens"), rows):
                raise PoolCacheError(f"--pool_cache {path} holds other filler chunks (another "
                                     f"--pool, --seed, --chunk or data); delete it or give another "
                                     f"path")
            levels, layers = range(model.cfg.tree_depth), range(model.cfg.n_inject)
            kv = [[(f.get_tensor(f"k.{d}.{j}"), f.get_tensor(f"v.{d}.{j}")) for j in layers]
                  for d in levels]
            return Pool(rows, [f.get_tensor(f"states.{d}") for d in levels], kv)
    except (OSError, SafetensorError) as e:
        raise PoolCacheError(f"--pool_cache {path} is not a readable pool ({e}); delete it or give "
                             f"another path")


if __name__ == "__main__":
    main()
