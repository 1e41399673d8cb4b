"""How the router chooses a path for a request, counting the others: with SLOs, the path with the fewest
expected SLO misses among this request and the requests already decoding where its work would land (a
decode slot in a batch, a prompt's prefill work on a GPU); near-ties go to the least total added latency (its
own end-to-end and what it adds to the others' tokens), which without SLOs decides alone.
Guardrails: no handoff when both paths are saturated; a path left unused gets a request now and then, so
its correction stays fresh."""
from __future__ import annotations

import math
from dataclasses import dataclass

from pdcli.router import latency
from pdcli.router.cost_model import CostModel
from pdcli.router.load import WorkerLoad

MISS_SPREAD = 0.15  # a prediction's log-spread around the outcome (replayed median errors: 5-15%)
TIE = 0.02  # expected misses this close: the least total added latency decides
EXPLORE_EVERY = 50  # a path not taken in this many decisions gets the next one: >= 1% of any 100 or more requests
# in a row (at 100, a simulated 30 s of 17 req/s held 5 handoffs in 510, 0.98%)
SATURATED_RHO = 0.85  # a GPU whose prefill work takes this share of its time has no room for more


@dataclass(frozen=True)
class Slo:
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    ttft_per_token_ms: float = 0.0  # the TTFT SLO grows with the prompt

    @property
    def any(self) -> bool:
        return self.ttft_ms is not None or self.tpot_ms is not None

    def ttft_limit(self, prompt_len: int) -> float | None:
        return None if self.ttft_ms is None else self.ttft_ms + self.ttft_per_token_ms * prompt_len


def miss_probability(predicted: float, limit: float | None) -> float:
    """P(outcome > limit) for an outcome log-normally spread around the prediction."""
    if limit is None:
        return 0.0
    if predicted <= 0:
        return 0.0
    z = math.log(predicted / limit) / MISS_SPREAD
    return 0.5 * math.erfc(-z / math.sqrt(2))


@dataclass
class Landing:
    """What a path puts on one decode-capable worker: a decode slot for this request, its prompt's prefill
    work (on the worker itself or beside it on its GPU), a new decode batch beside it on its GPU."""
    load: WorkerLoad
    adds_decode: bool
    prefill_ms: float  # GPU work of the prompt landing among this worker's decode steps
    extends_neighbour: float = 0.0  # tokens by which this request keeps a decode batch going on another worker
    # of its GPU (MPS) beyond when it would drain: this worker's steps slow as with one more busy neighbour


def others_cost(cm: CostModel, landings: list[Landing], slo: Slo, out_len: float) -> tuple[float, float]:
    """(expected extra TPOT misses, added ms) among the requests decoding on the landing workers."""
    misses = added = 0.0
    for x in landings:
        w = x.load
        if w.decode_batch <= 0:
            continue
        before = latency.step_ms(cm, w)
        bigger = WorkerLoad(**{**w.__dict__, "decode_batch": w.decode_batch + 1,
                               "decode_ctx": w.decode_ctx + w.decode_ctx // w.decode_batch}) if x.adds_decode else w
        remaining = max((w.mean_output_len or out_len) / 2, 1.0)  # their tokens to come, on average
        after = latency.step_ms(cm, bigger) + x.prefill_ms / remaining
        if x.extends_neighbour:  # over the part of their life the other batch runs on because of this request
            overlap = min(1.0, x.extends_neighbour / remaining)
            e = cm.decode_neighbour_extra  # one more decoding neighbour: (1 + e (k + 1)) / (1 + e k)
            after *= 1 + overlap * e / (1 + e * w.sharing)
        misses += w.decode_batch * (miss_probability(after, slo.tpot_ms) - miss_probability(before, slo.tpot_ms))
        added += w.decode_batch * remaining * (after - before)
    return misses, added


def extension_tokens(w: WorkerLoad, out_len: float) -> float:
    """How many of a new request's tokens keep worker w decoding past when its batch would drain: its last
    sequence ends after ~B / (B + 1) of a mean output (the largest of B uniform remainders)."""
    mean_out = w.mean_output_len or out_len
    return max(0.0, out_len - mean_out * w.decode_batch / (w.decode_batch + 1))


def own_miss(pred: dict, slo: Slo, prompt_len: int) -> float:
    ttft = miss_probability(pred["ttft_ms"] + pred.get("transfer_ms", 0.0), slo.ttft_limit(prompt_len))
    return 1 - (1 - ttft) * (1 - miss_probability(pred["tpot_ms"], slo.tpot_ms))


def saturated(cm: CostModel, *workers: WorkerLoad) -> bool:
    return any(latency.prefill_share(cm, w) >= SATURATED_RHO for w in workers)


class PathChooser:
    """The choice among predicted paths, with the guardrails' memory (decisions since each path was taken)."""

    def __init__(self):
        self.since_taken: dict[str, int] = {}

    def choose(self, scores: dict[str, tuple], feasible: list[str]) -> tuple[str, str]:
        """scores: path -> (score to minimise, tie-break); feasible: the paths not ruled out by saturation.
        Returns (path, decided_by)."""
        stale = [p for p in feasible if self.since_taken.get(p, 0) >= EXPLORE_EVERY - 1]
        if stale and len(scores) > 1:
            path, why = stale[0], "exploration"
        else:
            pool = feasible or list(scores)
            best = min(scores[p][0] for p in pool)
            path = min((p for p in pool if scores[p][0] <= best + TIE), key=lambda p: scores[p][1])
            why = "cost-model"
        for p in scores:
            self.since_taken[p] = 0 if p == path else self.since_taken.get(p, 0) + 1
        return path, why
