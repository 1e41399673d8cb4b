"""Batched sampling on the device with counter-based noise.

Each sampled token draws its randomness from a hash of (request seed, completion index, position,
vocab id), so a seeded request gets the same tokens whatever else is in the batch, on CPU or GPU,
and no per-request generator or host sync is needed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from pdcli.kernels.ops import argmax

if TYPE_CHECKING:
    from pdcli.engine.logits_processors import LogitsProcessors

_M32 = 0xFFFFFFFF


def mix32(x):
    """lowbias32 integer hash; works on Python ints and int64 tensors holding values < 2**32."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def sample_key(seed: int, index: int, position: int) -> int:
    return mix32(mix32(mix32(mix32(seed & _M32) ^ ((seed >> 32) & _M32)) ^ (index & _M32)) ^ (position & _M32))


@dataclass
class SamplingTensors:
    temperatures: torch.Tensor  # [N] fp32, 0 = greedy
    top_k: torch.Tensor  # [N] int64, vocab size = off
    top_p: torch.Tensor  # [N] fp32
    min_p: torch.Tensor  # [N] fp32
    keys: torch.Tensor  # [N] int64 < 2**32, from sample_key
    all_greedy: bool
    any_top_k: bool
    any_top_p: bool
    any_min_p: bool
    processors: "LogitsProcessors | None" = None  # penalties, logit_bias, min_tokens, a grammar's mask
    num_logprobs: int = -1  # top alternatives to return per row (the most any row asked); -1: no logprobs


@dataclass
class LogprobsTensors:
    sampled: torch.Tensor  # [N] fp32, the sampled token's log-probability
    top_ids: torch.Tensor  # [N, k] int64, best first
    top_logprobs: torch.Tensor  # [N, k] fp32


@dataclass
class SamplerOutput:
    sampled_token_ids: torch.Tensor  # [N] int64
    logprobs: LogprobsTensors | None = None


class Sampler:
    def __init__(self, vocab_size: int, device: torch.device):
        self.vocab_hash = mix32(torch.arange(vocab_size, dtype=torch.int64, device=device) + 0x9E3779B9)

    def __call__(self, logits: torch.Tensor, t: SamplingTensors | None) -> torch.Tensor:
        # logits [N, V] -> token ids [N] int64; t None: all rows greedy
        return self.forward(logits, t).sampled_token_ids

    def forward(self, logits: torch.Tensor, t: SamplingTensors | None) -> SamplerOutput:
        """Processors (in place on an fp32 copy), log-probabilities of the processed logits, then sampling."""
        if t is None:
            return SamplerOutput(argmax(logits))
        if t.processors is not None:
            logits = logits.to(torch.float32, copy=True)
            t.processors.apply(logits)
        logprobs = logits.float().log_softmax(dim=-1) if t.num_logprobs >= 0 else None
        tokens = self.sample(logits, t)
        if t.processors is not None:
            t.processors.record(tokens)
        if logprobs is None:
            return SamplerOutput(tokens)
        top_lp, top_ids = logprobs.topk(t.num_logprobs, dim=-1)
        return SamplerOutput(tokens, LogprobsTensors(logprobs.gather(1, tokens[:, None])[:, 0], top_ids, top_lp))

    def sample(self, logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
        if t.all_greedy:
            return argmax(logits)
        logits = logits.float()
        greedy = argmax(logits)
        logits = logits / t.temperatures.clamp_min(1e-5)[:, None]
        if t.any_top_k or t.any_top_p:
            logits = self._top_k_top_p(logits, t)
        if t.any_min_p:
            probs = logits.softmax(dim=-1)
            logits = logits.masked_fill(probs < t.min_p[:, None] * probs.amax(dim=-1, keepdim=True), float("-inf"))
        h = mix32(t.keys[:, None] ^ self.vocab_hash[None, : logits.shape[1]])
        u = ((h >> 9).float() + 0.5) * (1.0 / 8388608.0)  # uniform in (0, 1): 23 bits + 0.5 are exact in fp32
        sampled = argmax(logits - torch.log(-torch.log(u)))  # Gumbel-max
        return torch.where(t.temperatures == 0, greedy, sampled)

    @staticmethod
    def _top_k_top_p(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        ranks = torch.arange(logits.shape[1], device=logits.device)[None]
        drop = ranks >= t.top_k[:, None]
        if t.any_top_p:
            probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
            drop |= (probs.cumsum(dim=-1) - probs) > t.top_p[:, None]
        drop[:, 0] = False
        return logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
