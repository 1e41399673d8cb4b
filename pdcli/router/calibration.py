"""Online calibration of the cost model by the requests it routed: per (metric, role of the worker that ran
that phase), a Normal model of r = log(measured / predicted) with exponential forgetting, so the router
corrects what the profile could not see (the worker loop, pipes, this run's own mix) and follows drift.
O(1) per update.

Keyed by the worker's role, not the path: TTFT is a prefill worker's or a collocated worker's, TPOT a
decode worker's or a collocated worker's. Where collocated workers also prefill and decode for each other,
both paths then share one correction, and the path routed under heavier load does not look worse for it.

The router multiplies each prediction by exp(posterior mean of r); with no observations the mean is the
prior's, 0: the cost model as fitted. Observations also fade with time (half-life 20 s): a path that gets
no traffic returns to the fitted model's price."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

METRICS = ("ttft_ms", "tpot_ms")


@dataclass
class LogRatio:
    weight: float  # observations behind `total`, discounted; the prior's pseudo-observations (r = 0) included
    total: float = 0.0  # discounted sum of r
    t: float | None = None  # when it last moved (clock seconds)

    @property
    def mean(self) -> float:
        return self.total / self.weight

    def decay_to(self, t: float, half_life_s: float, prior_weight: float) -> None:
        """Observations lose weight with time, not only with newer ones: without traffic the correction
        returns to the prior (the fitted model), so a path whose correction went stale is priced afresh."""
        if self.t is not None and t > self.t:
            keep = 0.5 ** ((t - self.t) / half_life_s)
            self.total *= keep
            self.weight = prior_weight + (self.weight - prior_weight) * keep
        self.t = t


@dataclass(frozen=True)
class CalibrationConfig:
    prior_weight: float = 4.0  # pseudo-observations at r = 0 (the fitted model is believed at first; they
    # fade like any observation)
    discount: float = 0.97  # each update keeps this much of the past: ~33 requests of memory
    max_abs_log_ratio: float = math.log(10.0)  # one outlier moves the mean by at most this / weight
    half_life_s: float = 20.0  # without traffic, what was learnt halves in this long


class LatencyCalibration:
    def __init__(self, config: CalibrationConfig = CalibrationConfig(), clock=time.monotonic):
        """clock: seconds now (a replay sets its own)."""
        self.config, self.clock = config, clock
        self.stats: dict[tuple[str, str], LogRatio] = {}

    def factor(self, role: str, metric: str) -> float:
        s = self.stats.get((role, metric))
        if s is None:
            return 1.0
        s.decay_to(self.clock(), self.config.half_life_s, self.config.prior_weight)
        return math.exp(s.mean)

    def apply(self, roles: dict, predicted: dict, out_len: float) -> dict:
        """A copy of one path's predictions (ms), corrected, with e2e_ms recomputed from the corrected parts.
        roles: metric -> role of the worker that runs that phase."""
        out = dict(predicted)
        for m in METRICS:
            if m in out:
                out[m] = out[m] * self.factor(roles[m], m)
        if "e2e_ms" in out:
            out["e2e_ms"] = out["ttft_ms"] + out.get("transfer_ms", 0.0) + max(out_len - 1, 0) * out["tpot_ms"]
        return out

    def observe(self, roles: dict, predicted: dict, measured: dict) -> None:
        """predicted: the uncorrected predictions made at routing; measured: the outcome, same keys."""
        c = self.config
        for m in METRICS:
            p, y = predicted.get(m), measured.get(m)
            if not p or not y or p <= 0 or y <= 0:
                continue
            r = max(-c.max_abs_log_ratio, min(c.max_abs_log_ratio, math.log(y / p)))
            s = self.stats.setdefault((roles[m], m), LogRatio(c.prior_weight))
            s.decay_to(self.clock(), c.half_life_s, c.prior_weight)
            s.weight = c.discount * s.weight + 1.0
            s.total = c.discount * s.total + r
