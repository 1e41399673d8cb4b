"""A request as the coordinator tracks it, from submission to its last token."""
from __future__ import annotations

import enum
import queue
import threading
from dataclasses import dataclass, field

from pdcli.sampling_params import SamplingParams


class Stage(str, enum.Enum):
    QUEUED = "queued"  # not routed yet
    COLLOCATED = "collocated"  # on one worker, prefill and decode
    PREFILL = "prefill"  # on its prefill worker; its decode worker reserves blocks meanwhile
    HANDOFF = "handoff"  # prefilled; the KV and the first token are on their way to the decode worker
    DECODE = "decode"  # decoding on the decode worker
    DONE = "done"


@dataclass
class Tracked:
    rid: str
    tag: int  # KV-transfer tag
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    path: str  # collocated | disaggregated
    arrival: float
    prefill_rank: int | None = None  # the worker that runs its prompt (on the collocated path: all of it)
    decode_rank: int | None = None  # the worker it is handed to (disaggregated path)
    stage: Stage = Stage.QUEUED
    tokens: dict = field(default_factory=dict)  # completion index -> token ids
    finish: dict = field(default_factory=dict)  # completion index -> finish reason
    logprobs: dict = field(default_factory=dict)  # completion index -> SampleLogprob per token (when asked)
    error: str | None = None
    dispatch_time: float | None = None  # perf_counter when its prompt was sent to the worker that prefills it
    worker_received: float | None = None  # perf_counter (that worker's: one host) when it took the prompt
    worker_launched: float | None = None  # ... when the launch of a step with its first prompt tokens began there
    worker_landed: float | None = None  # ... when the step with its first token landed there
    first_token_time: float | None = None
    prefilled: int = 0  # prompt tokens its prefilling worker has computed, as its steps report (chunked prefill),
    # from routing on at least what the router's prefix index holds of it there (its worker computes the rest)
    cached_tokens: int = 0  # that part: its prompt's leading tokens in the prefix cache of the worker routed to
    token_times: list = field(default_factory=list)  # arrival time of each token of completion 0
    finish_time: float | None = None
    transfer_bytes: int = 0
    transfer_s: float = 0.0  # device time of the prefill worker's send: all of it, or what the prefill left exposed
    transfer_kind: str = ""  # whole | layers | ipc
    transfer_reported: threading.Event = field(default_factory=threading.Event)  # the prefill worker's KVSent
    ipc_copy_asked: bool = False  # the prefill worker was told to copy into the decode worker's blocks
    decision: dict = field(default_factory=dict)  # the route taken, by which policy, with predicted costs
    prefix_hashes: list | None = None  # its prompt's full blocks' hashes (prefix-aware routing), once computed
    events: queue.Queue = field(default_factory=queue.Queue)  # (index, new token ids, finish reason | None)
    waker: object = None  # called (from the pipe reader thread) after each event, e.g. to wake an asyncio task
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(r for r in (self.prefill_rank, self.decode_rank) if r is not None)

    @property
    def num_generated(self) -> int:
        return sum(len(v) for v in self.tokens.values())
