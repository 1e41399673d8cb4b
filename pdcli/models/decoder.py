"""One decoder-only transformer for the Llama, Qwen2 (q/k/v bias) and Qwen3 (q/k RMSNorm) families.

Module names mirror the HF checkpoints so weights load by name; q/k/v and gate/up are packed.
"""
from __future__ import annotations

import torch
from torch import nn

from pdcli.distributed.tp import get_tp, kv_head_range, shard_range
from pdcli.kernels import ops
from pdcli.models.arch import ModelArch
from pdcli.models.context import get_context
from pdcli.models.layers import Embedding, LMHead, PackedLinear, RMSNorm, RowLinear, SiluAndMul
from pdcli.models.rotary import RotaryEmbedding


class Attention(nn.Module):
    def __init__(self, arch: ModelArch, rotary: RotaryEmbedding):
        super().__init__()
        d, tp = arch.head_dim, get_tp()
        q0, q1 = shard_range(arch.num_attention_heads, tp)  # this rank's heads
        k0, k1 = kv_head_range(arch.num_key_value_heads, tp)
        self.num_heads, self.num_kv_heads, self.head_dim = q1 - q0, k1 - k0, d
        self.scale = d ** -0.5
        self.qkv_proj = PackedLinear(arch.hidden_size, {"q": (q0 * d, q1 * d), "k": (k0 * d, k1 * d),
                                                        "v": (k0 * d, k1 * d)}, bias=arch.attention_bias)
        self.o_proj = RowLinear(arch.num_attention_heads * d, arch.hidden_size, bias=False)
        if arch.qk_norm:
            self.q_norm = RMSNorm(d, arch.rms_norm_eps)
            self.k_norm = RMSNorm(d, arch.rms_norm_eps)
        self.qk_norm = arch.qk_norm
        self.rotary = rotary
        self.k_cache = self.v_cache = torch.empty(0)  # [num_blocks, block_size, Hk, D], set by the runner

    def forward(self, positions: torch.Tensor, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, hidden] -> [T, hidden]; with keep (row indices), every row's K/V is stored but only the kept
        rows attend and come out: [len(keep), hidden]."""
        ctx = get_context()
        norms = (self.q_norm.weight, self.k_norm.weight, self.q_norm.eps) if self.qk_norm else (None, None, 0.0)
        q = ops.qkv_rope_store(self.qkv_proj(x), positions, self.rotary.cos, self.rotary.sin, *norms, self.k_cache,
                               self.v_cache, ctx.slot_mapping, self.num_heads)
        if keep is not None:
            q, ctx = q[keep], ctx.last_layer
        o = ops.attention(q, self.k_cache, self.v_cache, ctx, self.scale)
        return self.o_proj(o.reshape(q.shape[0], self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, arch: ModelArch):
        super().__init__()
        i = arch.intermediate_size
        lo, hi = shard_range(i, get_tp())
        self.gate_up_proj = PackedLinear(arch.hidden_size, {"gate": (lo, hi), "up": (lo, hi)}, bias=False)
        self.down_proj = RowLinear(i, arch.hidden_size, bias=False)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, arch: ModelArch, rotary: RotaryEmbedding):
        super().__init__()
        self.self_attn = Attention(arch, rotary)
        self.mlp = MLP(arch)
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None,
                keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x is the previous layer's output before its residual add (vLLM's convention), so each add
        is fused into the norm that follows it. With keep, only those rows leave the layer."""
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, keep)
        if keep is not None:
            residual = residual[keep]
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class Model(nn.Module):
    def __init__(self, arch: ModelArch, max_model_len: int):
        super().__init__()
        self.rotary = RotaryEmbedding(arch.head_dim, arch.rope_theta, arch.rope_scaling,
                                      max(max_model_len, arch.max_position_embeddings))
        self.embed_tokens = Embedding(arch.vocab_size, arch.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(arch, self.rotary) for _ in range(arch.num_hidden_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Hidden states [T, hidden], or [len(logits_indices), hidden] when the context prunes the last layer."""
        x, residual = self.embed_tokens(input_ids), None
        ctx = get_context()
        keep = ctx.logits_indices if ctx.last_layer is not None else None
        for i, layer in enumerate(self.layers):
            x, residual = layer(positions, x, residual, keep if i == len(self.layers) - 1 else None)
            if ctx.after_layer is not None:
                ctx.after_layer(i)
        return self.norm(x, residual)[0]


class CausalLM(nn.Module):
    packed = {"q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
              "gate_proj": ("gate_up_proj", "gate"), "up_proj": ("gate_up_proj", "up")}

    def __init__(self, arch: ModelArch, max_model_len: int):
        super().__init__()
        self.arch = arch
        self.model = Model(arch, max_model_len)
        self.lm_head = LMHead(arch.hidden_size, arch.vocab_size)
        if arch.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def kv_layers(self) -> list[Attention]:
        return [layer.self_attn for layer in self.model.layers]
