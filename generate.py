"""Generate from a long file with SharedLLM: what does not fit the window is read through the context tree.

    python generate.py                                        # demo: find a pass key hidden in ~100K tokens
    python generate.py --file long.txt --prompt "Who wrote the letter?" --show_tree
    python generate.py --file long.txt --mode full            # baseline: plain attention over everything

stdout carries only the generated text, streamed; stderr carries progress, the report and --show_tree.
"""
import argparse
import random
import re
import resource
import sys
import time
from pathlib import Path

import torch

from load_llama import LoadError, load_adapter, load_llama, read_adapter
from sharedllm import KVCache


def checked(kind, ok, why):
    """An argparse type (also train.py's and eval.py's): a `kind` value for which ok(value) holds; else argparse's
    error, saying why."""
    def parse(text):
        if not ok(value := kind(text)):  # a ValueError from kind: argparse says "invalid <__name__> value"
            raise argparse.ArgumentTypeError(f"{why}, not {text!r}")
        return value
    parse.__name__ = kind.__name__
    return parse


def at_least(low, kind=int):
    return checked(kind, lambda x: x >= low, f"must be at least {low}")


DTYPES = ["auto", "bfloat16", "float32"]


def pick_dtype(name: str, device) -> tuple[torch.dtype, str]:
    """--dtype (also train.py's and eval.py's) -> (dtype, why). 'auto' picks bfloat16 only where it is fast: on a
    CUDA GPU that has it, or a CPU with native bf16 matmuls. Elsewhere PyTorch emulates bf16, on an AVX2-only
    EPYC ~90x slower than fp32 (0.0009 vs 0.08 TFLOP/s at 1024^3)."""
    if name != "auto":
        return getattr(torch, name), "--dtype"
    device = torch.device(device)
    if device.type == "cuda":
        fast = torch.cuda.is_bf16_supported()
        return (torch.bfloat16, "auto: CUDA") if fast else (torch.float32, "auto: this GPU has no bf16")
    if device.type != "cpu":
        return torch.float32, f"auto: {device.type}"
    # torch's own CPU feature checks (what its compiler consults), instant and exact, unlike a timing
    native = [isa for isa, has in (("AMX", torch.cpu._is_amx_tile_supported()),
                                   ("AVX512-BF16", torch.cpu._is_avx512_bf16_supported())) if has]
    if native:
        return torch.bfloat16, f"auto: the CPU has native bf16 matmuls ({native[0]})"
    return torch.float32, f"auto: the CPU ({torch.backends.cpu.get_cpu_capability()}) has no native bf16 matmul"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


QA_RUNNING, LM_RUNNING = 1024, 4096  # default D: the tree answers better than the base reads far back (EXPERIMENTS §15)
parser = argparse.ArgumentParser(description="Generate from a long file with SharedLLM.")
parser.add_argument("--file", help="the long input (text); omit both --file and --prompt for the demo")
parser.add_argument("--prompt", help="a question or instruction about the file; without it the file is continued")
parser.add_argument("--model", default="smollm2-135m", help="HF Llama folder, or 'smollm2-135m'")
parser.add_argument("--adapter", default="auto", help="trained cross-attention weights (.safetensors); 'none': "
                    "gates at 0, i.e. the base model on the last window; 'auto': the default model's shipped one, for "
                    "questions (--prompt) if there is one, else for continuing a text")
parser.add_argument("--mode", default="sharedllm", choices=["sharedllm", "window", "full"],
                    help="sharedllm: context tree + running text; window: the running text alone (truncation); "
                         "full: plain attention over the whole input")
parser.add_argument("--policy", choices=["cosine", "maxsim"], help="query-aware descent: the paper's last-token "
                    "cosine, or token-level MaxSim (default: the adapter's, else cosine)")
parser.add_argument("--top_chunks", type=at_least(0), default=2, help="with a question and MaxSim: only the k "
                    "context chunks whose word pairs best match it get a tree (0: every chunk; a departure from the paper)")
parser.add_argument("--max_new_tokens", type=at_least(1), help="tokens to generate at most (128; demo: 12)")
parser.add_argument("--temperature", type=at_least(0, float), default=0.0, help="0: greedy")
parser.add_argument("--top_k", type=at_least(0), default=0, help="sample from the k likeliest tokens (0: all)")
parser.add_argument("--top_p", type=checked(float, lambda p: 0 < p <= 1, "must be in (0, 1]"), default=1.0,
                    help="nucleus sampling threshold")
parser.add_argument("--seed", type=int, default=0, help="sampling seed (and the demo's key and depth)")
parser.add_argument("--answer_prefix", default="", help="text the answer starts with, e.g. 'The pass key is'")
parser.add_argument("--running", type=at_least(1), help="D: running-text tokens the upper model reads (default: "
                    f"{QA_RUNNING} with a --prompt through the tree, else {LM_RUNNING})")
parser.add_argument("--show_tree", action="store_true", help="print which spans of each chunk were kept, how finely")
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
parser.add_argument("--dtype", default="auto", choices=DTYPES, help="weights and activations; auto: bfloat16 on "
                    "CUDA and on CPUs with native bf16 matmuls (AVX512-BF16, AMX), float32 elsewhere")

SHIPPED_ADAPTER = Path(__file__).parent / "adapters" / "smollm2-135m.safetensors"  # continuing a text (LM)
SHIPPED_QA_ADAPTER = Path(__file__).parent / "adapters" / "smollm2-135m-qa.safetensors"  # answering a --prompt
STOP_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "</s>")
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."


def pass_key_prefix(tokenizer, words: str = "The pass key is") -> str:
    """How the answer starts: "The pass key is " (or other words), with the space where the tokenizer writes a
    number's space as a token of its own (SmolLM2: " 604" -> " ", "6", "0", "4"), so that the key's first digit
    is what comes next."""
    spaced, answer = (tokenizer.encode(f"{words} {d}", add_special_tokens=False).ids for d in ("", "6"))
    return f"{words} " if answer[:len(spaced)] == spaced else words


def usage_error(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def shipped_adapter(path, question: bool) -> str:
    """'auto': for the default model, the question-answering adapter when there is a question (if shipped), else
    the language-modelling one; for other models none ('none': gates at 0)."""
    if path != "smollm2-135m":
        return "none"
    return next((str(f) for f in [SHIPPED_QA_ADAPTER] * question + [SHIPPED_ADAPTER] if f.exists()), "none")


def load_model(path, adapter="auto", device="cpu", dtype=torch.float32, question=False):
    """load_llama, then the adapter ('auto': shipped_adapter). The model gets cross-attention in as many layers as
    the adapter was trained with (train.py --n_inject)."""
    if adapter == "auto":
        adapter = shipped_adapter(path, question)
    trained = read_adapter(adapter, tensors=False)[0] if adapter != "none" else {}  # load_adapter reads the tensors
    layers = {"n_inject": trained["n_inject"]} if "n_inject" in trained else {}
    model, tokenizer = load_llama(path, device=device, dtype=dtype, **layers)
    if adapter != "none":
        load_adapter(model, adapter)
    return model, tokenizer, adapter


def format_input(tokenizer, document: str, prompt: str | None, answer_prefix: str = ""):
    """The model's input text and the character span of the question in it (None when continuing a text).
    Instruct formats are recognised from the tokenizer's special tokens."""
    if not prompt:
        return document + answer_prefix, None
    vocab = tokenizer.get_vocab()
    user = f"{document}\n\n" if document else ""
    if "<|im_start|>" in vocab:  # ChatML (SmolLM2, Qwen, ...)
        head, tail = "<|im_start|>user\n" + user, "<|im_end|>\n<|im_start|>assistant\n"
    elif "<|start_header_id|>" in vocab:  # Llama 3
        head = "<|start_header_id|>user<|end_header_id|>\n\n" + user
        tail = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    elif "<s>" in vocab and "</s>" in vocab:  # Llama 2 chat
        head, tail = "[INST] " + user, " [/INST] "
    else:
        head, tail = user, "\n"
    return head + prompt + tail + answer_prefix, (len(head), len(head) + len(prompt))


def layout(n_tokens: int, window: int, L: int, D: int, max_new: int, min_running: int = 1) -> int:
    """How many L-token chunks go to the context tree (DESIGN Sec. 6): 0 when everything fits the window; else
    n = (T - D) // L: the running text keeps D to D + L tokens, D grown to hold the question and shrunk to fit."""
    if n_tokens + max_new <= window:
        return 0
    D = min(max(D, min_running), window - L - max_new)  # the running text holds at least the question
    if D < min_running:
        raise ValueError(f"--max_new_tokens {max_new} cannot fit the window: {window} tokens hold at most "
                         f"{window - L - min_running} new tokens beside the running text and one {L}-token "
                         f"chunk; ask for fewer")
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


def prepare(model, tokenizer, document, prompt, answer_prefix="", mode="sharedllm", policy=None,
            max_new_tokens=128, running=None, progress=False, top_chunks=0):
    """Tokenise, lay out (DESIGN Sec. 6: X_C = the first n*L tokens, X_D = the rest) and build the memory once:
    query-aware with the question's last token (or its tokens, MaxSim), right-policy when continuing a text.
    -> (ids, n, running tokens (1, T), memory or None, tree seconds). ValueError on input that cannot fit."""
    cfg, device = model.cfg, model.output.weight.device
    text, question = format_input(tokenizer, document, prompt, answer_prefix)
    encoding = tokenizer.encode(text)
    ids = encoding.ids
    if not ids:
        raise ValueError("the input is empty after tokenisation; give a file with text, or a --prompt")
    q_first = q_last = None
    if question is not None:  # token span of the question, from the tokenizer's character offsets
        inside = [i for i, (s, e) in enumerate(encoding.offsets) if s < question[1] and e > question[0]]
        q_first, q_last = inside[0], inside[-1]
    tail = len(ids) - (q_first if q_first is not None else len(ids) - 1)  # the question must stay in X_D
    running = running or (QA_RUNNING if question is not None and mode == "sharedllm" else LM_RUNNING)
    n = 0 if mode == "full" else layout(len(ids), cfg.max_seq_len, cfg.chunk_len, running, max_new_tokens, tail)
    split = n * cfg.chunk_len
    context, tokens = torch.tensor(ids[:split], device=device), torch.tensor([ids[split:]], device=device)
    memory, t0 = None, time.time()
    if n > 0 and mode == "sharedllm":
        query = None
        if q_first is not None:
            states = model.query_states(tokens)[0]
            cosine = (policy or cfg.policy) == "cosine"  # default: the policy the adapter was trained with
            query = states[q_last - split][None] if cosine else states[q_first - split:q_last - split + 1][None]
        memory = model.encode_context(context[None], query, progress=progress, top_chunks=top_chunks)
    return ids, n, tokens, memory, time.time() - t0


@torch.no_grad()
def generate(model, tokens, memory, max_new_tokens: int, stop_ids, pick, prefill_chunk: int = 4096):
    """Prefill the running text (1, T) in pieces, then decode with the KV cache; the memory stays fixed.
    Yields token ids as they are chosen."""
    cache = KVCache(model.cfg, 1, tokens.size(1) + max_new_tokens, tokens.device, model.output.weight.dtype)
    for piece in tokens.split(prefill_chunk, dim=1):
        logits = model(piece, cache=cache, memory=memory, last_only=True)
    for _ in range(max_new_tokens):
        next_id = pick(logits[0, -1])
        if next_id in stop_ids:
            return
        yield next_id
        logits = model(torch.tensor([[next_id]], device=tokens.device), cache=cache, memory=memory)


def demo_document(tokenizer, seed: int, n_tokens: int = 100_000):
    """~100K tokens of Python's own documentation with a pass key hidden at a random depth."""
    from pydoc_data import topics
    rng = random.Random(seed)
    text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    text = tokenizer.decode(tokenizer.encode(text).ids[:n_tokens])
    key, depth = rng.randint(10000, 99999), rng.random()
    cut = text.find("\n\n", int(depth * len(text)))
    cut = len(text) if cut < 0 else cut
    return text[:cut] + "\n\n" + NEEDLE.format(key=key) + text[cut:], key, depth


def show_tree(trees, ids, L, tokenizer, width=64):
    """One line per chunk: a bar with a character per L/width tokens ('.', ':', '#' from coarse to fine) and
    the start of the finest kept text."""
    marks = ".:#" if max(len(nodes) for nodes in trees) == 4 else ".:-=+*#%@"
    for c, nodes in enumerate(trees):
        if not nodes:  # dropped by --top_chunks
            continue
        bar = "".join(marks[min(n.level, len(marks)) - 1] * round((n.end - n.start) * width / L) for n in nodes)
        finest = [n for n in nodes if n.level == max(m.level for m in nodes)]
        start = c * L + finest[0].start
        text = tokenizer.decode(ids[start:start + 12]).replace("\n", " ")
        print(f"chunk {c:4d} [{c * L}:{(c + 1) * L}] {bar} finest from {start}: {text!r}", file=sys.stderr)
    if not all(trees):
        print(f"{sum(not nodes for nodes in trees)} of {len(trees)} chunks dropped (--top_chunks)", file=sys.stderr)


def main():
    args = parser.parse_args()
    demo = args.file is None and args.prompt is None
    if args.max_new_tokens is None:
        args.max_new_tokens = 12 if demo else 128
    device = torch.device(args.device)
    dtype, why = pick_dtype(args.dtype, device)
    t0 = time.time()

    # 1. The input text, checked before the model loads.
    document, prompt, answer_prefix = "", args.prompt, args.answer_prefix
    if args.file is not None:
        try:
            raw = Path(args.file).read_bytes()
        except OSError as e:
            usage_error(f"cannot read --file {args.file}: {e.strerror}")
        document = raw.decode("utf-8", errors="replace")
        if document.count("\ufffd") > raw.decode("utf-8", errors="ignore").count("\ufffd"):
            print(f"note: {args.file} is not valid UTF-8; undecodable bytes were replaced by U+FFFD", file=sys.stderr)
        if not document.strip() and not prompt:
            usage_error(f"{args.file} is empty: give a file with text, or a --prompt")

    # 2. Model, tokenizer, adapter.
    try:
        model, tokenizer, adapter = load_model(args.model, args.adapter, device, dtype, question=bool(prompt or demo))
    except LoadError as e:
        usage_error(str(e))
    if tokenizer is None:
        usage_error(f"{args.model} has no tokenizer.json; generate.py needs one to read text")
    cfg = model.cfg
    if demo:
        document, key, depth = demo_document(tokenizer, args.seed)
        prompt, answer_prefix = "What is the pass key?", args.answer_prefix or pass_key_prefix(tokenizer)
        print(f"demo: a pass key hidden at {depth:.0%} depth of ~100K tokens of Python's docs", file=sys.stderr)

    # 3. Layout and memory, built once.
    try:
        ids, n, running, memory, t_tree = prepare(model, tokenizer, document, prompt, answer_prefix, args.mode,
                                                  args.policy, args.max_new_tokens, args.running, True, args.top_chunks)
    except ValueError as e:
        usage_error(str(e))
    if args.mode == "full" and len(ids) + args.max_new_tokens > cfg.max_seq_len:
        print(f"note: --mode full reads {len(ids)} tokens with a model trained on {cfg.max_seq_len}", file=sys.stderr)
    if args.show_tree and memory is not None:
        show_tree(memory.trees[0], ids, cfg.chunk_len, tokenizer)
    split = n * cfg.chunk_len

    # 4. Prefill the running text, then decode, streaming the text to stdout.
    vocab = tokenizer.get_vocab()
    stop_ids = set(cfg.eos_ids) | {vocab[t] for t in STOP_TOKENS if t in vocab}
    gen = torch.Generator(device=device).manual_seed(args.seed)
    pick = lambda logits: sample(logits, args.temperature, args.top_k, args.top_p, gen)  # noqa: E731
    out, shown, t_first = [], "", None
    t2 = time.time()
    for token in generate(model, running, memory, args.max_new_tokens, stop_ids, pick):
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
    beta = f", beta {split / entries:.1f}" if entries else ""
    kept = sum(map(bool, memory.trees[0])) if memory is not None else 0
    beta += f"; {n - kept} chunks dropped by --top_chunks" if kept < n and memory is not None else ""
    decode = f"{(len(out) - 1) / (t_end - t_first):.1f} tok/s" if len(out) > 1 else "n/a"
    print(f"[{args.mode}] input {len(ids)} tokens = {n} chunks x {cfg.chunk_len} in memory ({entries} kept entries "
          f"per layer{beta}) + {running.size(1)} running tokens; tree {t_tree:.1f} s; prefill "
          f"{running.size(1) / (t_first - t2):.0f} tok/s; decode {decode} ({len(out)} tokens); "
          f"total {t_end - t0:.1f} s; peak memory {peak:.0f} MB; {dtype_name(dtype)} ({why})", file=sys.stderr)
    if demo:
        answer = (re.findall(r"\d+", tokenizer.decode(out)) or ["(no number)"])[0]
        verdict = "correct" if answer == str(key) else f"wrong (the key is {key})"
        print(f"demo: answer {answer}: {verdict}", file=sys.stderr)
        if adapter == "none":
            print("demo: no trained adapter, so the gates are at 0 and the model reads only the last window; "
                  "it finds the key only when the key lies there", file=sys.stderr)
        elif answer != str(key):
            print(f"demo: the adapter ({adapter}) does not retrieve pass keys reliably yet; the README's "
                  f"'What it achieves' says what it does and does not do", file=sys.stderr)


if __name__ == "__main__":
    main()
