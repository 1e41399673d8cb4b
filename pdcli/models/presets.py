"""`dummy:<preset>`: HF-style configs in real shapes, loaded with random weights (vLLM's load_format=dummy)."""
from __future__ import annotations

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}


def _cfg(arch: str, **kw) -> dict:
    return {"architectures": [arch], **kw}


PRESETS: dict[str, dict] = {
    "llama3-8b": _cfg("LlamaForCausalLM", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5,
                      rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE, max_position_embeddings=131072,
                      tie_word_embeddings=False, torch_dtype="bfloat16", bos_token_id=128000,
                      eos_token_id=[128001, 128008, 128009]),
    "qwen3-8b": _cfg("Qwen3ForCausalLM", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                     num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=40960,
                     tie_word_embeddings=False, torch_dtype="bfloat16", eos_token_id=151645),
    "qwen3-0.6b": _cfg("Qwen3ForCausalLM", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                       num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                       rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=40960,
                       tie_word_embeddings=True, torch_dtype="bfloat16", eos_token_id=151645),
    "qwen2-1.5b": _cfg("Qwen2ForCausalLM", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                       num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, rms_norm_eps=1e-6,
                       rope_theta=1000000.0, max_position_embeddings=32768, tie_word_embeddings=True,
                       torch_dtype="bfloat16", eos_token_id=151645),
    "tiny-llama": _cfg("LlamaForCausalLM", vocab_size=512, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                       rope_theta=10000.0, max_position_embeddings=2048, tie_word_embeddings=False,
                       eos_token_id=2),
    "tiny-qwen2": _cfg("Qwen2ForCausalLM", vocab_size=512, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                       rope_theta=10000.0, max_position_embeddings=2048, tie_word_embeddings=True,
                       eos_token_id=2),
    "tiny-qwen3": _cfg("Qwen3ForCausalLM", vocab_size=512, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                       rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=2048,
                       tie_word_embeddings=False, eos_token_id=2),
}
