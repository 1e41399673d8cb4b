"""Non-negative fitters of the cost model's forms (cost_model.py) to a profile's step timings, in relative terms."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import least_squares, lsq_linear

from pdcli.router.cost_model import mixed_form, prefill_form


@dataclass
class Fit:
    params: list[float]
    r2: float
    max_rel_err: float
    num_points: int

    @classmethod
    def of(cls, params, y, pred) -> "Fit":
        y, pred = np.asarray(y, float), np.asarray(pred, float)
        ss_res = float(((y - pred) ** 2).sum())
        ss_tot = float(((y - y.mean()) ** 2).sum()) or 1e-30
        return cls(list(map(float, params)), 1 - ss_res / ss_tot,
                   float(np.max(np.abs(pred - y) / np.maximum(y, 1e-9))), len(y))

    def to_dict(self) -> dict:
        return dict(params=list(map(float, self.params)), r2=float(self.r2), max_rel_err=float(self.max_rel_err),
                    num_points=int(self.num_points))


def fit_linear(x: np.ndarray, y: np.ndarray) -> Fit:
    """Non-negative least squares in relative terms (each point weighted by 1 / y), so short and long
    steps count alike; every parameter is a time or a cost and cannot be negative."""
    y = np.asarray(y, float)
    w = 1.0 / np.maximum(y, 1e-9)
    sol = lsq_linear(x * w[:, None], y * w, bounds=(0, np.inf))
    return Fit.of(sol.x, y, x @ sol.x)


def fit_prefill(n, c, y) -> Fit:
    """prefill_form by relative least squares, non-negative, in two stages: the floor, fixed cost, per-token and
    self-attention rates from the steps without a cached prefix, then the prefix-attention rate from what a prefix
    adds. Fitted all at once, the paged kernel's latency on a few new tokens after a long prefix (one H100: 16
    tokens after 16k took 26 ms, 9 without) raised the fixed cost and lowered the per-token rate below what the GPU
    can do (0.0133 ms per token of an 8B model: 1.2 PFLOP/s), and a step of eight 1k prompts was priced at 2/3 of
    its time. Too few steps without a prefix: all at once."""
    n, c, y = np.asarray(n, float), np.asarray(c, float), np.asarray(y, float)
    own = c == 0
    if own.sum() < 4 or len(np.unique(n[own])) < 3:
        params = _fit_prefill_joint(n, c, y)
        return Fit.of(params, y, prefill_form(params, n, c))
    p0, a0, a1, _, a3 = _fit_prefill_joint(n[own], c[own], y[own], prefix=False)
    res = least_squares(lambda q: (prefill_form([p0, a0, a1, q[0] * 1e-6, a3], n[~own], c[~own]) - y[~own]) / y[~own],
                        [1.0], bounds=(0, np.inf))
    params = [p0, a0, a1, float(res.x[0]) * 1e-6, a3]
    return Fit.of(params, y, prefill_form(params, n, c))


def _fit_prefill_joint(n, c, y, prefix: bool = True) -> list[float]:
    """[p0, a0, a1, a2, a3] of prefill_form (a2 = 0 without prefix), started from the linear fit of the points above
    the floor."""
    cols = [np.ones(len(y)), n, n * c, n * n / 2]
    x = np.stack(cols if prefix else [cols[0], cols[1], cols[3]], axis=1)
    above = y > 1.5 * y.min()
    lin = list((fit_linear(x[above], y[above]) if above.sum() >= 4 else fit_linear(x, y)).params)
    if not prefix:
        lin.insert(2, 0.0)
    p_init = np.array([y.min(), *lin]) + 1e-12
    scale = np.maximum(np.abs(p_init), 1e-12)
    free = np.ones(5, bool) if prefix else np.array([1, 1, 1, 0, 1], bool)

    def form(q):
        p = p_init.copy()
        p[free] = q * scale[free]
        return p

    res = least_squares(lambda q: (prefill_form(form(q), n, c) - y) / y, p_init[free] / scale[free],
                        bounds=(0, np.inf))
    return [float(v) for v in form(res.x)]


def fit_mixed(dec_marginal, pre_marginal, y) -> Fit:
    """mixed_form by relative least squares, non-negative, started from the sum form's linear fit. The floor
    matters: on one H100 a chunk of 1024 tokens beside 4 decodes took 25.5 ms, of 4096 108 ms, of 64 8.1 ms; summed
    (no floor), the 64-token steps pulled m0 up and kp down, and the 1024-token ones came out 14% high."""
    dec_marginal, pre_marginal, y = (np.asarray(v, float) for v in (dec_marginal, pre_marginal, y))
    lin = fit_linear(np.stack([np.ones_like(y), dec_marginal, pre_marginal], -1), y)
    p_init = np.array([*lin.params, 0.5 * y.min()]) + 1e-12
    scale = np.maximum(np.abs(p_init), 1e-12)
    res = least_squares(lambda q: (mixed_form(q * scale, dec_marginal, pre_marginal) - y) / y, p_init / scale,
                        bounds=(0, np.inf))
    params = res.x * scale
    return Fit.of(params, y, mixed_form(params, dec_marginal, pre_marginal))
