"""train.py on a tiny random model with the real tokenizer: learning, exact resume, checkpoints, QA targets,
data-parallel equivalence, bad inputs."""
import json
import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tokenizers import Tokenizer

import data
import sharedllm
import train
from generate import pick_dtype
from data import encode_qa
from load_llama import load_model
from conftest import pydoc_text, tiny_with_real_tokenizer

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2):
    return tiny_with_real_tokenizer(tmp_path_factory.mktemp("tinytok") / "m", max_position_embeddings=512)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    from conftest import pydoc_text
    file = tmp_path_factory.mktemp("data") / "docs.txt"
    file.write_text(pydoc_text()[:60_000])
    return file


def base_args(tiny, out, *extra):
    return ["--model", str(tiny), "--seq", "320", "--chunk", "64", "--running", "64", "--out", str(out),
            "--val", "2", "--log_every", "1", "--warmup", "2", *extra]


def test_twenty_steps_decrease_the_loss(tiny, text_file, tmp_path, capsys):
    train.main(base_args(tiny, tmp_path, "--data", str(text_file), "--steps", "20", "--grad_accum", "1",
                         "--tune", "all", "--lr", "3e-3"))
    losses = [float(x) for x in re.findall(r"step \d+ loss ([\d.]+)", capsys.readouterr().err)]
    assert len(losses) == 20
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses


def test_retrieval_samples_take_their_filler_from_data_only_when_asked(tiny, text_file, tmp_path, monkeypatch):
    fillers, draw = [], train.retrieval_sample
    monkeypatch.setattr(train, "retrieval_sample", lambda rng, filler, *a: fillers.append(filler) or draw(rng, filler,
                                                                                                         *a))
    train.main(base_args(tiny, tmp_path / "a", "--data", str(text_file), "--steps", "1", "--grad_accum", "2"))
    assert not fillers  # --data alone: language modelling only
    train.main(base_args(tiny, tmp_path / "b", "--data", str(text_file), "--steps", "1", "--grad_accum", "2",
                         "--retrieval", "1.0", "--val", "0"))
    tok = Tokenizer.from_file(str(tiny / "tokenizer.json"))
    assert len(fillers) == 2 and tok.decode(fillers[0][:1000]) in text_file.read_text()  # the data's own text


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_interrupted_run_resumes_to_exactly_the_uninterrupted_parameters(tiny, tmp_path, monkeypatch, how):
    args = ["--steps", "6", "--grad_accum", "2", "--retrieval", "0.5", "--save_every", "100"]
    train.main(base_args(tiny, tmp_path / "straight", *args))
    real_step, calls = torch.optim.AdamW.step, []

    def step_then_interrupt(self, *a, **k):  # Ctrl-C during the 4th optimizer step, or kill: the step finishes
        calls.append(1)
        if len(calls) == 4 and how == "ctrl-c":
            raise KeyboardInterrupt
        if len(calls) == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", step_then_interrupt)
    with pytest.raises(SystemExit) as e:
        train.main(base_args(tiny, tmp_path / "resumed", *args))
    assert e.value.code == 130
    assert json.loads((tmp_path / "resumed" / "ckpt.json").read_text())["step"] == (3 if how == "ctrl-c" else 4)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # train.main put back the handler it found
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    train.main(base_args(tiny, tmp_path / "resumed", *args, "--resume"))
    a, b = load_file(tmp_path / "straight" / "ckpt.safetensors"), load_file(tmp_path / "resumed" / "ckpt.safetensors")
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("tune", ["xattn", "top"])
def test_checkpoints_hold_only_trainable_tensors(tiny, tmp_path, tune):
    train.main(base_args(tiny, tmp_path, "--steps", "1", "--grad_accum", "1", "--tune", tune, "--val", "0",
                         "--n_inject", "2", "--policy", "maxsim"))
    names = set(load_file(tmp_path / "adapter.safetensors"))
    cross = {n for n in names if ".cross_attention." in n}
    assert len(cross) == 2 * 4  # norm, wq, wo, gate in each of the M = 2 injection layers
    top = names - cross  # --tune top: every tensor of layers 2 and 3 (9 each), nothing below them
    assert top == (set() if tune == "xattn" else {n for n in top if n.split(".")[1] in ("2", "3")})
    assert len(top) == (0 if tune == "xattn" else 2 * 9)
    with safe_open(tmp_path / "ckpt.safetensors", "pt") as f:
        params = {n for n in f.keys() if not n.startswith("optim.")}
        assert params == names and json.loads(f.metadata()["config"])["tune"] == tune
        assert {n.split(".", 2)[2] for n in f.keys() if n.startswith("optim.")} == names
    model = load_model(str(tiny), str(tmp_path / "adapter.safetensors"))[0]
    assert (model.cfg.policy, model.cfg.n_inject) == ("maxsim", 2)  # the adapter's record sets the config


def test_qa_loss_counts_response_tokens_only_and_query_is_the_last_prompt_token(smollm2):
    tok = smollm2[1]
    document = "word " * 300
    ids, n, q0, q1, answer_from = encode_qa(tok, document, "What is the pass key?", "It is 42.", 64, 64)
    assert n == (answer_from - 64) // 64 >= 1
    assert tok.decode(ids[q0:q1 + 1]) == "What is the pass key?"
    assert ids[q1 + 1] == tok.token_to_id("<|im_end|>")  # the chat format closes the prompt right after
    context, running, targets, query = train.make_example(ids, n, 64, (q0, q1), answer_from)
    kept = targets[targets != -100].tolist()
    assert kept == ids[answer_from:] and tok.decode(kept, skip_special_tokens=False) == "It is 42.<|im_end|>"
    assert running[query[1]] == ids[q1] and context.numel() == n * 64  # the question's tokens, then
    assert running[query[2]] == ids[answer_from - 1] and targets[query[2]] == ids[answer_from]  # the prompt's last


def test_retrieval_samples_hide_their_answer_in_the_context_and_validation_wording_is_unseen(smollm2):
    tok, questions, quotes = smollm2[1], {0: set(), 1: set()}, 0
    filler = tok.encode(pydoc_text()[:200_000]).ids
    for i in range(80):
        split = i % 2
        document, question, answer = data.retrieval_sample(random.Random(i), filler, tok, 2, 256, 128, split)
        name = next((n for n in data.NAMES if n in question), "")
        thing = next((t for t in data.THINGS if t in question), "")
        questions[split].add(question.replace(name or "-", "X").replace(thing or "-", "Y"))  # the wording
        if "pass key" in question:
            assert answer.startswith("The pass key is ") and answer[16:-1] in document
        elif thing:  # a lookup: the key is in the text
            assert answer.startswith(f"The {thing} of {name} is ") and answer.split()[-1][:-1] in document
        else:  # a sentence to quote, verbatim in the text
            assert answer in document and name in answer
            quotes += 1
    assert quotes >= 10 and questions[0] and questions[1] and not questions[0] & questions[1]


def test_in_running_puts_the_asked_fact_in_the_running_text_and_lookups_get_their_fewest_facts(smollm2):
    tok, L, D = smollm2[1], 256, 64
    filler = tok.encode(pydoc_text()[:200_000]).ids
    for i in range(24):
        args = (filler, tok, 1 + i % 3, L, D)
        doc, question, answer = data.retrieval_sample(random.Random(i), *args, 0, ("passkey", "lookup"), 4, True)
        ids, n, q0, q1, a = encode_qa(tok, doc, question, answer, L, D)
        context, running, _, _ = train.make_example(ids, n, L, (q0, q1), a)
        fresh, _, p_ids, _, p_a = data.pooled_sample(random.Random(i), *args, 5, 0, ("passkey", "lookup"), 4, True)
        for ctx, run, said in ((context, running[:a - n * L].tolist(), answer), (fresh, p_ids[:p_a], tok.decode(
                p_ids[p_a:]))):
            key = said.split()[-1][:-1]
            assert key in tok.decode(run) and key not in tok.decode(ctx.view(-1).tolist()), (i, said)
        if "pass key" not in question:  # a lookup: the asked name and at least 3 others, each with its key
            assert len(re.findall(r"\b\d{5,7}\b|[A-K]\d{3}-\d{4}", doc)) >= 4, doc


@pytest.mark.parametrize("tasks", [("passkey", "lookup", "quote"), ("passkey", "lookup"), ("quote",)])
def test_tasks_choose_which_retrieval_tasks_are_drawn(tasks):
    def kind(answer):
        return "passkey" if "pass key" in answer else "lookup" if any(t in answer for t in data.THINGS) else "quote"
    rng, fmt = random.Random(0), lambda: "12345"
    drawn = [kind(data.retrieval_task(rng, fmt, 2, 0, tasks)[2]) for _ in range(300)]
    assert set(drawn) == set(tasks)
    if len(tasks) == 2:  # shares renormalised: 0.4 and 0.3 -> 4/7 and 3/7
        assert abs(drawn.count("passkey") / 300 - 4 / 7) < 0.1


def test_pooled_samples_hide_their_facts_in_fresh_chunks(smollm2):
    tok, L, D = smollm2[1], 256, 64
    filler = tok.encode(pydoc_text()[:200_000]).ids
    for i in range(40):
        n_ctx = 1 + i % 7
        fresh, order, ids, (q0, q1), a = data.pooled_sample(random.Random(i), filler, tok, n_ctx, L, D, 5)
        assert len(order) == n_ctx and order[0] == -1 and all(r == -1 or 0 <= r < 5 for r in order)
        assert fresh.shape == (order.count(-1), L)
        assert tok.decode(fresh[0].tolist(), skip_special_tokens=False).startswith("<|im_start|>user\n")
        answer, context = tok.decode(ids[a:]), tok.decode(fresh.view(-1).tolist())
        assert answer in context or answer.split()[-1][:-1] in context, (answer, i)  # a quote, or a key: fresh
        assert ids[q1 + 1] == tok.token_to_id("<|im_end|>") and tok.decode(ids[q0:q1 + 1]).strip()[-1] in "?."
        assert q0 >= D and a == len(ids) - len(tok.encode(answer, add_special_tokens=False).ids) - 1


def test_training_with_a_pool_and_spread_positions(tiny, tmp_path, capsys):
    train.main(base_args(tiny, tmp_path, "--retrieval", "1.0", "--pool", "6", "--max_chunks", "9", "--positions",
                         "30", "--steps", "2", "--grad_accum", "2", "--val", "1", "--policy", "maxsim"))
    err = capsys.readouterr().err
    assert "pool: 6 filler chunks encoded" in err and "validation loss" in err
    losses = [float(x) for x in re.findall(r"step \d+ loss ([\d.]+)", err)]
    assert len(losses) == 2 and all(0 < x < 20 for x in losses), err


def test_the_pool_cache_is_reused_refused_when_built_otherwise_and_never_half_written(tiny, tmp_path, capsys,
                                                                                     monkeypatch):
    cache = tmp_path / "pools" / "pool.safetensors"
    common = ["--retrieval", "1.0", "--pool", "4", "--max_chunks", "6", "--steps", "1", "--grad_accum", "2", "--val",
              "0", "--policy", "maxsim", "--finest_stride", "2", "--pool_cache", str(cache), "--dtype", "float32"]
    real_save = train.save_file

    def full_disk(tensors, path, metadata=None):
        if Path(path).name.startswith("pool"):
            Path(path).write_bytes(b"partial")
            raise OSError(28, "No space left on device")
        return real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(train, "save_file", full_disk)  # 1. a full disk: a warning, nothing written, training goes on
    train.main(base_args(tiny, tmp_path / "a", *common))
    err = capsys.readouterr().err
    assert "warning: could not write" in err and "pool: 4 filler chunks encoded" in err and "step 1 loss" in err
    assert not list(cache.parent.iterdir())
    monkeypatch.setattr(train, "save_file", real_save)
    (cache.parent / "pool.safetensors.tmp").write_bytes(b"an interrupted build")  # 2. never read: encoded again
    train.main(base_args(tiny, tmp_path / "b", *common))
    assert "pool: 4 filler chunks encoded" in capsys.readouterr().err and cache.is_file()
    train.main(base_args(tiny, tmp_path / "c", *common))  # 3. read back: the same training as with the encoded pool
    assert f"pool: 4 filler chunks read from {cache}" in capsys.readouterr().err
    b, c = load_file(tmp_path / "b" / "adapter.safetensors"), load_file(tmp_path / "c" / "adapter.safetensors")
    assert b.keys() == c.keys() and all(torch.equal(b[n], c[n]) for n in b)
    saved = cache.read_bytes()
    for flag, value, phrase in [("--finest_stride", "1", "was built for finest_stride=2 (now 1)"),
                                ("--n_inject", "2", "was built for n_inject=4 (now 2)"),
                                ("--dtype", "bfloat16", "was built for dtype=float32 (now bfloat16)"),
                                ("--pool", "3", "holds other filler chunks")]:
        fails(base_args(tiny, tmp_path / "d", *common, flag, value), phrase)  # the last of a repeated flag counts
    assert cache.read_bytes() == saved  # refusing touches nothing
    cache.write_bytes(b"not a safetensors file")
    fails(base_args(tiny, tmp_path / "e", *common), "is not a readable pool")


def test_two_processes_equal_one_with_twice_the_accumulation(tiny, tmp_path):
    common = base_args(tiny, tmp_path / "x", "--steps", "3", "--dtype", "float32", "--val", "0", "--retrieval", "0.5")
    single = common[:common.index("--out") + 1] + [str(tmp_path / "one")] + common[common.index("--out") + 2:]
    train.main(single + ["--grad_accum", "2"])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train.py"), *common, "--grad_accum", "1"]
    cmd[cmd.index("--out") + 1] = str(tmp_path / "two")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    a, b = load_file(tmp_path / "one" / "adapter.safetensors"), load_file(tmp_path / "two" / "adapter.safetensors")
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5), name


def fails(argv, phrase):
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert isinstance(e.value.code, str) and phrase in e.value.code, e.value.code


def test_bad_inputs(tiny, tmp_path, capsys, monkeypatch):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    fails(base_args(tiny, tmp_path / "o", "--data", str(empty)), "are needed for one training and 2 held-out")
    (tmp_path / "nothing").mkdir()
    fails(base_args(tiny, tmp_path / "o", "--data", str(tmp_path / "nothing")), "holds no .txt/.md/.rst/.jsonl")
    fails(base_args(tiny, tmp_path / "o", "--data", str(tmp_path / "absent.txt")), "does not exist")
    fails(base_args(tiny, tmp_path / "o") + ["--seq", "300"], "must be 64 running tokens plus a whole number")
    bad = tmp_path / "qa.jsonl"
    bad.write_text('{"prompt": "' + "text " * 200 + 'Q?", "response": "A."}\n{oops\n{"answer": 1}\n')
    fails(base_args(tiny, tmp_path / "o", "--data", str(bad), "--on_bad_line", "stop"), f"{bad}:2:")
    train.main(base_args(tiny, tmp_path / "o", "--data", str(bad), "--steps", "1", "--grad_accum", "1", "--val", "0"))
    err = capsys.readouterr().err
    assert f"skipped {bad}:2:" in err and f"skipped {bad}:3:" in err
    fails(base_args(tiny, tmp_path / "o", "--data", str(bad), "--steps", "2", "--val", "0", "--tune", "top",
                    "--resume"), "was trained with another model or config: tune=xattn (now top)")
    fails(base_args(tiny, tmp_path / "fresh", "--resume"), "no checkpoint at")
    fails(base_args(tiny, tmp_path / "o") + ["--chunk", "32", "--seq", "192", "--pool", "4"], "--pool needs --chunk 64")
    fails(base_args(tiny, tmp_path / "o", "--min_chunks", "9", "--max_chunks", "3"), "--min_chunks 9 is more than")
    fails(base_args(tiny, tmp_path / "o", "--pool", "4", "--tune", "all"), "the pool would go stale")
    fails(base_args(tiny, tmp_path / "fresh", "--init", str(tmp_path / "no.safetensors")), "--init")


@pytest.mark.parametrize("flag, value, message", [
    ("--chunk", "0", "--chunk: must be at least 1, not '0'"),
    ("--grad_accum", "0", "--grad_accum: must be at least 1, not '0'"),
    ("--log_every", "0", "--log_every: must be at least 1, not '0'"),
    ("--finest_stride", "0", "--finest_stride: must be at least 1, not '0'"),
    ("--retrieval", "1.5", "--retrieval: must be a fraction from 0 to 1, not '1.5'"),
    ("--lr", "-0.001", "--lr: must be at least 0, not '-0.001'"),
    ("--clip", "0", "--clip: must be positive, not '0'"),
    ("--steps", "ten", "--steps: invalid int value: 'ten'"),
])
def test_bad_numbers_stop_before_anything_loads(flag, value, message, capsys):
    with pytest.raises(SystemExit) as e:
        train.main([flag, value])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_a_running_text_longer_than_the_window_is_warned_about_and_the_dtype_reported(tiny, tmp_path, capsys):
    train.main(base_args(tiny, tmp_path, "--steps", "1", "--grad_accum", "1", "--val", "0") +
               ["--running", "576", "--seq", "640"])  # the tiny model's window: 512
    err = capsys.readouterr().err
    assert "warning: --running 576 is longer than the model's window of 512 tokens" in err
    dtype, why = pick_dtype("auto", "cpu")
    assert f"compute dtype: {str(dtype)[6:]} ({why})" in err
    train.main(base_args(tiny, tmp_path, "--steps", "1", "--grad_accum", "1", "--val", "0", "--dtype", "float32"))
    err = capsys.readouterr().err
    assert "warning" not in err and "compute dtype: float32 (--dtype)" in err


def test_init_starts_from_a_trained_adapter(tiny, tmp_path):
    train.main(base_args(tiny, tmp_path / "a", "--steps", "3", "--grad_accum", "1", "--val", "0"))
    train.main(base_args(tiny, tmp_path / "b", "--steps", "1", "--grad_accum", "1", "--val", "0", "--lr", "0",
                         "--gate_lr", "0", "--finest_stride", "2", "--chunk", "128", "--init",
                         str(tmp_path / "a" / "adapter.safetensors")))
    a, b = load_file(tmp_path / "a" / "adapter.safetensors"), load_file(tmp_path / "b" / "adapter.safetensors")
    assert any(a[n].abs().sum() > 0 for n in a if n.endswith(".gate"))  # trained, so unlike a fresh start
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)  # learning rate 0: kept as loaded
    trees = [json.loads(safe_open(tmp_path / r / "adapter.safetensors", "pt").metadata()["config"]) for r in "ab"]
    assert [(c["finest_stride"], c["chunk_len"]) for c in trees] == [(4, 64), (2, 128)]  # this run's tree, not the
    # one the init was trained with (a curriculum may start with short chunks)


def test_full_disk_keeps_the_previous_checkpoint(tiny, tmp_path, monkeypatch):
    args = base_args(tiny, tmp_path, "--steps", "2", "--grad_accum", "1", "--save_every", "1", "--val", "0")
    real_save, calls = train.save_file, []

    def save_until_full(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) > 2:  # step 1 saves ckpt + adapter; at step 2 the disk is full
            Path(path).write_bytes(b"partial")
            raise OSError(28, "No space left on device")
        return real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(train, "save_file", save_until_full)
    fails(args, "No space left on device); the file there before, if any, is kept")
    assert json.loads((tmp_path / "ckpt.json").read_text())["step"] == 1
    assert load_file(tmp_path / "ckpt.safetensors") and not list(tmp_path.glob("*.tmp"))


def test_a_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny, tmp_path, monkeypatch):
    def run(out, *extra):
        return base_args(tiny, tmp_path / out, "--steps", "3", "--grad_accum", "1", "--save_every", "1", "--val", "0",
                         *extra)

    real, calls = sharedllm.F.cross_entropy, []

    def nan_from_the_third_sample(*args, **kwargs):  # steps 1 and 2 are good, step 3's loss is NaN
        calls.append(1)
        return real(*args, **kwargs) * (float("nan") if len(calls) == 3 else 1)

    monkeypatch.setattr(sharedllm.F, "cross_entropy", nan_from_the_third_sample)
    fails(run("bad"), "loss is nan at step 2; stopped without saving")
    assert json.loads((tmp_path / "bad" / "ckpt.json").read_text())["step"] == 2
    train.main(run("bad", "--resume"))  # the third call was the NaN; from here on the loss is finite again
    train.main(run("ref"))  # uninterrupted
    a, b = (load_file(tmp_path / out / "adapter.safetensors") for out in ("bad", "ref"))
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)  # the kept checkpoint was good
