"""Analytical cost model of one engine on one device, fitted to measured profiles.

Forms follow the roofline: a step costs a fixed overhead, plus bytes over bandwidth (weights once per
step, KV per context token), plus FLOPs over the matmul rate (per new token, and attention per
new-token x context-token pair). All times in ms.

  prefill(n, c)     = a0 + a1 n + a2 n (c + n / 2)         n new tokens after c cached ones
  decode(B, S)      = d0 + d1 B + d2 S                      B sequences holding S context tokens in all
  mixed(B, S, n, c) = decode(B, S) + k prefill(n, c)        a decode step that also carries a prefill chunk
  transfer(bytes)   = t0 + bytes / (t1 * 1e6)               t1 in bytes per ms / 1e6 (= GB/s)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import lsq_linear


def prefill_features(n, c) -> np.ndarray:
    n, c = np.asarray(n, float), np.asarray(c, float)
    return np.stack([np.ones_like(n), n, n * (c + n / 2)], axis=-1)


def decode_features(b, s) -> np.ndarray:
    b, s = np.asarray(b, float), np.asarray(s, float)
    return np.stack([np.ones_like(b), b, s], axis=-1)


@dataclass
class Fit:
    params: list[float]
    r2: float
    max_rel_err: float
    num_points: int

    def to_dict(self) -> dict:
        return dict(params=list(map(float, self.params)), r2=float(self.r2), max_rel_err=float(self.max_rel_err),
                    num_points=int(self.num_points))


def fit_linear(x: np.ndarray, y: np.ndarray) -> Fit:
    """Non-negative least squares in relative terms (each point weighted by 1 / y), so short and long
    steps count alike; every parameter is a time or a cost and cannot be negative."""
    y = np.asarray(y, float)
    w = 1.0 / np.maximum(y, 1e-9)
    sol = lsq_linear(x * w[:, None], y * w, bounds=(0, np.inf))
    pred = x @ sol.x
    ss_res = float(((y - pred) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum()) or 1e-30
    return Fit(list(sol.x), 1 - ss_res / ss_tot, float(np.max(np.abs(pred - y) / np.maximum(y, 1e-9))), len(y))


@dataclass
class CostModel:
    prefill: list[float]  # a0, a1, a2
    decode: list[float]  # d0, d1, d2
    interference: float  # k
    transfer: dict  # pair kind -> (t0 ms, GB/s)
    max_num_batched_tokens: int
    kv_bytes_per_token: int

    def prefill_ms(self, n, c=0):
        return prefill_features(n, c) @ np.asarray(self.prefill)

    def decode_ms(self, b, s):
        return decode_features(b, s) @ np.asarray(self.decode)

    def mixed_ms(self, b, s, n, c=0):
        return self.decode_ms(b, s) + self.interference * self.prefill_ms(n, c)

    def transfer_ms(self, num_tokens: int, pair: str = "default") -> float:
        t0, gbs = self.transfer.get(pair) or next(iter(self.transfer.values()))
        return t0 + num_tokens * self.kv_bytes_per_token / (gbs * 1e6)

    def queued_prefill_ms(self, num_tokens: int, decode_batch: int = 0, decode_ctx: int = 0) -> float:
        """Time to get through queued prompt tokens of other requests (many short sequences: the
        attention term, quadratic within one sequence, is left out)."""
        if num_tokens <= 0:
            return 0.0
        budget = max(1, self.max_num_batched_tokens - decode_batch)
        chunks = -(-num_tokens // budget)
        a0, a1, _ = self.prefill
        per_chunk = float(self.decode_ms(decode_batch, decode_ctx)) if decode_batch else 0.0
        k = self.interference if decode_batch else 1.0
        return chunks * (per_chunk + k * a0) + k * a1 * num_tokens

    def chunked_prefill_ms(self, prompt_len: int, decode_batch: int = 0, decode_ctx: int = 0) -> float:
        """Time to prefill a prompt in chunks of max_num_batched_tokens beside a running decode batch."""
        total, done = 0.0, 0
        budget = max(1, self.max_num_batched_tokens - decode_batch)
        while done < prompt_len:
            n = min(budget, prompt_len - done)
            total += float(self.mixed_ms(decode_batch, decode_ctx, n, done) if decode_batch else self.prefill_ms(n, done))
            done += n
        return total
