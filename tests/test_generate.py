"""generate.py: layout, input format, sampling, and the CLI on the default model (stdout = the text only)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import example, given, settings, strategies as st
from safetensors.torch import save_file

import load_llama
from data import format_input, pass_key_prefix
from generate import LM_RUNNING, QA_RUNNING, layout, method, parser, pick_dtype, prepare, sample
from load_llama import SHIPPED, load_model

ROOT = Path(__file__).resolve().parent.parent


def run(*args, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / "generate.py"), *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONWARNINGS": "ignore"})


@settings(max_examples=50, deadline=None)
@given(T=st.integers(1, 300_000), window=st.sampled_from([2048, 4096, 8192]), L=st.sampled_from([256, 1024]),
       D=st.integers(1, 4096), max_new=st.integers(1, 1024), question=st.integers(1, 600))
@example(T=100_000, window=8192, L=1024, D=1, max_new=8, question=600)  # --running 1 with a long question
def test_layout_keeps_the_running_text_inside_the_window(T, window, L, D, max_new, question):
    try:
        n = layout(T, window, L, D, max_new, question)
    except ValueError as e:  # only when the question, one chunk and the answer cannot share the window
        assert window - L - max_new < question and "cannot fit the window" in str(e)
        return
    if T + max_new <= window:
        assert n == 0
    else:
        running, D = T - n * L, min(max(D, question), window - L - max_new)  # a --running below the question grows to it
        assert running + max_new <= window, "the running text and the answer must fit the window"
        assert n == 0 or D <= running < D + L
        assert n == 0 or running >= question, "the question stays in the running text"


def test_format_input_marks_the_question(smollm2):
    tok = smollm2[1]
    text, span = format_input(tok, "Some long document.", "Who wrote it?", "The author is")
    assert text[span[0]:span[1]] == "Who wrote it?"
    assert text.startswith("<|im_start|>user\nSome long document.") and text.endswith("assistant\nThe author is")
    assert format_input(tok, "Once upon a time", None) == ("Once upon a time", None)


def test_the_pass_key_prompt_ends_where_the_trained_answer_has_its_digits(smollm2):
    """The demo and eval.py end the prompt with pass_key_prefix; train.py's answers are "The pass key is 60494.".
    The prompt's tokens must be a prefix of the answer's, and the next token the key's first digit."""
    tok = smollm2[1]
    prefix = pass_key_prefix(tok)
    prompt, answer = tok.encode(prefix, add_special_tokens=False).ids, tok.encode("The pass key is 60494.").ids
    assert prefix == "The pass key is "  # SmolLM2 writes the space before a number as a token of its own
    assert answer[:len(prompt)] == prompt and tok.decode(answer[len(prompt):len(prompt) + 1]) == "6"


def native_bf16_flags() -> bool | None:
    """What the kernel says about this CPU (None off Linux): does it have AVX512-BF16 or AMX-BF16?"""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return None
    return bool({"avx512_bf16", "amx_bf16"} & flags)


def test_dtype_auto_is_bf16_exactly_where_the_cpu_has_native_bf16(monkeypatch):
    assert pick_dtype("float32", "cpu") == (torch.float32, "--dtype")  # forced, whatever the CPU
    assert pick_dtype("bfloat16", "cpu") == (torch.bfloat16, "--dtype")
    dtype, why = pick_dtype("auto", "cpu")
    if native_bf16_flags() is not None:  # an oracle independent of torch: the kernel's CPU flags
        assert (dtype == torch.bfloat16) == native_bf16_flags(), why
    assert why.startswith("auto: the CPU")
    for amx, avx512_bf16, expected in [(False, False, torch.float32), (True, False, torch.bfloat16),
                                       (False, True, torch.bfloat16), (True, True, torch.bfloat16)]:
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        dtype, why = pick_dtype("auto", torch.device("cpu"))
        assert dtype == expected and why.startswith("auto: the CPU has native") == (expected == torch.bfloat16), why
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert pick_dtype("auto", "cuda") == (torch.bfloat16, "auto: CUDA")  # only asks torch; allocates nothing


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("question", [False, True])
def test_the_shipped_bf16_adapters_load_into_a_model_of_either_dtype(smollm2, dtype, question):
    """The language-modelling adapter (4 injection layers) when continuing a text, the question-answering one (16,
    MaxSim, log-n scale) for a question."""
    from safetensors.torch import load_file
    path = SHIPPED["qa"] if question else SHIPPED["lm"]
    shipped = load_file(path)
    assert {t.dtype for t in shipped.values()} == {torch.bfloat16}  # the file is bf16
    model, _, adapter = load_model("smollm2-135m", "auto", "cpu", dtype, question=question)
    assert adapter == str(path) and Path(path).with_suffix(".json").is_file()  # with its record
    assert (model.cfg.n_inject, model.cfg.policy, model.cfg.logn) == ((16, "maxsim", True) if question
                                                                       else (4, "cosine", False))
    params = model.state_dict()
    assert {p.dtype for p in params.values()} == {dtype}
    for name, tensor in shipped.items():
        assert torch.equal(params[name], tensor.to(dtype)), name  # bf16 -> fp32 is exact
    assert model.layers[2].cross_attention.gate.item() != 0  # trained gates, not the zeros of a fresh model


def test_auto_picks_the_question_answering_adapter_for_a_question_where_one_is_shipped(tmp_path, monkeypatch):
    for kind in ("lm", "qa"):
        monkeypatch.setitem(SHIPPED, kind, tmp_path / f"{kind}.safetensors")
    pick = lambda question: load_llama.shipped_adapter("smollm2-135m", question)  # noqa: E731
    assert [pick(False), pick(True)] == ["none", "none"]
    SHIPPED["lm"].write_bytes(b"")
    assert [pick(False), pick(True)] == [str(SHIPPED["lm"])] * 2
    SHIPPED["qa"].write_bytes(b"")
    assert [pick(False), pick(True)] == [str(SHIPPED["lm"]), str(SHIPPED["qa"])]
    assert load_llama.shipped_adapter("/some/llama", True) == "none"  # trained for another model: none


def test_paper_sets_every_departure_back_and_a_flag_given_wins():
    paper = method(parser.parse_args(["--paper", "--running", "2048"]))
    args = parser.parse_args(["--paper", "--running", "2048"])
    method(args)
    assert paper == dict(policy="cosine", finest_stride=4, logn=False)
    assert (args.top_chunks, args.running) == (0, 2048)  # every chunk kept; the explicit --running stays
    plain = parser.parse_args([])
    assert method(plain) == dict(policy=None, finest_stride=None, logn=None)  # the adapter's
    assert (plain.top_chunks, plain.running) == (None, None)  # prepare's defaults: 2 chunks, 1,024 / 4,096


def test_an_override_that_differs_from_the_adapter_is_one_warning_line(capsys):
    model = load_model("smollm2-135m", str(SHIPPED["qa"]), policy="cosine", finest_stride=4, logn=False)[0]
    assert (model.cfg.policy, model.cfg.finest_stride, model.cfg.logn, model.cfg.n_inject) == ("cosine", 4, False, 16)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning")]
    assert lines == [f"warning: {SHIPPED['qa']} was trained with policy=maxsim, finest_stride=1, logn=True; now "
                     f"policy=cosine, finest_stride=4, logn=False"]
    load_model("smollm2-135m", str(SHIPPED["qa"]), policy="maxsim")  # as trained: no warning
    assert "warning" not in capsys.readouterr().err


def test_sampling():
    logits = torch.tensor([0.1, 3.0, 0.2, 2.9])
    g = torch.Generator().manual_seed(0)
    assert sample(logits, 0.0, 0, 1.0, g) == 1
    assert sample(logits, 1.0, 1, 1.0, g) == 1  # top-k 1 is greedy
    assert sample(logits, 1.0, 0, 0.01, g) == 1  # a tiny nucleus is greedy
    draws = {sample(logits, 1.0, 2, 1.0, g) for _ in range(200)}
    assert draws == {1, 3}  # top-k 2 never leaves the two best
    a = [sample(logits, 1.0, 0, 1.0, torch.Generator().manual_seed(7)) for _ in range(5)]
    assert a == [sample(logits, 1.0, 0, 1.0, torch.Generator().manual_seed(7)) for _ in range(5)]


def test_cli_stdout_is_only_the_generated_text(smollm2, tmp_path):
    model, tok = smollm2
    file = tmp_path / "short.txt"
    file.write_text("The capital of France is")
    out = run("--file", str(file), "--max_new_tokens", "8", "--dtype", "float32")
    assert out.returncode == 0, out.stderr
    ids = tok.encode("The capital of France is").ids
    with torch.no_grad():  # the same greedy continuation, computed here without the cache
        for _ in range(8):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert out.stdout == tok.decode(ids[-8:]) + "\n"
    assert "0 chunks" in out.stderr and "decode" in out.stderr and "; float32 (--dtype)" in out.stderr


def long_text(n_tokens_approx=10_000):
    from conftest import pydoc_text
    return pydoc_text()[: n_tokens_approx * 4]


def test_cli_long_file_gates_at_zero_equal_the_window_baseline(tmp_path):
    """Past the window, the tree is built; with no adapter (gates at 0) the answer equals the window mode's."""
    file = tmp_path / "long.txt"
    file.write_text(long_text())
    common = ["--file", str(file), "--prompt", "What is a decorator?", "--max_new_tokens", "6", "--running", "256",
              "--adapter", "none", "--dtype", "float32"]
    shared = run(*common, "--show_tree", "--top_chunks", "0")  # every chunk gets a tree
    window = run(*common, "--mode", "window")
    assert shared.returncode == 0 and window.returncode == 0, shared.stderr + window.stderr
    assert shared.stdout == window.stdout and shared.stdout.strip()
    n = int(shared.stderr.split(" chunks x ")[0].split()[-1])
    assert n >= 5 and shared.stderr.count("\nchunk ") + shared.stderr.startswith("chunk ") == n
    assert f"{n * 128} kept entries per layer, beta 8.0" in shared.stderr
    top = run(*common, "--show_tree", "--policy", "cosine", "--top_chunks", "2")  # with any policy, 2 chunks
    assert top.returncode == 0 and top.stdout == window.stdout, top.stderr
    assert top.stderr.count("\nchunk ") == 2 and f"{n - 2} of {n} chunks dropped" in top.stderr
    assert f"{2 * 128} kept entries per layer" in top.stderr and f"{n - 2} chunks dropped by --top_chunks" in top.stderr


def test_cli_adapter_is_loaded_and_changes_the_answer(smollm2, tmp_path):
    model = smollm2[0]
    cross = {k: v.clone() for k, v in model.state_dict().items() if ".cross_attention." in k}
    for k in cross:
        if k.endswith("gate"):
            cross[k].fill_(1.0)
    meta = {"config": json.dumps({"dim": 576, "n_layers": 30, "n_inject": 4})}
    save_file(cross, tmp_path / "open_gates.safetensors", metadata=meta)
    file = tmp_path / "long.txt"
    file.write_text(long_text())
    common = ["--file", str(file), "--prompt", "What is a decorator?", "--max_new_tokens", "6", "--running", "256"]
    opened = run(*common, "--adapter", str(tmp_path / "open_gates.safetensors"))
    closed = run(*common, "--adapter", "none")
    assert opened.returncode == 0, opened.stderr
    assert opened.stdout != closed.stdout

    bad = {**cross, "layers.0.cross_attention.wq.weight": cross["layers.0.cross_attention.wq.weight"][:10]}
    save_file(bad, tmp_path / "bad.safetensors", metadata=meta)
    out = run(*common, "--adapter", str(tmp_path / "bad.safetensors"))
    assert out.returncode == 2 and "does not match the model's cross-attention" in out.stderr
    other = {"config": json.dumps({"dim": 4096, "n_layers": 32, "n_inject": 4})}
    save_file(cross, tmp_path / "other.safetensors", metadata=other)
    out = run(*common, "--adapter", str(tmp_path / "other.safetensors"))
    assert out.returncode == 2 and "trained for another model: dim=4096 (model: 576)" in out.stderr
    two = {k: v for k, v in cross.items() if k.startswith(("layers.0.", "layers.1."))}  # train.py --n_inject 2
    save_file(two, tmp_path / "two.safetensors", metadata={"config": json.dumps({"dim": 576, "n_inject": 2})})
    out = run(*common, "--adapter", str(tmp_path / "two.safetensors"))
    assert out.returncode == 0 and out.stdout not in (opened.stdout, closed.stdout), out.stderr  # 2 layers read
    save_file(cross, tmp_path / "deep.safetensors", metadata={"config": json.dumps({"n_inject": 40})})
    out = run(*common, "--adapter", str(tmp_path / "deep.safetensors"))
    assert out.returncode == 2 and "n_inject=40 must be in 1..n_layers=30" in out.stderr, out.stderr


def test_prepare_gives_the_policy_the_question_then_the_prompts_last_token(smollm2, monkeypatch):
    """The query block: the question's tokens (MaxSim, chunk selection), then the prompt's last token (the paper's
    cosine query). A question keeps 2 chunks by default, whatever the policy; continuing a text keeps all."""
    model, tokenizer = smollm2[0], smollm2[1]
    calls = []
    monkeypatch.setattr(model, "encode_context", lambda context, query, **kw: calls.append((query, kw["top_chunks"])))
    _, _, tokens, _, _ = prepare(model, tokenizer, long_text(), "What is the pass key?", "The key is", running=256)
    prepare(model, tokenizer, long_text(), None, running=256)
    question = tokenizer.encode("What is the pass key?", add_special_tokens=False).ids
    ids = tokens[0].tolist()
    at = next(i for i in range(len(ids)) if ids[i:i + len(question)] == question)
    states = model.layer0_states(tokens)[0][0]
    (query, top), (none, all_chunks) = calls
    assert query.shape[:2] == (1, len(question) + 1) and (top, none, all_chunks) == (2, None, 0)
    assert torch.equal(query[0, :-1], states[at:at + len(question)]) and torch.equal(query[0, -1], states[-1])


def test_prepare_keeps_a_short_running_text_only_for_a_question_through_the_tree(smollm2, monkeypatch):
    """Without --running: a question read through the tree keeps QA_RUNNING tokens (to one chunk more); continuing a
    text, and the window alone, keep LM_RUNNING."""
    model, tokenizer, L = smollm2[0], smollm2[1], smollm2[0].cfg.chunk_len
    monkeypatch.setattr(model, "encode_context", lambda *args, **kw: None)
    for prompt, mode, D in [("What is the pass key?", "sharedllm", QA_RUNNING), (None, "sharedllm", LM_RUNNING),
                            ("What is the pass key?", "window", LM_RUNNING)]:
        _, n, tokens, _, _ = prepare(model, tokenizer, long_text(), prompt, mode=mode)
        assert n > 0 and D <= tokens.size(1) < D + L, (prompt, mode, n, tokens.size(1))


@pytest.mark.parametrize("case", ["missing", "empty", "zero_tokens", "too_many_tokens", "not_utf8", "prompt_only",
                                  "top_p", "top_chunks_without_a_question", "empty_with_a_prompt"])
def test_cli_bad_input(tmp_path, case):
    file = tmp_path / "in.txt"
    args = {"missing": ["--file", str(tmp_path / "nope.txt")],
            "empty": ["--file", str(file)],
            "zero_tokens": ["--prompt", "hi", "--max_new_tokens", "0"],
            "too_many_tokens": ["--file", str(file), "--max_new_tokens", "8000"],
            "not_utf8": ["--file", str(file), "--max_new_tokens", "3"],
            "prompt_only": ["--prompt", "What is the capital of France?", "--max_new_tokens", "12"],
            "top_p": ["--prompt", "hi", "--top_p", "0"],
            "top_chunks_without_a_question": ["--file", str(file), "--top_chunks", "2"],
            "empty_with_a_prompt": ["--file", str(file), "--prompt", "What is the capital of France?",
                                    "--max_new_tokens", "12"]}[case]
    file.write_bytes({"too_many_tokens": b"word " * 3000, "not_utf8": b"caf\xe9 au lait \xff\xfe is",
                      "top_chunks_without_a_question": b"word " * 100}.get(case, b""))
    out = run(*args)
    if case == "empty_with_a_prompt":  # said, then the prompt alone is answered
        assert out.returncode == 0 and "is empty; answering the --prompt alone" in out.stderr, out.stderr
        assert "Paris" in out.stdout
        return
    if case in ("not_utf8", "prompt_only"):
        assert out.returncode == 0, out.stderr
        assert "Traceback" not in out.stderr and out.stdout.strip()
        if case == "not_utf8":
            assert "not valid UTF-8" in out.stderr
        else:  # no --dtype: the report names the dtype auto chose, and why
            assert "Paris" in out.stdout
            dtype, why = pick_dtype("auto", "cpu")
            assert f"; {str(dtype)[6:]} ({why})" in out.stderr.splitlines()[-1], out.stderr
        return
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    phrase = {"missing": "cannot read --file", "empty": "is empty", "too_many_tokens": "cannot fit the window",
              "zero_tokens": "--max_new_tokens: must be at least 1", "top_p": "--top_p: must be in (0, 1]",
              "top_chunks_without_a_question": "ranks chunks by how well they match a question"}[case]
    assert "error: " in out.stderr.strip().splitlines()[-1] and phrase in out.stderr  # argparse: "generate.py: error:"
