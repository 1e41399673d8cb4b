"""Routing policies: which path (collocated or disaggregated) a request takes."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RouteInput:
    num_prompt_tokens: int
    params: object
    prefill_queue: int  # requests at the least-loaded prefill worker, not yet prefilled
    collocated_load: int  # requests at the least-loaded collocated worker


class Policy:
    name = "base"

    def choose(self, r: RouteInput) -> str:
        raise NotImplementedError


class Collocated(Policy):
    name = "collocated"

    def choose(self, r: RouteInput) -> str:
        return "collocated"


class Disaggregated(Policy):
    name = "disaggregated"

    def choose(self, r: RouteInput) -> str:
        return "disaggregated"


class Threshold(Policy):
    """Dynamo's rule: prefill remotely iff the prompt is longer than 1000 tokens and the prefill queue is
    shorter than 2 (the production baseline the cost model has to beat)."""
    name = "threshold"

    def __init__(self, max_local_prefill_length: int = 1000, max_prefill_queue_size: int = 2):
        self.max_local, self.max_queue = max_local_prefill_length, max_prefill_queue_size

    def choose(self, r: RouteInput) -> str:
        remote = r.num_prompt_tokens > self.max_local and r.prefill_queue < self.max_queue
        return "disaggregated" if remote else "collocated"


class ThresholdFallback(Threshold):
    """Mode "adaptive" without a fitted cost model: the threshold rule, and the decision log says so
    (`decided_by`). With a params.json (`params_dir`) the coordinator routes with the cost model instead
    (coordinator/routing.py)."""
    name = "adaptive"
    decided_by = "threshold-fallback"


def make_policy(mode: str) -> Policy:
    if mode == "collocated":
        return Collocated()
    if mode == "disaggregated":
        return Disaggregated()
    if mode == "threshold":
        return Threshold()
    if mode == "adaptive":
        return ThresholdFallback()
    raise ValueError(f"unknown mode {mode!r}: use collocated, disaggregated, adaptive or threshold")
