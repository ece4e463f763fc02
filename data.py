"""Text and tasks shared by train.py, eval.py and the demo: support code, not the method.

Corpora that are on every machine (Python's own docs and standard library), the chat formats of
instruct models, and generated retrieval tasks: a pass key, named facts, a sentence to quote, hidden
in real text. Every task has two sets of wordings: split 0 trains, split 1 is held out (validation
and `eval.py passkey --held_out`), so a held-out score is on wordings training never saw.
"""
import json
import random
import sys
import sysconfig
from pathlib import Path

import torch
from pydoc_data import topics


class DataError(Exception):
    """Training data that cannot be used; the message says what to do."""


# -----------------------------------------------------------------------------
# Corpora

TEXT = {".txt", ".md", ".markdown", ".rst", ".text"}


def read_data(paths, on_bad_line="skip"):
    """Files and folders -> (documents, (prompt, response) pairs): text files, and .jsonl lines
    {"text": ...} or {"prompt": ..., "response": ...}."""
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
                msg = f"{f}:{n}: not a JSON object with 'text' or 'prompt' + 'response' " \
                      f"({type(e).__name__})"
                if on_bad_line == "stop":
                    raise DataError(msg + "; fix it, or pass --on_bad_line skip")
                print(f"skipped {msg}", file=sys.stderr)
    return docs, qa


def pydoc_text() -> str:
    """All of Python's pydoc topics in sorted key order: 113K tokens of English prose."""
    return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))


def builtin_docs():
    """Python's own documentation and standard-library sources: ~1.3M tokens on every machine."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = [topics.topics[k] for k in sorted(topics.topics)]
    return docs + [f.read_text(errors="replace") for f in sorted(stdlib.glob("*.py"))]


def held_out_code():
    """What training never reads (eval.py's default): the standard library's packages (asyncio,
    ...)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return "\n\n".join(f.read_text(errors="replace") for f in sorted(root.glob("*/*.py"))
                       if "test" not in f.parts[-2] and "site-packages" not in str(f))


# -----------------------------------------------------------------------------
# Chat formats, recognised from the tokenizer's special tokens

END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "</s>", "<|end_of_text|>", "<|endoftext|>")


def format_input(tokenizer, document: str, prompt: str | None, answer_prefix: str = ""):
    """The model's input text, and the character span of the question in it (None when continuing a
    text)."""
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


def token_span(offsets, span) -> tuple[int, int]:
    """The first and last token whose characters (a tokenizer's offsets) overlap a character
    span."""
    inside = [i for i, (a, b) in enumerate(offsets) if a < span[1] and b > span[0]]
    return inside[0], inside[-1]


def stop_ids(tokenizer, eos_ids=()) -> set:
    vocab = tokenizer.get_vocab()
    return set(eos_ids) | {vocab[t] for t in END_OF_TURN if t in vocab}


def response_ids(tokenizer, response: str) -> list[int]:
    """An answer's tokens, then the chat format's end-of-turn token."""
    end = [tokenizer.token_to_id(t) for t in END_OF_TURN if tokenizer.token_to_id(t) is not None]
    return tokenizer.encode(response, add_special_tokens=False).ids + end[:1]


def encode_qa(tokenizer, document, prompt, response, L, D):
    """Tokenise a QA sample -> (ids, n context chunks, first and last question token, first answer
    token)."""
    text, span = format_input(tokenizer, document, prompt)
    enc = tokenizer.encode(text)
    n = max((len(enc.ids) - D) // L, 0)
    first, last = token_span(enc.offsets, span)
    return enc.ids + response_ids(tokenizer, response), n, first, last, len(enc.ids)


# -----------------------------------------------------------------------------
# Generated retrieval tasks: wording, key format, filler and length all vary. Index 0: training
# wordings; index 1: held out.

NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
NEEDLES = [[NEEDLE, "Remember this pass key: {key}.",
            "Note that the pass key is {key}, keep it in mind.",
            "The secret pass key you will need later is {key}."],
           ["Important: the pass key is {key}.", "Keep this pass key safe: {key}."]]
QUESTIONS = [["What is the pass key?", "Which pass key was mentioned in the text?",
              "Tell me the pass key."],
             ["What pass key did the text give?", "Recall the pass key from the document."]]
FACTS = [["The {thing} of {name} is {key}.", "{name}'s {thing} is {key}."],
         ["For {name}, the {thing} is {key}."]]
LOOKUPS = [["What is the {thing} of {name}?", "Tell me {name}'s {thing}."],
           ["Which {thing} does {name} have?"]]
THINGS = ["locker code", "room number", "badge id", "account pin"]
NAMES = ["Ada", "Linus", "Grace", "Guido", "Alan", "Barbara", "Ken", "Margaret", "Dennis"]
QUOTES = [["{name} left the {item} {place}.", "Yesterday {name} hid the {item} {place}."],
          ["According to {name}, the {item} is kept {place}."]]
QUOTE_QUESTIONS = [["Quote the sentence about {name}.",
                    "Repeat word for word what the text says about {name}."],
                   ["Which sentence mentions {name}? Quote it exactly."]]
ITEMS = ["spare key", "old map", "red ledger", "brass lamp", "signed contract", "backup drive"]
PLACES = ["under the third stair", "behind the blue door", "in the north tower",
          "beside the broken clock", "inside the piano", "on the top shelf of the library"]
TASKS = {"passkey": 0.4, "lookup": 0.3, "quote": 0.3}  # the built-in mix (train.py --tasks picks)


def insert(text: str, placed) -> str:
    """Put each (character offset, sentence) into text, spaced; from the end, so offsets hold."""
    for cut, sentence in sorted(placed, reverse=True):
        text = text[:cut] + f" {sentence} " + text[cut:]
    return text


def pass_key_prefix(tokenizer, words: str = "The pass key is") -> str:
    """How the answer starts: "The pass key is " (or other words), with the space where the
    tokenizer writes a number's space as a token of its own (SmolLM2: " 604" -> " ", "6", "0", "4"),
    so that the key's first digit is what comes next."""
    spaced, answer = (tokenizer.encode(f"{words} {d}", add_special_tokens=False).ids
                      for d in ("", "6"))
    return f"{words} " if answer[:len(spaced)] == spaced else words


def key_formatter(rng):
    return rng.choice([lambda: str(rng.randint(10000, 99999)),
                       lambda: str(rng.randint(10**6, 10**7 - 1)),
                       lambda: f"{rng.choice('ABCDEFGHJK')}{rng.randint(100, 999)}-"
                               f"{rng.randint(1000, 9999)}"])


def retrieval_task(rng, key_format, n_facts, split, tasks=tuple(TASKS), lookup_facts=1):
    """n_facts sentences to hide (a lookup: at least lookup_facts), a question about the first, its
    answer -> (facts, question, answer)."""
    draw, total, kind = rng.random() * sum(TASKS[t] for t in tasks), 0.0, tasks[-1]
    for t in tasks:  # the tasks' shares, renormalised
        total += TASKS[t]
        if draw < total:
            kind = t
            break
    if kind == "passkey":  # the key, and other codes under another name
        key = key_format()
        facts = [rng.choice(NEEDLES[split]).format(key=key)] + [
            rng.choice(NEEDLES[split]).format(key=key_format()) for _ in range(n_facts - 1)]
        facts = facts[:1] + [f.replace("pass key", "backup code") for f in facts[1:]]
        return facts, rng.choice(QUESTIONS[split]), f"The pass key is {key}."
    if kind == "lookup":  # several named facts: a key-value lookup
        names, thing = rng.sample(NAMES, max(n_facts, lookup_facts)), rng.choice(THINGS)
        keys = [key_format() for _ in names]
        facts = [rng.choice(FACTS[split]).format(thing=thing, name=n, key=k)
                 for n, k in zip(names, keys)]
        question = rng.choice(LOOKUPS[split]).format(thing=thing, name=names[0])
        return facts, question, f"The {thing} of {names[0]} is {keys[0]}."
    names = rng.sample(NAMES, n_facts)  # a fact to quote: the answer is the hidden sentence itself
    facts = [rng.choice(QUOTES[split]).format(name=n, item=rng.choice(ITEMS),
                                              place=rng.choice(PLACES)) for n in names]
    return facts, rng.choice(QUOTE_QUESTIONS[split]).format(name=names[0]), facts[0]


def retrieval_sample(rng, filler, tokenizer, n_ctx, L, D, split=0, tasks=tuple(TASKS),
                     lookup_facts=1, in_running=False):
    """A long document of real text with facts hidden at random depths, a question about one, its
    answer -> (document, question, answer). in_running: the asked fact goes into the document's last
    ~D/2 tokens (the running text), the others before."""
    key_format = key_formatter(rng)
    length = n_ctx * L + D + 64  # enough that the prompt yields n_ctx whole chunks before X_D
    start = rng.randrange(len(filler) - length)
    text = tokenizer.decode(filler[start:start + length])
    in_context = int(len(text) * n_ctx * L / length)  # facts go into the chunks, never X_D
    cuts = sorted(rng.randrange(in_context) for _ in range(rng.choice([1, 1, 2, 3])))
    facts, question, answer = retrieval_task(rng, key_format, len(cuts), split, tasks, lookup_facts)
    cuts += sorted(rng.randrange(in_context) for _ in facts[len(cuts):])  # a lookup's extra facts
    order = list(range(len(cuts)))
    rng.shuffle(order)
    if in_running:  # ~4 characters a token: within the last D/2 tokens, the running text's
        cuts[order.index(0)] = len(text) - rng.randrange(1, 2 * D)
    return insert(text, [(cut, facts[i]) for cut, i in zip(cuts, order)]), question, answer


def pooled_sample(rng, filler, tokenizer, n_ctx, L, D, pool_size, split=0, tasks=tuple(TASKS),
                  lookup_facts=1, in_running=False):
    """A retrieval sample laid out chunk by chunk for training with a pool: chunk 0 (the chat header
    and filler) and the chunks that hold a fact are fresh; every other chunk is a pool row. ->
    (fresh chunks (k, L), the n_ctx chunks in order as pool rows or -1 for the next fresh one, the
    running text's ids with the answer, the question's (first, last) token and the answer's start in
    running-text coordinates). in_running: the asked fact is hidden in the running text."""
    key_format, n_facts = key_formatter(rng), rng.choice([1, 1, 2, 3])
    facts, question, answer = retrieval_task(rng, key_format, n_facts, split, tasks, lookup_facts)
    text, span = format_input(tokenizer, "\x00", question)  # the chat format, around the document
    cut = text.index("\x00")
    head = tokenizer.encode(text[:cut]).ids
    tail = tokenizer.encode(text[cut + 1:], add_special_tokens=False)
    homes = [-1 if in_running and i == 0 else rng.randrange(n_ctx) for i in range(len(facts))]
    order, fresh = [], []
    for c in range(n_ctx):
        mine = [tokenizer.encode(f" {f} ", add_special_tokens=False).ids
                for f, h in zip(facts, homes) if h == c]
        if c > 0 and not mine:
            order.append(rng.randrange(pool_size))
            continue
        room = L - len(head) * (c == 0) - sum(map(len, mine))
        assert room > 0, f"--chunk {L} cannot hold a retrieval sample's facts; use a longer one"
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
        fact = tokenizer.encode(f" {facts[0]} ", add_special_tokens=False).ids
        running = running[:at] + fact + running[at:]
    first, last = token_span(tail.offsets, (span[0] - cut - 1, span[1] - cut - 1))
    ids = running + tail.ids + response_ids(tokenizer, answer)
    return torch.tensor(fresh), order, ids, (len(running) + first, len(running) + last), \
        len(running) + len(tail.ids)


def demo_document(tokenizer, seed: int, n_tokens: int = 100_000):
    """~100K tokens of Python's own documentation with a pass key hidden at a random depth."""
    rng = random.Random(seed)
    text = tokenizer.decode(tokenizer.encode(pydoc_text()).ids[:n_tokens])
    key, depth = rng.randint(10000, 99999), rng.random()
    cut = text.find("\n\n", int(depth * len(text)))
    cut = len(text) if cut < 0 else cut
    return text[:cut] + "\n\n" + NEEDLE.format(key=key) + text[cut:], key, depth
