"""eval.py's ppl and passkey commands on a tiny random model with the real tokenizer: they run end to end, and
with the gates at zero the context changes nothing (sharedllm == window, to the last digit)."""
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import pydoc_text, tiny_with_real_tokenizer

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2):
    return tiny_with_real_tokenizer(tmp_path_factory.mktemp("tinyeval") / "m", max_position_embeddings=8192)


def run(*args):
    return subprocess.run([sys.executable, "eval.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_ppl_with_the_gates_at_zero_equals_the_window(tiny, tmp_path):
    text = tmp_path / "prose.txt"
    text.write_text(pydoc_text()[:200_000])
    r = run("ppl", "--model", str(tiny), "--adapter", "none", "--files", str(text), "--lengths", "4096", "8192", "16384",
            "--windows", "2", "--modes", "sharedllm", "window", "full", "other")
    assert r.returncode == 0, r.stderr
    assert "16384: no 'other' row" in r.stderr  # the text is too short for an unrelated context that far
    assert re.search(r"^\| 16384 \| [\d.]+ \| [\d.]+ \|  \|  \|", r.stdout, re.M), r.stdout
    row = r"^\| (\d+)" + r" \| ([\d.]+)" * 4 + r" \| (\d)/2" * 2 + r" \|$"  # 4 modes, sharedllm < window, < other
    rows = re.findall(row, r.stdout, re.M)
    assert [row[0] for row in rows] == ["4096", "8192"], r.stdout
    for T, shared, window, full, other, wins, wins_other in rows:
        assert shared == window == other and wins == wins_other == "0"  # gates at 0: memory adds nothing
        assert float(full) > 0


@pytest.mark.parametrize("held_out", [[], ["--held_out"], ["--held_out", "--task", "lookup", "--facts", "3"]])
def test_passkey_prints_one_row_per_mode_and_length(tiny, held_out):
    r = run("passkey", "--model", str(tiny), "--adapter", "none", "--lengths", "10240", "--depths", "0", "1",
            "--trials", "1", "--modes", "sharedllm", "window", "--running", "2048", *held_out)
    assert r.returncode == 0, r.stderr
    rows = re.findall(r"^\| (\w+) \| 10240 \| \d+% \| \d+% \| \d+% \| (\d+)/(\d+) \|$", r.stdout, re.M)
    assert [row[0] for row in rows] == ["sharedllm", "window"], r.stdout
    assert all(row[2] == "1" for row in rows), r.stdout  # the depth-0 key lies before the running text, depth 1 not
    assert ("lookup (3 named facts) accuracy" in r.stdout) == ("lookup" in held_out), r.stdout


def test_held_out_filler_is_text_training_never_reads(smollm2):
    import eval as bench
    from data import builtin_docs
    tokenizer, corpus = smollm2[1], "\n\n".join(builtin_docs())
    for held_out in (False, True):
        ids = bench.text_tokens(tokenizer, 20_000, held_out)
        pieces = [tokenizer.decode(ids[i:i + 40]) for i in range(0, 20_000, 2_000)]
        assert len(ids) == 20_000 and sum(p in corpus for p in pieces) == (0 if held_out else len(pieces))


def test_speed_prints_one_row_per_length_and_mode(tiny):
    r = run("speed", "--model", str(tiny), "--adapter", "none", "--lengths", "4096", "10240", "--new_tokens", "2",
            "--running", "2048", "--full_max", "4096")
    assert r.returncode == 0, r.stderr
    rows = re.findall(r"^\| (\d+) \| (\w+) \| (\d+) \| (\d+) \|" + r" [\d.]+ \|" * 5 + r" (\d*%?) \| ([\d.]*x?) \|$",
                      r.stdout, re.M)
    assert [(T, mode) for T, mode, *_ in rows] == [("4096", "sharedllm"), ("4096", "window"), ("4096", "full"),
                                                  ("10240", "sharedllm"), ("10240", "window")], r.stdout
    by = {(T, mode): (int(n), int(running), frac, ratio) for T, mode, n, running, frac, ratio in rows}
    assert by[("4096", "sharedllm")][:3] == (0, 4096, "") and by[("4096", "sharedllm")][3].endswith("x")  # fits
    n, running, frac, ratio = by[("10240", "sharedllm")]
    assert (n, running, ratio) == (8, 2048, "") and frac.endswith("%")  # 8 chunks in the tree; no full row at 10K
    assert by[("10240", "window")] == (0, 2048, "", "")  # the same running text, no tree


def test_speed_with_a_question_builds_the_tree_as_generate_does(tiny):
    r = run("speed", "--model", str(tiny), "--adapter", "none", "--lengths", "10240", "--new_tokens", "2",
            "--running", "2048", "--modes", "sharedllm", "--question")
    assert r.returncode == 0, r.stderr
    rows = re.findall(r"^\| 10240 \| sharedllm \| (\d+) of (\d+) \| (\d+) \|", r.stdout, re.M)
    assert len(rows) == 1, r.stdout
    kept, n, running = map(int, rows[0])
    assert kept == 2 < n <= 8 and n * 1024 + running <= 10240 + 64  # a question keeps 2, whatever the policy


def test_paper_keeps_every_chunk_and_the_papers_running_text(tiny):
    r = run("speed", "--model", str(tiny), "--adapter", "none", "--lengths", "10240", "--new_tokens", "2",
            "--modes", "sharedllm", "--question", "--paper")
    assert r.returncode == 0, r.stderr
    kept, n, running = map(int, re.findall(r"^\| 10240 \| sharedllm \| (\d+) of (\d+) \| (\d+) \|", r.stdout, re.M)[0])
    assert kept == n == 5 and 4096 <= running < 4096 + 1024  # every chunk; D = 4,096, as the paper trains


def test_kept_at_text_gives_the_kept_chunks_their_places_in_the_text(tiny):
    import eval as bench
    from load_llama import load_model
    model, tokenizer, _ = load_model(str(tiny), "none")
    seen, encode = [], model.encode_context
    model.encode_context = lambda context, query=None, **kw: seen.append(kw.get("chunk_positions")) or encode(
        context, query, **kw)
    for kept_at, want in ("0..k-1", None), ("text", [list(range(8))]):
        args = bench.parser.parse_args(["passkey", "--lengths", "10240", "--depths", "0", "--trials", "1", "--modes",
                                        "sharedllm", "--running", "2048", "--kept_at", kept_at])
        bench.run_passkey(args, model, tokenizer)
        assert seen[-1] == want  # 8 chunks before the 2048 running tokens, at positions 0..7 either way here


def test_descent_reports_hit_rates_and_attention_mass(tiny):
    r = run("descent", "--model", str(tiny), "--adapter", "none", "--trials", "3", "--mass_trials", "2")
    assert r.returncode == 0, r.stderr
    rows = re.findall(r"^\| (right|cosine|maxsim) \| (\d+)% \|$", r.stdout, re.M)
    assert [row[0] for row in rows] == ["right", "cosine", "maxsim"], r.stdout
    assert "(MaxSim's memory, 2 trials;" in r.stdout
    mass = re.findall(r"^\| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$", r.stdout, re.M)
    assert len(mass) == 1 and all(0 <= float(x) <= 1 for x in mass[0]), r.stdout  # 4 layers and the key's share


@pytest.mark.parametrize("args, message", [
    (["ppl", "--files", "/no/such/file.txt"], "cannot read /no/such/file.txt"),
    (["ppl", "--files", "README.md", "--lengths", "10000000"], "the text has only"),
    (["ppl", "--modes", "sharedllm", "fast"], "--modes: invalid choice: 'fast'"),
    (["passkey", "--modes", "sharedllm", "other"], "--modes: invalid choice: 'other'"),
    (["ppl", "--lengths", "8k"], "--lengths: invalid int value: '8k'"),
    (["ppl", "--lengths", "4096,8192"], "--lengths: invalid int value: '4096,8192'"),  # lists are space-separated
    (["passkey", "--lengths", "8192", "0"], "--lengths: must be at least 1, not '0'"),
    (["passkey", "--depths", "0", "half"], "--depths: invalid float value: 'half'"),
    (["passkey", "--depths", "0", "1.5"], "--depths: a depth is a fraction from 0 to 1, not '1.5'"),
    (["passkey", "--trials", "0"], "--trials: must be at least 1, not '0'"),
    (["passkey", "--running", "0"], "--running: must be at least 1, not '0'"),
    (["passkey", "--task", "lookup", "--facts", "12"], "--facts: a lookup hides 1 to 9 named facts, not '12'"),
])
def test_bad_input(tiny, args, message):
    r = run(*args, "--model", str(tiny), "--adapter", "none")
    assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is not None, reason="matplotlib is installed")
def test_plot_without_matplotlib_stops_before_the_sweep():
    r = run("passkey", "--plot", "heatmap.png", "--model", "/no/such/model")  # the check comes before the model
    assert r.returncode == 1 and "--plot needs matplotlib" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_a_model_that_does_not_load_is_one_clear_line():
    r = run("ppl", "--model", "/no/such/model")
    assert r.returncode == 1 and r.stderr.startswith("error: '/no/such/model' is neither a folder") \
        and "Traceback" not in r.stderr, r.stderr
