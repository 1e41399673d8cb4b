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
from pdcli.router.load import shared_discount


@dataclass
class SimSeq:
    index: int  # in the request list
    arrival: float  # s
    prompt_len: int
    output_len: int
    path: str = ""
    workers: tuple = ()
    scheduled: int = 0  # prompt tokens in steps planned so far (the scheduler advances at launch)
    prefilled: int = 0  # prompt tokens computed (landed) so far
    reported: int = 0  # of those, what its worker has reported (with a step that sampled: the engine's messages)
    launched: float | None = None  # s, when a step with its first prompt tokens was planned (the engine launches it)
    first: float | None = None  # s, first token
    end: float | None = None  # s, last token
    hashes: list = field(default_factory=list)  # its prompt's chained block hashes (prefix caching; none: off)
    cached: int = 0  # its prompt's leading tokens in the prefix cache of the worker that prefills it
    shared_ctx: int = 0  # context tokens its decode steps count less (load.shared_discount; collocated only)


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
class SimStep:
    """One planned engine step: its prefill chunks (sequence, tokens, tokens computed before), the sequences
    whose last token it makes, its decode rows and its time alone on the GPU."""
    chunks: list
    ending: list
    decode_rows: int
    ms: float


@dataclass
class SimWorker:
    """One engine under the engine's rules. With async scheduling (every role but prefill) the engine plans a
    step while the one before it runs: when step k ends, step k + 1 (planned at step k - 1's end) starts and
    step k + 2 is planned from the scheduler's state as if k + 1 had run; a prompt that came during step k - 1
    rides in step k + 1, and a step's tokens land at its end."""
    spec: SimSpec
    cm: CostModel
    max_num_seqs: int
    max_num_batched_tokens: int
    waiting: deque = field(default_factory=deque)  # prompts with tokens left to plan, FCFS
    prompts: list = field(default_factory=list)  # prompts here without a first token (the coordinator's queue), FCFS
    queued_tokens: int = 0  # of those, the prompt tokens not yet computed (landed), as the workers report them
    queued_sq: int = 0  # their squared lengths less the computed part's: sum of prompt_len^2 - computed^2
    finishing: list = field(default_factory=list)  # heap of (plan whose row makes its last token, order, seq)
    num_decoding: int = 0  # decode rows of the next planned step
    decode_ctx: int = 0  # their context tokens
    plans: int = 0  # steps planned so far (the next plan's number)
    running: SimStep | None = None
    queued: SimStep | None = None  # planned, starts when the running one ends (async scheduling)
    busy_until: float | None = None  # end of the step running now
    step_has_decodes: bool = False
    last_step_end: float | None = None
    inflight: int = 0  # requests held (the coordinator's count for least-loaded routing)
    incoming: int = 0  # requests routed to decode here, still prefilling elsewhere or in transfer
    _order: itertools.count = field(default_factory=itertools.count)

    @property
    def idle(self) -> bool:
        return self.running is None

    @property
    def has_work(self) -> bool:
        """Something left to plan."""
        return bool(self.waiting or self.num_decoding)

    @property
    def async_steps(self) -> bool:
        return self.spec.role != "prefill"

    def plan(self) -> SimStep:
        """The next step (the decode rows and as many prompt tokens as the budget takes, FCFS), then the
        scheduler's state as if it had run: its completed prompts decode here from the step after it (or wait
        for their handoff), the sequences it ends leave."""
        number, self.plans = self.plans, self.plans + 1
        batch = min(self.num_decoding, self.max_num_seqs)
        budget, chunks = self.max_num_batched_tokens - batch, []
        for seq in self.waiting:
            if budget <= 0 or batch + len(chunks) >= self.max_num_seqs:
                break
            n = min(budget, seq.prompt_len - seq.scheduled)
            chunks.append((seq, n, seq.scheduled))
            budget -= n
        ms = self.cm.step_ms(batch, self.decode_ctx, [(n, done) for _, n, done in chunks])
        if self.spec.role == "prefill":  # a dedicated prefill worker as the profile saw it serve
            ms *= self.cm.prefill_role_scale
        self.decode_ctx += self.num_decoding
        ending = []
        while self.finishing and self.finishing[0][0] <= number:
            seq = heapq.heappop(self.finishing)[2]
            ending.append(seq)
            self.num_decoding -= 1
            self.decode_ctx -= seq.prompt_len + seq.output_len - seq.shared_ctx
        for seq, n, _ in chunks:
            seq.scheduled += n
            if seq.scheduled >= seq.prompt_len:
                self.waiting.remove(seq)
                if len(seq.workers) == 1:
                    self.admit(seq)
        return SimStep(chunks, ending, batch, ms)

    def hold(self, seq: SimSeq) -> None:
        """seq's prompt is here until its first token (queued_tokens and queued_sq count what it has left)."""
        self.prompts.append(seq)
        self._count(seq, 1)

    def _count(self, seq: SimSeq, sign: int) -> None:
        done = min(seq.reported, seq.prompt_len - 1)
        self.queued_tokens += sign * (seq.prompt_len - done)
        self.queued_sq += sign * (seq.prompt_len ** 2 - done ** 2)

    def admit(self, seq: SimSeq) -> None:
        """seq, with its first token on the way, decodes in the next output_len - 1 steps planned here."""
        if seq.output_len <= 1:
            return
        # its prefix's blocks shared here (a handoff's came by transfer, shared with no one)
        seq.shared_ctx = shared_discount(seq.cached, self.cm.shared_context_read) if len(seq.workers) == 1 else 0
        self.num_decoding += 1
        self.decode_ctx += seq.prompt_len + 1 - seq.shared_ctx
        heapq.heappush(self.finishing, (self.plans + seq.output_len - 2, next(self._order), seq))

    def finish_step(self, step: SimStep, now: float) -> tuple[list[SimSeq], list[SimSeq]]:
        """Land a step that ended at now: (sequences whose first token it made, sequences it finished). As the
        engine's worker reports: a step that samples (decode rows, a prompt's last chunk) sends a message, with the
        progress of every step the device ran before it; one that only prefilled part of a prompt sends nothing
        (engine/prefill_progress.py), so the coordinator neither sees its progress nor that it ended."""
        prefilled = []
        for seq, n, _ in step.chunks:
            seq.prefilled += n
            if seq.prefilled >= seq.prompt_len:
                self._count(seq, -1)
                seq.first, seq.reported = now, seq.prefilled
                self.prompts.remove(seq)
                prefilled.append(seq)
        for seq in step.ending:
            seq.end = now
        self.running, self.busy_until = None, None
        if step.decode_rows or prefilled:
            for seq in self.prompts:
                if seq.reported != seq.prefilled:
                    self._count(seq, -1)
                    seq.reported = seq.prefilled
                    self._count(seq, 1)
            self.last_step_end = now
        return prefilled, step.ending


def shared_step_ms(worker: SimWorker, step: SimStep, neighbours: list[SimWorker], now: float) -> float:
    """A step's time beside the other workers on its GPU, as the router prices them (router/latency.py): a step
    with a prompt chunk gains a share of each busy neighbour's step (CostModel.prompt_beside_prefill_ms beside a
    step with a chunk, prompt_beside_decode_ms beside a decode step: their kernels alternate); a decode step gains
    a share of each prefilling neighbour's step (CostModel.decode_beside_prefill_ms) and reads the weights beside
    another decode batch (each ~1 / (1 + decoding neighbours)). With the sharing unmeasured a decode step waits for
    a neighbour's prefill, as under time-slicing, and a prefill beside decodes takes the default factor."""
    busy = [n for n in neighbours if not n.idle]
    cm, alone_ms, has_decodes = worker.cm, step.ms, step.decode_rows > 0
    share, share_d = cm.beside_prefill_share, cm.beside_decode_share
    if share is not None and step.chunks:
        prefilling = [n for n in busy if n.running.chunks]
        decoding = [n for n in busy if not n.running.chunks]
        beside = sum(cm.prompt_beside_prefill_ms(alone_ms, n.running.ms) for n in prefilling)
        if share_d is None:  # the prefill beside decodes unmeasured: its factor
            return alone_ms * (1 + cm.prefill_neighbour_extra * len(decoding)) + beside
        return alone_ms + beside + sum(cm.prompt_beside_decode_ms(alone_ms, n.running.ms) for n in decoding)
    if share is not None and has_decodes:  # a decode step: a share of each prefilling neighbour's step
        prefilling = [n for n in busy if n.running.chunks]
        decoding = sum(1 for n in busy if not n.running.chunks)
        return alone_ms * (1 + cm.decode_neighbour_extra * decoding) + \
            sum(cm.decode_beside_prefill_ms(alone_ms, n.running.ms) for n in prefilling)
    decoding = sum(1 for n in busy if n.step_has_decodes)
    if not has_decodes:
        return alone_ms * (1 + cm.prefill_neighbour_extra * decoding)
    prefilling = [n for n in busy if not n.step_has_decodes]
    waits = sum(max(0.0, (n.busy_until - now) * 1e3) for n in prefilling)  # unmeasured: it waits for them
    return alone_ms * (1 + cm.decode_neighbour_extra * decoding) + waits
