"""Generate from a long file with SharedLLM: what does not fit the window is read through the tree.

    python generate.py                                      # demo: a pass key in ~100K tokens
    python generate.py --file long.txt --prompt "Who wrote the letter?" --show_tree
    python generate.py --file long.txt --prompt "Who wrote it?" --paper  # the paper's method
    python generate.py --file long.txt --mode full          # baseline: plain attention over all

stdout carries only the generated text, streamed; stderr carries progress, the report, --show_tree.
"""
import argparse
import re
import resource
import sys
import time
from pathlib import Path

import torch

from data import demo_document, format_input, pass_key_prefix, stop_ids, token_span
from load_llama import LoadError, load_model
from sharedllm import KVCache


def checked(kind, ok, why):
    """An argparse type: a `kind` value for which ok(value) holds, else argparse's error saying
    why."""
    def parse(text):
        if not ok(value := kind(text)):  # a ValueError from kind: "invalid <__name__> value"
            raise argparse.ArgumentTypeError(f"{why}, not {text!r}")
        return value
    parse.__name__ = kind.__name__
    return parse


def at_least(low, kind=int):
    return checked(kind, lambda x: x >= low, f"must be at least {low}")


DTYPES = ["auto", "bfloat16", "float32"]


def pick_dtype(name: str, device) -> tuple[torch.dtype, str]:
    """--dtype -> (dtype, why). 'auto' picks bfloat16 only where it is fast: a CUDA GPU that has it,
    or a CPU with native bf16 matmuls. Elsewhere PyTorch emulates bf16, on an AVX2-only EPYC ~90x
    slower than fp32 (0.0009 vs 0.08 TFLOP/s at 1024^3)."""
    if name != "auto":
        return getattr(torch, name), "--dtype"
    device = torch.device(device)
    if device.type == "cuda":
        fast = torch.cuda.is_bf16_supported()
        return (torch.bfloat16, "auto: CUDA") if fast else (torch.float32, "auto: GPU, no bf16")
    if device.type != "cpu":
        return torch.float32, f"auto: {device.type}"
    native = [isa for isa, has in (("AMX", torch.cpu._is_amx_tile_supported()),
                                   ("AVX512-BF16", torch.cpu._is_avx512_bf16_supported())) if has]
    if native:
        return torch.bfloat16, f"auto: the CPU has native bf16 matmuls ({native[0]})"
    cpu = torch.backends.cpu.get_cpu_capability()
    return torch.float32, f"auto: the CPU ({cpu}) has no native bf16 matmul"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# The method's settings. Each departure from the paper has a flag; --paper sets them all back.
QA_RUNNING, LM_RUNNING = 1024, 4096  # D: a question reads the tree better than the window far back
PAPER = {"policy": "cosine", "finest_stride": 4, "logn": "off", "top_chunks": 0, "running": 4096}


def add_method_flags(p):
    """The flags that choose the method (also eval.py's); the adapter's record fills the rest."""
    p.add_argument("--paper", action="store_true", help="the paper's method: cosine descent, "
                   "strides 16/8/4, every chunk kept, no log-n, 4,096 running tokens")
    p.add_argument("--policy", choices=["cosine", "maxsim"], help="descent with a question: the "
                   "paper's last-token cosine, or token-level MaxSim (default: the adapter's)")
    p.add_argument("--finest_stride", type=at_least(1), help="keep every s-th token of the finest "
                   "nodes, 2s and 4s above (default: the adapter's; the paper's 4)")
    p.add_argument("--logn", choices=["on", "off"], help="scale cross-attention logits with the "
                   "number of chunks (default: the adapter's; the paper has none)")
    p.add_argument("--top_chunks", type=at_least(0), help="with a question, only the k chunks that "
                   "best match it get a tree (default 2; 0: every chunk, as the paper)")
    p.add_argument("--running", type=at_least(1), help=f"D: running-text tokens (default "
                   f"{QA_RUNNING} for a question through the tree, else {LM_RUNNING})")


def method(args) -> dict:
    """--paper fills the method flags not given -> load_model's overrides (None: the adapter's)."""
    for key, value in PAPER.items():
        if args.paper and getattr(args, key) is None:
            setattr(args, key, value)
    logn = None if args.logn is None else args.logn == "on"
    return dict(policy=args.policy, finest_stride=args.finest_stride, logn=logn)


parser = argparse.ArgumentParser(description="Generate from a long file with SharedLLM.")
parser.add_argument("--file", help="the long input (text); no --file and no --prompt: the demo")
parser.add_argument("--prompt", help="a question or instruction about the file; without it the "
                    "file is continued")
parser.add_argument("--model", default="smollm2-135m", help="HF Llama folder, or 'smollm2-135m'")
parser.add_argument("--adapter", default="auto", help="trained weights (.safetensors); 'none': "
                    "gates at 0, the base model on the last window; 'auto': the shipped one for "
                    "the default model (question answering with a --prompt, else continuing)")
parser.add_argument("--mode", default="sharedllm", choices=["sharedllm", "window", "full"],
                    help="sharedllm: tree + running text; window: the running text alone "
                         "(truncation); full: plain attention over the whole input")
add_method_flags(parser)
parser.add_argument("--max_new_tokens", type=at_least(1), help="most tokens (128; demo: 12)")
parser.add_argument("--temperature", type=at_least(0, float), default=0.0, help="0: greedy")
parser.add_argument("--top_k", type=at_least(0), default=0, help="sample from the k likeliest")
parser.add_argument("--top_p", type=checked(float, lambda p: 0 < p <= 1, "must be in (0, 1]"),
                    default=1.0, help="nucleus sampling threshold")
parser.add_argument("--seed", type=int, default=0, help="sampling seed (and the demo's key)")
parser.add_argument("--answer_prefix", default="", help="how the answer starts, e.g. 'It was'")
parser.add_argument("--show_tree", action="store_true", help="print each chunk's kept spans")
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="cpu or cuda")
parser.add_argument("--dtype", default="auto", choices=DTYPES, help="weights and activations; "
                    "auto: bfloat16 on CUDA and on CPUs with native bf16 matmuls, else float32")


def usage_error(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def layout(n_tokens: int, window: int, L: int, D: int, max_new: int, min_running: int = 1) -> int:
    """How many L-token chunks go to the tree: 0 when everything fits the window, else
    n = (T - D) // L: the running text keeps D to D + L tokens, D grown to hold the question and
    shrunk to fit the window."""
    if n_tokens + max_new <= window:
        return 0
    D = min(max(D, min_running), window - L - max_new)  # the running text holds the question
    if D < min_running:
        raise ValueError(f"--max_new_tokens {max_new} cannot fit the window: {window} tokens hold "
                         f"at most {window - L - min_running} new tokens beside the running text "
                         f"and one {L}-token chunk; ask for fewer")
    return max((n_tokens - D) // L, 0)


def sample(logits, temperature: float, top_k: int, top_p: float, generator) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:  # keep the smallest set of likeliest tokens whose mass reaches top_p
        probs, order = logits.softmax(-1).sort(descending=True)
        drop = probs.cumsum(-1) - probs > top_p
        logits[order[drop]] = float("-inf")
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))


def prepare(model, tokenizer, document, prompt, answer_prefix="", mode="sharedllm",
            max_new_tokens=128, running=None, progress=False, top_chunks=None):
    """Tokenise, lay out (X_C = the first n*L tokens, X_D = the rest) and build the memory once:
    query-aware with a question, the right policy when continuing a text. -> (ids, n, running
    tokens (1, T), memory or None, tree seconds). ValueError on input that cannot be read."""
    cfg, device = model.cfg, model.output.weight.device
    text, question = format_input(tokenizer, document, prompt, answer_prefix)
    encoding = tokenizer.encode(text)
    ids = encoding.ids
    if not ids:
        raise ValueError("the input is empty after tokenisation; give text or a --prompt")
    if top_chunks and question is None:
        raise ValueError(f"--top_chunks {top_chunks} ranks chunks by how well they match a "
                         f"question; give a --prompt, or drop --top_chunks")
    through_tree = question is not None and mode == "sharedllm"
    running = running or (QA_RUNNING if through_tree else LM_RUNNING)
    first, last = token_span(encoding.offsets, question) if question else (len(ids) - 1,) * 2
    n = 0 if mode == "full" else layout(len(ids), cfg.max_seq_len, cfg.chunk_len, running,
                                        max_new_tokens, len(ids) - first)  # question stays in X_D
    split = n * cfg.chunk_len
    context = torch.tensor(ids[:split], device=device)
    tokens = torch.tensor([ids[split:]], device=device)
    memory, t0 = None, time.time()
    if n > 0 and mode == "sharedllm":
        query = model.query_states(tokens, first - split, last - split) if question else None
        top = (2 if top_chunks is None else top_chunks) if question else 0
        memory = model.encode_context(context[None], query, top_chunks=top, progress=progress)
    return ids, n, tokens, memory, time.time() - t0


@torch.no_grad()
def generate(model, tokens, memory, max_new_tokens: int, stop, pick, prefill_chunk: int = 4096):
    """Prefill the running text (1, T) in pieces, then decode with the KV cache; the memory stays
    fixed. Yields token ids as they are chosen."""
    dtype = model.output.weight.dtype
    cache = KVCache(model.cfg, 1, tokens.size(1) + max_new_tokens, tokens.device, dtype)
    for piece in tokens.split(prefill_chunk, dim=1):
        logits = model(piece, cache=cache, memory=memory, last_only=True)
    for _ in range(max_new_tokens):
        next_id = pick(logits[0, -1])
        if next_id in stop:
            return
        yield next_id
        logits = model(torch.tensor([[next_id]], device=tokens.device), cache=cache, memory=memory)


def show_tree(trees, ids, L, tokenizer, width=64):
    """One line per chunk: a character per L/width tokens ('.', ':', '#' from coarse to fine) and
    the start of the finest kept text."""
    marks = ".:#" if max(len(nodes) for nodes in trees) == 4 else ".:-=+*#%@"
    for c, nodes in enumerate(trees):
        if not nodes:  # dropped by --top_chunks
            continue
        bar = "".join(marks[min(n.level, len(marks)) - 1] * round((n.end - n.start) * width / L)
                      for n in nodes)
        finest = [n for n in nodes if n.level == max(m.level for m in nodes)]
        start = c * L + finest[0].start
        text = tokenizer.decode(ids[start:start + 12]).replace("\n", " ")
        print(f"chunk {c:4d} [{c * L}:{(c + 1) * L}] {bar} finest from {start}: {text!r}",
              file=sys.stderr)
    if not all(trees):
        print(f"{sum(not nodes for nodes in trees)} of {len(trees)} chunks dropped (--top_chunks)",
              file=sys.stderr)


def main():
    args = parser.parse_args()
    demo = args.file is None and args.prompt is None
    args.max_new_tokens = args.max_new_tokens or (12 if demo else 128)
    device = torch.device(args.device)
    dtype, why = pick_dtype(args.dtype, device)
    settings, t0 = method(args), time.time()

    # 1. The input text, checked before the model loads.
    document, prompt, answer_prefix = "", args.prompt, args.answer_prefix
    if args.file is not None:
        try:
            raw = Path(args.file).read_bytes()
        except OSError as e:
            usage_error(f"cannot read --file {args.file}: {e.strerror}")
        document = raw.decode("utf-8", errors="replace")
        if document.count("\ufffd") > raw.decode("utf-8", errors="ignore").count("\ufffd"):
            print(f"note: {args.file} is not valid UTF-8; undecodable bytes became U+FFFD",
                  file=sys.stderr)
        if not document.strip():
            if not prompt:
                usage_error(f"{args.file} is empty: give a file with text, or a --prompt")
            print(f"note: {args.file} is empty; answering the --prompt alone", file=sys.stderr)

    # 2. Model, tokenizer, adapter: the configuration decided in one place (load_model).
    try:
        model, tokenizer, adapter = load_model(args.model, args.adapter, device, dtype,
                                               question=bool(prompt or demo), **settings)
    except LoadError as e:
        usage_error(str(e))
    if tokenizer is None:
        usage_error(f"{args.model} has no tokenizer.json; generate.py needs one to read text")
    cfg = model.cfg
    if demo:
        document, key, depth = demo_document(tokenizer, args.seed)
        prompt, answer_prefix = "What is the pass key?", answer_prefix or pass_key_prefix(tokenizer)
        print(f"demo: a pass key hidden at {depth:.0%} depth of ~100K tokens of Python's docs",
              file=sys.stderr)

    # 3. Layout and memory, built once.
    try:
        ids, n, running, memory, t_tree = prepare(model, tokenizer, document, prompt, answer_prefix,
                                                  args.mode, args.max_new_tokens, args.running,
                                                  True, args.top_chunks)
    except ValueError as e:
        usage_error(str(e))
    if args.mode == "full" and len(ids) + args.max_new_tokens > cfg.max_seq_len:
        print(f"note: --mode full reads {len(ids)} tokens with a model trained on "
              f"{cfg.max_seq_len}", file=sys.stderr)
    if args.show_tree and memory is not None:
        show_tree(memory.trees[0], ids, cfg.chunk_len, tokenizer)

    # 4. Prefill the running text, then decode, streaming the text to stdout.
    gen = torch.Generator(device=device).manual_seed(args.seed)
    pick = lambda x: sample(x, args.temperature, args.top_k, args.top_p, gen)  # noqa: E731
    out, shown, t_first, t2 = [], "", None, time.time()
    for token in generate(model, running, memory, args.max_new_tokens,
                          stop_ids(tokenizer, cfg.eos_ids), pick):
        t_first = t_first or time.time()
        out.append(token)
        piece = tokenizer.decode(out)
        if not piece.endswith("\ufffd"):  # hold back half a UTF-8 character
            sys.stdout.write(piece[len(shown):])
            sys.stdout.flush()
            shown = piece
    t_end = time.time()
    print(tokenizer.decode(out)[len(shown):], flush=True)

    # 5. The report.
    t_first = t_first or t_end
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    entries = memory.k[0].size(2) if memory is not None else 0
    kept = sum(map(bool, memory.trees[0])) if memory is not None else n
    beta = f", beta {n * cfg.chunk_len / entries:.1f}" if entries else ""
    beta += f"; {n - kept} chunks dropped by --top_chunks" if kept < n else ""
    decode = f"{(len(out) - 1) / (t_end - t_first):.1f} tok/s" if len(out) > 1 else "n/a"
    print(f"[{args.mode}] input {len(ids)} tokens = {n} chunks x {cfg.chunk_len} in memory "
          f"({entries} kept entries per layer{beta}) + {running.size(1)} running tokens; tree "
          f"{t_tree:.1f} s; prefill {running.size(1) / (t_first - t2):.0f} tok/s; decode {decode} "
          f"({len(out)} tokens); total {t_end - t0:.1f} s; peak memory {peak:.0f} MB; "
          f"{dtype_name(dtype)} ({why})", file=sys.stderr)
    if demo:
        answer = (re.findall(r"\d+", tokenizer.decode(out)) or ["(no number)"])[0]
        verdict = "correct" if answer == str(key) else f"wrong (the key is {key})"
        print(f"demo: answer {answer}: {verdict}", file=sys.stderr)
        if adapter == "none":
            print("demo: no trained adapter, so the gates are at 0 and the model reads only the "
                  "last window; it finds the key only when the key lies there", file=sys.stderr)
        elif answer != str(key):
            print(f"demo: the adapter ({adapter}) does not retrieve pass keys reliably yet; the "
                  f"README's results say what it does and does not do", file=sys.stderr)


if __name__ == "__main__":
    main()
