"""A discrete-event simulator of pdcli's workers stepping under the engine's rules: continuous batching,
chunked prefill under max_num_batched_tokens, max_num_seqs, FCFS; step times from the fitted cost model
(`CostModel.step_ms`); handoffs at the fitted transfer cost; workers sharing a GPU slowed as the router
prices it (router/latency.py). Requests are routed by the real policies and router (coordinator's rules)."""
from __future__ import annotations

import heapq
import itertools
from collections import deque
from dataclasses import dataclass, field

from pdcli.router.cost_model import CostModel


@dataclass
class SimSeq:
    index: int  # in the request list
    arrival: float  # s
    prompt_len: int
    output_len: int
    path: str = ""
    workers: tuple = ()
    prefilled: int = 0  # prompt tokens computed so far
    first: float | None = None  # s, first token
    end: float | None = None  # s, last token


@dataclass(frozen=True)
class SimSpec:
    rank: int
    role: str  # collocated | prefill | decode
    device: str  # e.g. node0:cuda:3; workers with one device share the GPU

    @property
    def place(self) -> str:  # as WorkerSpec.place: the device string already names the node
        return self.device

    tp_size = 1  # the planner's workers hold a whole model each


@dataclass
class SimWorker:
    spec: SimSpec
    cm: CostModel
    max_num_seqs: int
    max_num_batched_tokens: int
    waiting: deque = field(default_factory=deque)  # prompts to prefill, FCFS
    finishing: list = field(default_factory=list)  # heap of (step at which it ends, order, seq)
    num_decoding: int = 0
    decode_ctx: int = 0  # context tokens of the decoding sequences
    steps: int = 0  # steps done
    busy_until: float | None = None  # end of the step running now
    step_has_decodes: bool = False
    last_step_end: float | None = None
    inflight: int = 0  # requests held (the coordinator's count for least-loaded routing)
    lagged: list = field(default_factory=list)  # (seq, "first" | "end") reported at the next step's end
    _order: itertools.count = field(default_factory=itertools.count)

    @property
    def idle(self) -> bool:
        return self.busy_until is None

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.num_decoding)

    @property
    def queued_tokens(self) -> int:
        return sum(s.prompt_len - s.prefilled for s in self.waiting)

    def plan(self) -> tuple[list[tuple[SimSeq, int]], float]:
        """The next step's prefill chunks (sequence, tokens) and its time alone on the GPU, ms."""
        batch = min(self.num_decoding, self.max_num_seqs)
        budget, chunks = self.max_num_batched_tokens - batch, []
        for seq in self.waiting:
            if budget <= 0 or batch + len(chunks) >= self.max_num_seqs:
                break
            n = min(budget, seq.prompt_len - seq.prefilled)
            chunks.append((seq, n))
            budget -= n
        ms = self.cm.step_ms(batch, self.decode_ctx, [(n, seq.prefilled) for seq, n in chunks])
        if self.spec.role == "prefill":  # a dedicated prefill worker as the profile saw it serve
            ms *= self.cm.prefill_role_scale
        return chunks, ms

    def admit(self, seq: SimSeq) -> None:
        """seq, with its first token, joins the decode batch; it ends after output_len - 1 more steps."""
        if seq.output_len <= 1:
            return
        self.num_decoding += 1
        self.decode_ctx += seq.prompt_len + 1
        heapq.heappush(self.finishing, (self.steps + seq.output_len - 1, next(self._order), seq))

    @property
    def async_steps(self) -> bool:
        return self.spec.role != "prefill"

    def report(self, now: float) -> None:
        """Time the tokens held back: with async scheduling a step's tokens reach the coordinator once the
        next step is under way (served runs on one H100: collocated TTFT ~ one step above the model's)."""
        for seq, what in self.lagged:
            setattr(seq, what, now)
        self.lagged = []

    def finish_step(self, chunks: list[tuple[SimSeq, int]], now: float) -> tuple[list[SimSeq], list[SimSeq]]:
        """Apply a step that ended at now: (sequences whose prompt completed, sequences that finished)."""
        self.report(now)
        self.steps += 1
        self.decode_ctx += self.num_decoding
        done = []
        while self.finishing and self.finishing[0][0] <= self.steps:
            seq = heapq.heappop(self.finishing)[2]
            self._stamp(seq, "end", now)
            self.num_decoding -= 1
            self.decode_ctx -= seq.prompt_len + seq.output_len
            done.append(seq)
        prefilled = []
        for seq, n in chunks:
            seq.prefilled += n
            if seq.prefilled >= seq.prompt_len:
                self.waiting.remove(seq)
                self._stamp(seq, "first", now)
                prefilled.append(seq)
        self.busy_until, self.last_step_end = None, now
        return prefilled, done

    def _stamp(self, seq: SimSeq, what: str, now: float) -> None:
        if self.async_steps:
            self.lagged.append((seq, what))
        setattr(seq, what, now)  # until the next step's end, if there is one


def shared_step_ms(worker: SimWorker, alone_ms: float, has_decodes: bool, neighbours: list[SimWorker],
                   now: float) -> float:
    """A step's time beside the other workers on its GPU: a decode batch reads the weights beside another
    (each runs at ~1 / (1 + decoding neighbours)) and waits behind a neighbour's prefill; a prefill beside
    decoding neighbours runs a little slower (the cost model's profiled factors, as the router prices them)."""
    busy = [n for n in neighbours if not n.idle]
    decoding = sum(1 for n in busy if n.step_has_decodes)
    cm = worker.cm
    if not has_decodes:
        return alone_ms * (1 + cm.prefill_neighbour_extra * decoding)
    prefilling = [n for n in busy if not n.step_has_decodes]
    if cm.decode_beside_prefill_extra is not None:  # measured: it runs beside them, slower (MPS)
        return alone_ms * (1 + cm.decode_neighbour_extra * decoding + cm.decode_beside_prefill_extra * len(prefilling))
    waits = sum(max(0.0, (n.busy_until - now) * 1e3) for n in prefilling)  # unmeasured: it waits for them
    return alone_ms * (1 + cm.decode_neighbour_extra * decoding) + waits
