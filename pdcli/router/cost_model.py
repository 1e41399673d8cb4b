"""Analytical cost model of one engine on one device, fitted to measured profiles.

Forms follow the roofline: a step costs a fixed overhead, plus bytes over bandwidth (weights once per
step, KV per context token), plus FLOPs over the matmul rate (per new token, and attention per
new-token x context-token pair). All times in ms.

  prefill(n, c)     = max(p0, a0 + a1 n + a2 n c + a3 n^2 / 2)   n new tokens after c cached ones; attention to
                      the cached prefix (a2, paged kernel) and among the new tokens (a3) run at their own
                      rates; p0 is the floor of a short eager step (kernel launches)
  decode(B, S)      = d0 + d1 B + d2 S                            B sequences holding S context tokens in all
  mixed(B, S, n, c) = m0 + kd (d1 B + d2 S) + max(mf, kp (a1 n + a2 n c + a3 n^2 / 2))
                                                                  one step carrying decode rows and a prefill chunk:
                                                                  its own fixed cost, the decode rows' marginal cost
                                                                  scaled, the chunk's work scaled but at least mf (the
                                                                  weights are read once whatever the chunk)
  transfer(bytes)   = t0 + bytes / (gb_s * 1e6)

The fitters of these forms are in fitters.py.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np

from pdcli.profile_sharing import SharingShapes


def _scalar(*xs) -> bool:
    return all(isinstance(x, (int, float)) for x in xs)


def marginal(a, n, c):
    """a1 n + a2 n c + a3 n^2 / 2 for a = (a1, a2, a3): plain floats for scalars (the router's hot path, ~100k
    calls a simulated minute), arrays otherwise."""
    if _scalar(n, c):
        return a[0] * n + a[1] * n * c + a[2] * n * n / 2
    return prefill_marginal_features(n, c) @ np.asarray(a, float)


def prefill_marginal_features(n, c) -> np.ndarray:
    """Per-token and attention terms of a prefill of n tokens after c cached ones: [n, n c, n^2 / 2]."""
    n, c = np.asarray(n, float), np.asarray(c, float)
    return np.stack([n, n * c, n * n / 2], axis=-1)


def decode_features(b, s) -> np.ndarray:
    b, s = np.asarray(b, float), np.asarray(s, float)
    return np.stack([np.ones_like(b), b, s], axis=-1)


def prefill_form(params, n, c) -> np.ndarray:
    p0, a0, *a = params
    if _scalar(n, c):
        return max(p0, a0 + marginal(a, n, c))
    return np.maximum(p0, a0 + prefill_marginal_features(n, c) @ np.asarray(a, float))


def mixed_params(params) -> tuple[float, float, float, float]:
    """(m0, kd, kp, mf); params.json files before the floor have three (mf = 0: the sum form)."""
    m0, kd, kp, *rest = params
    return m0, kd, kp, (rest[0] if rest else 0.0)


def mixed_form(params, dec_marginal, pre_marginal) -> np.ndarray:
    """A mixed step from its decode rows' marginal cost (d1 B + d2 S) and its chunk's (a1 n + a2 n c + a3 n^2 / 2)."""
    m0, kd, kp, mf = mixed_params(params)
    return m0 + kd * np.asarray(dec_marginal, float) + np.maximum(mf, kp * np.asarray(pre_marginal, float))


@functools.lru_cache(maxsize=64)
def _step_share(f: float, prefill: tuple, decode: tuple, prefill_neighbour: bool, prefill_own: bool | None = None) -> float:
    """(f - 1) x own step / neighbour's step at the profile's shapes: a decode batch and a prompt (SharingShapes).
    The own step is the other kind than the neighbour's unless prefill_own says."""
    s = SharingShapes()
    dec = float(decode_features(s.batch, s.batch * s.ctx) @ np.asarray(decode))
    pre = float(prefill_form(list(prefill), s.prompt, 0))
    own = (not prefill_neighbour) if prefill_own is None else prefill_own
    return max(0.0, f - 1.0) * (pre if own else dec) / (pre if prefill_neighbour else dec)


def _interp_share(points, ratio: float) -> float:
    """Piecewise linear in log(ratio) through points ([ratio, share], ... sorted by ratio), held at the ends."""
    if ratio <= points[0][0] or len(points) == 1:
        return points[0][1]
    if ratio >= points[-1][0]:
        return points[-1][1]
    x = math.log(ratio)
    for (r0, s0), (r1, s1) in zip(points, points[1:]):
        if ratio <= r1:
            x0, x1 = math.log(r0), math.log(r1)
            return s0 + (s1 - s0) * (x - x0) / (x1 - x0)
    return points[-1][1]


# without a measurement: two decode batches on one GPU each read all the weights (~2x each), and a prefill beside
# a decode batch ran ~1.35x its time alone (one H100: results/bench/h100_sweep_fresh, TTFT of the prefill
# worker 32-36 ms against 24 ms alone)
DECODE_BESIDE_DECODE = 2.0
PREFILL_BESIDE_DECODE = 1.35


# Of a decoding sequence's prefix-cache hit (blocks it shares with the sequences of the same prefix), the share a
# step is priced for where the profile did not measure it (`pdcli profile`'s shared-decode points, fit.shared_read):
# the batch reads shared blocks once per sequence, and they partly stay in the L2. One H100, shared-prefix (8 system
# prompts of 2,048 tokens) at 22-39 req/s: the measured TPOT lay between the step priced at the total context and at
# the unique one (39 req/s: 10.4 ms against 12.1 and 8.0); at 0.5 the replayed raw TPOT came within 3-7% (13.6-34.1%
# at 1.0; 0.4: 4-10%, 0.6: 4-7%), results/router/h100_shared-prefix_s1/NOTE.md.
SHARED_CONTEXT_READ = 0.5


@dataclass
class CostModel:
    prefill: list[float]  # p0, a0, a1, a2, a3
    decode: list[float]  # d0, d1, d2
    interference: list[float]  # m0, kd, kp, mf (mixed steps; mf absent in older params: 0)
    transfer: dict  # pair kind -> (t0 ms, GB/s)
    max_num_batched_tokens: int
    kv_bytes_per_token: int
    # a step beside another worker's decode batch on one device (MPS on a GPU), over its time alone, measured by
    # `pdcli profile` (profile_sharing.py): decode_beside_decode, prefill_beside_decode; absent: the defaults
    sharing: dict = field(default_factory=dict)
    # a prefill worker as it serves (its loop, the handoffs) over its profiled steps: `pdcli fit` from the
    # profile's burst through a real pair (profiler.time_served_prefill); absent: 1
    prefill_worker: dict = field(default_factory=dict)
    # a decode step's time per shared context token over an unshared one's (`pdcli fit` from the profile's
    # shared-decode points); None: unmeasured
    shared_read: float | None = None

    @property
    def shared_context_read(self) -> float:
        return SHARED_CONTEXT_READ if self.shared_read is None else min(1.0, max(0.0, float(self.shared_read)))

    @property
    def prefill_role_scale(self) -> float:
        return min(5.0, max(0.5, float(self.prefill_worker.get("scale", 1.0))))

    @property
    def decode_neighbour_extra(self) -> float:
        """What each decoding neighbour adds to a decode step, as a fraction of its time alone."""
        return max(0.0, self.sharing.get("decode_beside_decode", DECODE_BESIDE_DECODE) - 1.0)  # noise below 1

    @property
    def decode_beside_prefill_extra(self) -> float | None:
        """What a neighbour's prefill adds to a decode step, as a fraction of its time alone; None unmeasured
        (then a decode step waits for the neighbour's prefill, as under time-slicing)."""
        f = self.sharing.get("decode_beside_prefill")
        return None if f is None else max(0.0, f - 1.0)

    @property
    def beside_prefill_share(self) -> float | None:
        """What a step gains beside a neighbour running prefill steps, as a fraction of the neighbour's step time;
        None unmeasured. Under MPS the two processes' kernels alternate, each of ours waiting for part of one of
        theirs, so the extra grows with the neighbour's step, not ours: from the profiled decode step beside a
        prefill, at the profile's shapes (on one H200 0.47; a decode beside a decode gave 0.54 of the neighbour's
        step). It prices any step beside a neighbour's prefill: a prefill worker's 256-token step (9 ms alone)
        took 100-170 ms beside a collocated worker's 8k-token chunks (233 ms)."""
        return self._step_share("decode_beside_prefill", prefill_neighbour=True)

    @property
    def beside_decode_share(self) -> float | None:
        """What a step carrying a prompt chunk gains beside a neighbour's decode step, as a fraction of that step;
        None unmeasured. The same law as beside_prefill_share, from the profiled prefill beside a decode batch (1.0
        on one H200): a long prompt's steps gain about one decode step each, not a quarter of their own time
        (one H200, 1P1D: 8k-12k prompts came in at 0.82x their price as a factor, 256-token ones at 1.4x)."""
        return self._step_share("prefill_beside_decode", prefill_neighbour=False)

    @property
    def prompt_beside_prefill_share(self) -> float | None:
        """What a step carrying a prompt chunk gains beside a neighbour running prefill steps, as a fraction of the
        neighbour's step: from the profiled prefill beside a prefill where measured (`prefill_beside_prefill`, since
        2026-12-05), else beside_prefill_share (from a decode beside a prefill). One H100, adaptive on bimodal: a
        256-token prompt on the collocated worker beside the prefill worker's long prompt took ~170 ms where the
        decode-derived share priced ~80."""
        share = self._step_share("prefill_beside_prefill", prefill_neighbour=True, prefill_own=True)
        return self.beside_prefill_share if share is None else share

    def prompt_beside_prefill_ms(self, own_ms: float, neighbour_ms: float) -> float | None:
        """What a step carrying a prompt chunk, own_ms alone, gains beside a neighbour's prefill step of
        neighbour_ms (ms); None unmeasured. With the profile's unequal-length grid (`prompt_beside_prefill_points`,
        since 2026-12-05) its share of the neighbour's step is interpolated in log(own / neighbour) and held at the
        ends; else prompt_beside_prefill_share, measured at equal lengths (one H100: x1.91, a share of 0.91, where a
        256-token prompt beside the prefill worker's 8k chunks was priced 265-410 ms and took 180-250)."""
        return self._beside_ms("prompt_beside_prefill_points", self.prompt_beside_prefill_share, own_ms, neighbour_ms)

    def prompt_beside_decode_ms(self, own_ms: float, neighbour_ms: float) -> float | None:
        """What a step carrying a prompt chunk, own_ms alone, gains beside a neighbour's decode step of
        neighbour_ms (ms); None unmeasured. From the profile's grid where measured (`prompt_beside_decode_points`,
        own prompts of 256-4096 tokens beside a decode batch, since 2026-12-05 night), else beside_decode_share,
        measured with one 1024-token prompt (one H100: +1.13 of the decode step, applied to 256-token prompts whose
        first tokens came ~3 ms later than priced on a prefill worker beside the decode worker)."""
        return self._beside_ms("prompt_beside_decode_points", self.beside_decode_share, own_ms, neighbour_ms)

    def decode_beside_prefill_ms(self, own_ms: float, neighbour_ms: float) -> float | None:
        """What a decode step, own_ms alone, gains beside a neighbour's prefill step of neighbour_ms (ms); None
        unmeasured. From the profile's grid where measured (`decode_beside_prefill_points`: one H100, a 7.9 ms
        step gained 0.41 of a 1024-token step and 0.32 of an 8k one), else beside_prefill_share."""
        return self._beside_ms("decode_beside_prefill_points", self.beside_prefill_share, own_ms, neighbour_ms)

    def _beside_ms(self, points: str, share: float | None, own_ms: float, neighbour_ms: float) -> float | None:
        """The profile's grid points under `points` interpolated at own / neighbour, else `share`, of neighbour_ms."""
        pts = self.sharing.get(points)
        if pts:
            share = _interp_share(pts, own_ms / max(neighbour_ms, 1e-9))
        return None if share is None else share * neighbour_ms

    def _step_share(self, factor: str, prefill_neighbour: bool, prefill_own: bool | None = None) -> float | None:
        """A profiled sharing factor (own step beside the neighbour / alone, at the profile's shapes) as a share of
        the neighbour's step; cached on the factor and the fitted steps (the planner asks at every simulated step)."""
        f = self.sharing.get(factor)
        return None if f is None else _step_share(f, tuple(self.prefill), tuple(self.decode), prefill_neighbour,
                                                  prefill_own)

    @property
    def prefill_neighbour_extra(self) -> float:
        """What each decoding neighbour adds to a prefill step, as a fraction of its time alone."""
        return max(0.0, self.sharing.get("prefill_beside_decode", PREFILL_BESIDE_DECODE) - 1.0)

    def prefill_ms(self, n, c=0, attention: bool = True):
        """attention=False leaves out the attention terms (many short sequences rather than one long one)."""
        params = self.prefill if attention else [*self.prefill[:3], 0.0, 0.0]
        return prefill_form(params, n, c)

    def prefill_work_ms(self, n, c=0):
        """What a prompt of n tokens after c cached ones adds to the decode steps it rides on: a mixed step's
        own overhead and its chunk's work (at least the weights' read) beyond a decode step's fixed cost. The decode
        rows' scale (kd) is left at 1: served runs did not show it (on one H100 a 1024-token prompt added 17-19
        ms to the steps, this 19 ms; with kd = 3.9, 23 ms)."""
        m0, _, kp, mf = mixed_params(self.interference)
        return np.maximum(0.0, m0 + np.maximum(mf, kp * marginal(self.prefill[2:], n, c)) - self.decode[0])

    def prefill_work_rate_ms(self, prompts_per_s: float, tokens_per_s: float, sq_tokens_per_s: float) -> float:
        """GPU ms per second of prompts_per_s prompts of tokens_per_s tokens and sq_tokens_per_s squared lengths
        (no cached prefix): prefill_work_ms summed over them, exact when all are on one side of the floor mf, else
        the sum of the means' (a little less)."""
        m0, _, kp, mf = mixed_params(self.interference)
        work = kp * (self.prefill[2] * tokens_per_s + self.prefill[4] * sq_tokens_per_s / 2)
        return max(0.0, (m0 - self.decode[0]) * prompts_per_s + max(mf * prompts_per_s, work))

    def decode_ms(self, b, s):
        if _scalar(b, s):
            d0, d1, d2 = self.decode
            return d0 + d1 * b + d2 * s
        return decode_features(b, s) @ np.asarray(self.decode)

    def mixed_ms(self, b, s, n, c=0, attention: bool = True):
        """A served step of b decode rows holding s context tokens and a chunk of n tokens after c cached ones:
        the decode step plus the chunk's work beyond its fixed cost (prefill_work_ms: kd, the profiled eager
        steps' scale of the decode rows, did not show in served runs)."""
        a = self.prefill[2:] if attention else [self.prefill[2], 0.0, 0.0]
        return self._served_mixed(b, s, marginal(a, n, c))

    def _served_mixed(self, b, s, work):
        m0, _, kp, mf = mixed_params(self.interference)
        if _scalar(b, s, work):
            return self.decode_ms(b, s) + max(0.0, m0 + max(mf, kp * work) - self.decode[0])
        return self.decode_ms(b, s) + np.maximum(0.0, m0 + np.maximum(mf, kp * np.asarray(work, float)) -
                                                 self.decode[0])

    def step_ms(self, decode_batch: int, decode_ctx: int, chunks: list[tuple[int, int]] = ()) -> float:
        """One engine step: decode_batch sequences holding decode_ctx context tokens and prefill chunks (new
        tokens, cached before them); a decode step, a prefill step or a mixed one."""
        if not chunks:
            return float(self.decode_ms(decode_batch, decode_ctx)) if decode_batch else 0.0
        work = sum(float(marginal(self.prefill[2:], n, c)) for n, c in chunks)
        if not decode_batch:
            return max(self.prefill[0], self.prefill[1] + work)
        return float(self._served_mixed(decode_batch, decode_ctx, work))

    def assume_net(self, gbit_s: float | None) -> str | None:
        """Handoffs across nodes ("net") at gbit_s Gbit/s with no start-up cost, where the profile has no
        measured cross-node pair: the assumption in one line (None: nothing assumed)."""
        if "net" in self.transfer or not gbit_s:
            return None
        self.transfer["net"] = (0.0, gbit_s / 8)
        return f"handoffs across nodes priced at {gbit_s:g} Gbit/s (--net-gbps; not profiled)"

    def transfer_ms(self, num_tokens: int, pair: str = "default") -> float:
        t0, gbs = self.transfer.get(pair) or next(iter(self.transfer.values()))
        return t0 + num_tokens * self.kv_bytes_per_token / (gbs * 1e6)

    def queued_prefill_ms(self, num_tokens: int, decode_batch: int = 0, decode_ctx: int = 0,
                          sq_tokens: float = 0.0) -> float:
        """Time to get through queued prompt tokens of other requests in chunks of max_num_batched_tokens, beside
        a running decode batch. sq_tokens: the sum of the queued prompts' squared lengths, for the attention
        within each (0: many short prompts, none counted; one 10k prompt queued is ~30 ms of it on an H200)."""
        if num_tokens <= 0:
            return 0.0
        budget = max(1, self.max_num_batched_tokens - decode_batch)
        full, rest = divmod(num_tokens, budget)
        total = 0.0
        for n, count in ((budget, full), (rest, 1 if rest else 0)):
            if count:
                step = self.mixed_ms(decode_batch, decode_ctx, n, attention=False) if decode_batch else \
                    self.prefill_ms(n, attention=False)
                total += count * float(step)
        kp = mixed_params(self.interference)[2] if decode_batch else 1.0
        return total + kp * self.prefill[4] * sq_tokens / 2

    def prefill_in_decode_ms(self, num_tokens: int, decode_batch: int, decode_ctx: int,
                             sq_tokens: float = 0.0) -> float:
        """What queued prompt tokens add to the decode steps they ride on (mixed steps minus plain decode steps)."""
        if num_tokens <= 0 or decode_batch <= 0:
            return 0.0
        steps = -(-num_tokens // max(1, self.max_num_batched_tokens - decode_batch))
        extra = self.queued_prefill_ms(num_tokens, decode_batch, decode_ctx, sq_tokens) - \
            steps * float(self.decode_ms(decode_batch, decode_ctx))
        return max(0.0, extra)

    def joined_prefill_ms(self, num_tokens: float, decode_batch: int = 0, sq_tokens: float = 0.0) -> float:
        """What prompt tokens add to a step that already carries a chunk (its fixed cost paid): their per-token
        work and the attention within each (sq_tokens: the sum of their squared lengths)."""
        if num_tokens <= 0:
            return 0.0
        kp = mixed_params(self.interference)[2] if decode_batch else 1.0
        return kp * (self.prefill[2] * num_tokens + self.prefill[4] * sq_tokens / 2)

    def chunked_prefill_ms(self, prompt_len: int, decode_batch: int = 0, decode_ctx: int = 0, cached: int = 0) -> float:
        """Time to prefill a prompt in chunks of max_num_batched_tokens beside a running decode batch; its first
        `cached` tokens are in the prefix cache (only their attention is paid)."""
        total, done = 0.0, cached
        budget = max(1, self.max_num_batched_tokens - decode_batch)
        while done < prompt_len:
            n = min(budget, prompt_len - done)
            total += float(self.mixed_ms(decode_batch, decode_ctx, n, done) if decode_batch else self.prefill_ms(n, done))
            done += n
        return total
