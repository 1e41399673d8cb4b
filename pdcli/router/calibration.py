"""Online calibration of the cost model by the requests it routed: per (metric, role of the worker that ran
that phase), the recent residuals of the predictions, so the router corrects what the profile could not see
(the worker loop, pipes, this run's own mix) and follows drift. O(window) per refresh.

Keyed by the worker's role, not the path: TTFT is a prefill worker's or a collocated worker's, TPOT a
decode worker's or a collocated worker's. Where collocated workers also prefill and decode for each other,
both paths then share one correction, and the path routed under heavier load does not look worse for it.

TTFT is corrected by an offset in ms (measured - predicted): what the model misses there is mostly a fixed
cost per request (the trip through the coordinator and the pipes: +5 ms at the median on one H200, where the
model's prompt step is 8 ms and a long prompt's 300 ms), which a ratio would spread over long prompts. TPOT is
corrected by a ratio (log(measured / predicted)): its misses scale with the step. Both keep their residuals per
prompt length class too (classes a factor 4 apart), each class's correction shrunk toward its role's. TTFT: a long
prompt's offset is not a short one's (on one H100 a prefill worker's first long prompts, +10-30 ms, set the
offset of the 256-token prompts after them to +15 ms on a 22 ms prediction for ~20 s: with the offsets per class
and the joiners at their typical length (latency.joining_ms) that run's median TTFT error went from 25.8% to 18.9%,
results/router_nvidia-h100-80gb-hbm3.json, before at commit 32328c8). TPOT: on one
H200, bimodal's 8k-12k prompts decode at 0.95-1.41x their raw prediction (`long_tpot_over_raw` in
results/router_nvidia-h200.json) while the short ones' ratio follows the long prefills they met (`tpot_hindsight`),
and one correction fits neither. The correction is the median of the last 256 residuals weighted by their
age (a median, since the residuals are skewed: a few requests meet a burst of long prompts, most do not; a long
window, since recent residuals mostly repeat the load's passing swings: in the simulator, where the model is
exact, a 64-residual window with recency weights took the median TPOT error at 20 req/s from 12% to 17%),
shrunk toward 0 (a class's: toward its role's) by the prior's pseudo-observations: with no observations the
cost model as fitted. TPOT's prior weighs 64 observations, TTFT's 4: once the balanced decode split took the model's
miss on bimodal steps away (simulated / measured TPOT within 1.5% per request, one H100), TPOT's residuals were the
loads met after the price, and the correction chased them; replaying 128 bins of nine committed sweeps (H100, H200,
2x H100), 64 took the median TPOT error from 19.9% to 18.5% with no more bins outside 35-65% below (0.19 vs 0.20;
256 and up: 17.3-17.5% but 28-34% of bins biased; results/router/calibration_prior.json). Observations also fade with time (half-life 20 s): a path
that gets no traffic returns to the fitted model's price."""
from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass

METRICS = ("ttft_ms", "tpot_ms")
ADDITIVE = ("ttft_ms",)  # corrected by an offset in ms; the others by a ratio
BY_LENGTH = ("ttft_ms", "tpot_ms")  # corrected per prompt length class, shrunk toward the role's correction


def length_class(prompt_len: int) -> int:
    """Prompts within a factor 4 of each other share a class: <1k, <4k, <16k, ... tokens."""
    return max(0, (max(1, prompt_len).bit_length() - 9) // 2)


@dataclass(frozen=True)
class CalibrationConfig:
    prior_weight: float = 4.0  # TTFT's offsets: pseudo-observations at 0 (the fitted model is believed at first)
    ratio_prior_weight: float = 64.0  # TPOT's ratios: their residuals are mostly the load met after the price
    window: int = 256  # residuals kept per (role, metric)
    max_abs_log_ratio: float = math.log(10.0)  # a ratio residual is clipped to this
    half_life_s: float = 20.0  # without traffic, what was learnt halves in this long
    min_fraction: float = 0.5  # an offset never takes a TTFT below this fraction of its prediction
    refresh_s: float = 0.5  # a correction is recomputed after a new residual or this long


class LatencyCalibration:
    def __init__(self, config: CalibrationConfig = CalibrationConfig(), clock=time.monotonic):
        """clock: seconds now (a replay sets its own)."""
        self.config, self.clock = config, clock
        # (role, metric) and, for TPOT, (role, metric, length class) -> (clock s, residual), newest last
        self.residuals: dict[tuple, deque] = {}
        self._cached: dict[tuple, tuple[float, float]] = {}  # the same keys -> (when, correction)

    def correction(self, role: str, metric: str, prompt_len: int | None = None) -> float:
        """The offset in ms (TTFT) or the log ratio (TPOT) now applied to role's predictions of metric (for a
        prompt of prompt_len: its length class's residuals, shrunk toward the role's)."""
        now = self.clock()
        key = (role, metric) if prompt_len is None else (role, metric, length_class(prompt_len))
        hit = self._cached.get(key)
        if hit is not None and 0 <= now - hit[0] < self.config.refresh_s:
            return hit[1]
        prior = 0.0 if prompt_len is None else self.correction(role, metric)
        v = self._compute(key, now, prior)
        self._cached[key] = (now, v)
        return v

    def _compute(self, key: tuple, now: float, prior: float) -> float:
        q = self.residuals.get(key)
        if not q:
            return prior
        c = self.config
        fresh = [0.5 ** (max(0.0, now - t) / c.half_life_s) for t, _ in q]
        half, acc = sum(fresh) / 2, 0.0
        for i in sorted(range(len(q)), key=lambda i: q[i][1]):
            acc += fresh[i]
            if acc >= half:
                break
        w = c.prior_weight if key[1] in ADDITIVE else c.ratio_prior_weight
        return (q[i][1] * 2 * half + prior * w) / (2 * half + w)

    def factor(self, role: str, metric: str) -> float:
        """TPOT's correction as a factor on its prediction."""
        return math.exp(self.correction(role, metric))

    def apply(self, roles: dict, predicted: dict, out_len: float, prompt_len: int | None = None) -> dict:
        """A copy of one path's predictions (ms), corrected, with e2e_ms recomputed from the corrected parts.
        roles: metric -> role of the worker that runs that phase."""
        out = dict(predicted)
        for m in METRICS:
            if m not in out:
                continue
            v = self.correction(roles[m], m, prompt_len if m in BY_LENGTH else None)
            out[m] = max(self.config.min_fraction * out[m], out[m] + v) if m in ADDITIVE else out[m] * math.exp(v)
        if "e2e_ms" in out:
            out["e2e_ms"] = out["ttft_ms"] + out.get("transfer_ms", 0.0) + max(out_len - 1, 0) * out["tpot_ms"]
        return out

    def observe(self, roles: dict, predicted: dict, measured: dict, prompt_len: int | None = None) -> None:
        """predicted: the uncorrected predictions made at routing; measured: the outcome, same keys."""
        c = self.config
        for m in METRICS:
            p, y = predicted.get(m), measured.get(m)
            if not p or not y or p <= 0 or y <= 0:
                continue
            r = y - p if m in ADDITIVE else max(-c.max_abs_log_ratio, min(c.max_abs_log_ratio, math.log(y / p)))
            keys = [(roles[m], m)] + ([(roles[m], m, length_class(prompt_len))]
                                      if prompt_len is not None and m in BY_LENGTH else [])
            for key in keys:
                self.residuals.setdefault(key, deque(maxlen=c.window)).append((self.clock(), r))
                self._cached.pop(key, None)
