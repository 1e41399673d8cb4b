"""Tiny random models of each family, saved as real HF checkpoints (config, safetensors, tokenizer)."""
from __future__ import annotations

import os

import torch

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

BASE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, max_position_embeddings=1024,
            initializer_range=0.1, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0)

# name -> (transformers config class name, overrides)
VARIANTS = {
    "llama-gqa": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)),
    "llama-mha-tied": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)),
    "llama3-rope": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                      "high_freq_factor": 4.0,
                                                      "original_max_position_embeddings": 32})),
    "qwen2-gqa-tied": ("Qwen2Config", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen2-yarn": ("Qwen2Config", dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False,
                                       rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                     "original_max_position_embeddings": 32})),
    "qwen3-gqa": ("Qwen3Config", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                      tie_word_embeddings=False)),
    "qwen3-gqa64": ("Qwen3Config", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                        tie_word_embeddings=False)),
    "qwen3-mha-tied": ("Qwen3Config", dict(num_attention_heads=4, num_key_value_heads=4, head_dim=16,
                                           tie_word_embeddings=True)),
}


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["The capital of France is Paris.", "Hello world! How are you today?",
              "pdcli serves language models with prefill and decode on separate workers."] * 20
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "<|im_end|>", "<|im_start|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>", pad_token="<pad>",
                                   chat_template=CHAT_TEMPLATE)


def save_tiny_model(name: str, path: str, seed: int = 0) -> str:
    import transformers

    cls_name, overrides = VARIANTS[name]
    config = getattr(transformers, cls_name)(**{**BASE, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def hf_greedy(path: str, prompts: list[list[int]], max_new_tokens: int, device: str = "cpu",
              dtype: torch.dtype = torch.float32) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=dtype, attn_implementation="eager").to(device)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    outs = []
    for p in prompts:
        ids = torch.tensor([p], device=device)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             min_new_tokens=max_new_tokens, do_sample=False)
        outs.append(out[0, len(p):].tolist())
    return outs


def hf_logits(path: str, prompt: list[int], device: str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=dtype, attn_implementation="eager").to(device)
    with torch.no_grad():
        return model(torch.tensor([prompt], device=device)).logits[0].float()


def pdcli_logits(llm, prompt: list[int]) -> torch.Tensor:
    """Logits at every prompt position from pdcli's own model, through the paged cache and one Context."""
    from pdcli.engine.sequence import Sequence
    from pdcli.models.context import set_context
    from pdcli.sampling_params import SamplingParams

    engine = llm.engine
    seq = Sequence("logits", prompt, SamplingParams(), seed=0)
    assert engine.block_manager.allocate(seq, len(prompt))
    runner = engine.runner
    try:
        ctx = runner._context([seq.block_table], [0], [len(prompt)], list(range(len(prompt))))
        set_context(ctx)
        with torch.inference_mode():
            ids = torch.tensor(prompt, device=runner.device)
            hidden = runner.model(ids, torch.arange(len(prompt), device=runner.device))
            return runner.model.compute_logits(hidden).float()
    finally:
        set_context(None)
        engine.block_manager.free_seq(seq)


def pdcli_decode_logits(llm, prompt: list[int], forced: list[int]) -> torch.Tensor:
    """Prefill prompt, then decode the forced tokens one step at a time (the decode path);
    returns the logits of each decode step [len(forced), vocab]."""
    from pdcli.engine.sequence import Sequence
    from pdcli.models.context import set_context
    from pdcli.sampling_params import SamplingParams

    engine, runner = llm.engine, llm.engine.runner
    seq = Sequence("logits", prompt + forced, SamplingParams(), seed=0)
    assert engine.block_manager.allocate(seq, len(seq))
    dev = runner.device
    rows = []
    try:
        with torch.inference_mode():
            n = len(prompt)
            set_context(runner._context([seq.block_table], [0], [n], [n - 1]))
            runner.model(torch.tensor(prompt, device=dev), torch.arange(n, device=dev))
            for i, tok in enumerate(forced):
                pos = n + i
                set_context(runner._context([seq.block_table], [pos], [1], [0]))
                hidden = runner.model(torch.tensor([tok], device=dev), torch.tensor([pos], device=dev))
                rows.append(runner.model.compute_logits(hidden).float()[0])
    finally:
        set_context(None)
        engine.block_manager.free_seq(seq)
    return torch.stack(rows)
