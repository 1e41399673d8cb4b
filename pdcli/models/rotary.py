"""Rotary position embeddings (GPT-NeoX half rotation) with the RoPE scalings of HF configs."""
from __future__ import annotations

import math

import torch
from torch import nn


def rope_inv_freq(head_dim: int, base: float, scaling: dict | None, max_pos: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim // 2] (fp32) and the attention factor applied to cos/sin."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "default":
        return inv_freq, 1.0
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv_freq / factor, 1.0
    if kind == "llama3":
        old_len = scaling["original_max_position_embeddings"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":
        old_len = scaling.get("original_max_position_embeddings") or max_pos

        def mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        attn_factor = scaling.get("attention_factor")
        if attn_factor is None:
            m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
            attn_factor = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)

        def correction_dim(rotations: float) -> float:
            return head_dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

        lo, hi = correction_dim(scaling.get("beta_fast") or 32), correction_dim(scaling.get("beta_slow") or 1)
        if scaling.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, head_dim - 1)
        ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - lo) / max(hi - lo, 1e-3)).clamp(0, 1)
        extrapolation = 1 - ramp
        return (inv_freq / factor) * (1 - extrapolation) + inv_freq * extrapolation, float(attn_factor)
    raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: default, linear, llama3, yarn)")


class RotaryEmbedding(nn.Module):
    """cos/sin tables for every position; applied by ops.qkv_rope_store."""

    def __init__(self, head_dim: int, base: float, scaling: dict | None, max_pos: int):
        super().__init__()
        self.args = (head_dim, base, scaling, max_pos)
        # [max_pos, head_dim] each, fp32
        self.register_buffer("cos", torch.empty(max_pos, head_dim, dtype=torch.float32), persistent=False)
        self.register_buffer("sin", torch.empty(max_pos, head_dim, dtype=torch.float32), persistent=False)
        if self.cos.device.type != "meta":
            self.reset()

    def reset(self) -> None:
        head_dim, base, scaling, max_pos = self.args
        inv_freq, attn_factor = rope_inv_freq(head_dim, base, scaling, max_pos)
        freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1).to(self.cos.device)
        self.cos.copy_(emb.cos() * attn_factor)
        self.sin.copy_(emb.sin() * attn_factor)
