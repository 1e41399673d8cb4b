"""Read a GGUF file (Llama / Qwen2 / Qwen3) into an HF-style config and dequantised HF-named tensors."""
from __future__ import annotations

import os
from typing import Iterator

import numpy as np
import torch

_ARCH = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
          "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def read_config(reader) -> dict:
    arch = _field(reader, "general.architecture")
    if arch not in _ARCH:
        raise ValueError(f"unsupported GGUF architecture {arch!r} (supported: {', '.join(_ARCH)})")
    p = f"{arch}."
    heads = int(_field(reader, p + "attention.head_count"))
    hidden = int(_field(reader, p + "embedding_length"))
    vocab = _field(reader, p + "vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    names = {t.name for t in reader.tensors}
    cfg = {
        "architectures": [_ARCH[arch]],
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, p + "feed_forward_length")),
        "num_hidden_layers": int(_field(reader, p + "block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, p + "attention.head_count_kv", heads)),
        "head_dim": int(_field(reader, p + "attention.key_length", hidden // heads)),
        "rms_norm_eps": float(_field(reader, p + "attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(_field(reader, p + "rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_field(reader, p + "context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
    }
    scaling = _field(reader, p + "rope.scaling.type")
    if scaling and scaling != "none":
        cfg["rope_scaling"] = {"rope_type": scaling, "factor": float(_field(reader, p + "rope.scaling.factor")),
                               "original_max_position_embeddings":
                                   _field(reader, p + "rope.scaling.original_context_length")}
    return cfg


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp interleaves the rotary halves of q/k rows; undo it to get HF's layout
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def iter_weights(reader, cfg: dict) -> Iterator[tuple[str, torch.Tensor]]:
    from gguf.quants import dequantize

    permute = cfg["architectures"][0] == "LlamaForCausalLM"
    for t in reader.tensors:
        w = dequantize(t.data, t.tensor_type)
        parts = t.name.split(".")
        if parts[0] == "token_embd":
            name = "model.embed_tokens." + parts[-1]
        elif parts[0] == "output_norm":
            name = "model.norm." + parts[-1]
        elif parts[0] == "output":
            name = "lm_head." + parts[-1]
        elif parts[0] == "blk" and parts[2] in _NAMES:
            name = f"model.layers.{parts[1]}.{_NAMES[parts[2]]}.{parts[-1]}"
            if permute and parts[2] == "attn_q":
                w = _unpermute(w, cfg["num_attention_heads"])
            elif permute and parts[2] == "attn_k":
                w = _unpermute(w, cfg["num_key_value_heads"])
        else:
            continue
        yield name, torch.from_numpy(np.array(w, copy=True))


def convert_gguf(path: str) -> str:
    """Dequantise a GGUF file once into an HF checkpoint directory under the pdcli cache; return it.

    Parsing a GGUF's vocabulary takes seconds, so later loads read the converted directory.
    """
    import hashlib
    import json
    import shutil
    import tempfile

    from pdcli import envs

    st = os.stat(path)
    key = hashlib.sha256(f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}:v1".encode()).hexdigest()[:16]
    out = os.path.join(envs.cache_dir(), "gguf", f"{os.path.basename(path)[:-5]}-{key}")
    if os.path.isfile(os.path.join(out, "model.safetensors")):
        return out
    from gguf import GGUFReader
    from safetensors.torch import save_file
    from transformers import AutoTokenizer
    reader = GGUFReader(path)
    cfg = read_config(reader)
    tok = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path))
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(out))
    try:
        tok.save_pretrained(tmp)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg, f, indent=1)
        save_file(dict(iter_weights(reader, cfg)), os.path.join(tmp, "model.safetensors"))
        os.replace(tmp, out)
    except OSError:
        if not os.path.isfile(os.path.join(out, "model.safetensors")):  # not a lost race with another process
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
