"""Per-op rooflines of a decoder's steps: each op's own bound, max(bytes / copy bandwidth, FLOPs / matmul rate),
summed over the step's ops (a bytes-only floor misses the GEMMs' FLOPs at large batches); the offline
throughput bound at the batch the KV pool holds, for the decode alone and for a whole run (its prefill too)."""
from __future__ import annotations

from pdcli.models.arch import ModelArch


def _linear(name: str, rows: int, n_in: int, n_out: int, b: int) -> dict:
    return dict(name=name, bytes=(n_in * n_out + rows * (n_in + n_out)) * b, flops=2 * rows * n_in * n_out)


def decode_step_ops(arch: ModelArch, batch: int, context: int, dtype_bytes: int = 2) -> list[dict]:
    """The ops of one decode step of `batch` sequences at `context` tokens: name, bytes, FLOPs (all layers)."""
    a, b, n = arch, dtype_bytes, batch
    h, d, hq, hk, i = a.hidden_size, a.head_dim, a.num_attention_heads, a.num_key_value_heads, a.intermediate_size
    per_layer = [
        _linear("qkv", n, h, (hq + 2 * hk) * d, b),
        dict(name="attention", bytes=n * (context * 2 * hk * d + 2 * hq * d) * b, flops=4 * n * context * hq * d),
        _linear("o", n, hq * d, h, b),
        _linear("gate_up", n, h, 2 * i, b),
        _linear("down", n, i, h, b),
        dict(name="norms, rope, activation", bytes=n * (6 * h + 3 * i + 2 * (hq + 2 * hk) * d) * b, flops=0),
    ]
    layers = [dict(op, bytes=op["bytes"] * a.num_hidden_layers, flops=op["flops"] * a.num_hidden_layers)
              for op in per_layer]
    return [dict(name="embed", bytes=2 * n * h * b, flops=0), *layers, _linear("lm_head", n, h, a.vocab_size, b)]


def prefill_ops(arch: ModelArch, prompts: int, prompt_len: int, dtype_bytes: int = 2) -> list[dict]:
    """The ops of prefilling `prompts` fresh prompts of prompt_len tokens (all layers; logits of the last rows)."""
    a, b, t = arch, dtype_bytes, prompts * prompt_len
    h, d, hq, hk, i = a.hidden_size, a.head_dim, a.num_attention_heads, a.num_key_value_heads, a.intermediate_size
    causal_pairs = prompts * prompt_len * (prompt_len + 1) / 2
    per_layer = [
        _linear("qkv", t, h, (hq + 2 * hk) * d, b),
        dict(name="attention", bytes=t * 2 * (hq + 2 * hk) * d * b, flops=4 * causal_pairs * hq * d),
        _linear("o", t, hq * d, h, b),
        _linear("gate_up", t, h, 2 * i, b),
        _linear("down", t, i, h, b),
    ]
    layers = [dict(op, bytes=op["bytes"] * a.num_hidden_layers, flops=op["flops"] * a.num_hidden_layers)
              for op in per_layer]
    return [*layers, _linear("lm_head", prompts, h, a.vocab_size, b)]


def roofline_ms(ops: list[dict], copy_bw: float, matmul_rate: float) -> float:
    """Sum over ops of max(bytes / copy_bw, FLOPs / matmul_rate), in ms (bytes/s, FLOP/s)."""
    return sum(max(o["bytes"] / copy_bw, o["flops"] / matmul_rate) for o in ops) * 1e3


def offline_bound_tok_s(arch: ModelArch, num_prompts: int, input_len: int, output_len: int, pool_tokens: int,
                        copy_bw: float, matmul_rate: float, dtype_bytes: int = 2,
                        max_num_seqs: int | None = None) -> tuple[float, int]:
    """Output tokens/s at best for num_prompts x (input_len -> output_len) decoded at the batch the pool (and
    max_num_seqs) holds (each sequence at its mean context), prefill aside; and that batch."""
    batch = max(1, min(num_prompts, pool_tokens // (input_len + output_len), max_num_seqs or num_prompts))
    step = roofline_ms(decode_step_ops(arch, batch, input_len + output_len // 2, dtype_bytes), copy_bw, matmul_rate)
    return batch / step * 1e3, batch


def offline_run_bound_tok_s(arch: ModelArch, num_prompts: int, input_len: int, output_len: int, pool_tokens: int,
                            copy_bw: float, matmul_rate: float, max_num_seqs: int, dtype_bytes: int = 2) -> float:
    """Output tokens/s at best for the whole run: every prompt prefilled at its ops' roofline, then decoded in
    waves of the batch the pool and max_num_seqs hold (equal lengths: a wave's sequences end together, so a
    wave's prefill cannot overlap the one before), each step at the wave's mean context."""
    _, batch = offline_bound_tok_s(arch, num_prompts, input_len, output_len, pool_tokens, copy_bw, matmul_rate,
                                   dtype_bytes, max_num_seqs)
    ms = roofline_ms(prefill_ops(arch, num_prompts, input_len, dtype_bytes), copy_bw, matmul_rate)
    for start in range(0, num_prompts, batch):
        n = min(batch, num_prompts - start)
        step = roofline_ms(decode_step_ops(arch, n, input_len + output_len // 2, dtype_bytes), copy_bw, matmul_rate)
        ms += (output_len - 1) * step  # the first token comes with the prefill
    return num_prompts * output_len / ms * 1e3


def offline_serial_bound_tok_s(arch: ModelArch, num_prompts: int, input_len: int, output_len: int,
                               copy_bw: float, matmul_rate: float, max_num_seqs: int, dtype_bytes: int = 2) -> float:
    """Output tokens/s at best for the whole run under any schedule whose kernels run one at a time (as every
    engine's do), the KV pool unlimited: the prompts' prefill at its ops' roofline; the decode's linears at
    max(all their FLOPs / matmul rate, the fewest steps (max_num_seqs rows each) x weight bytes / copy bandwidth);
    its attention at every generated token's context K/V read once (bytes / copy bandwidth)."""
    ms = roofline_ms(prefill_ops(arch, num_prompts, input_len, dtype_bytes), copy_bw, matmul_rate)
    linear = [o for o in decode_step_ops(arch, 1, 0, dtype_bytes) if o["flops"] > 0]
    weight_bytes, flops_per_token = sum(o["bytes"] for o in linear), sum(o["flops"] for o in linear)
    tokens = num_prompts * (output_len - 1)  # the first token comes with the prefill
    steps = -(-tokens // max_num_seqs)
    ms += max(tokens * flops_per_token / matmul_rate, steps * weight_bytes / copy_bw) * 1e3
    a = arch
    kv_token_bytes = 2 * a.num_key_value_heads * a.head_dim * dtype_bytes * a.num_hidden_layers
    contexts = num_prompts * sum(input_len + j for j in range(1, output_len))
    ms += contexts * kv_token_bytes / copy_bw * 1e3
    return num_prompts * output_len / ms * 1e3

