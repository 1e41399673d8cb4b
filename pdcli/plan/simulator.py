"""The simulation of one layout under one arrival trace: events are arrivals, ends of steps and landings of
handed-off KV; routing is the coordinator's (policies on requests in flight; the cost-model router on
loads built from the simulated workers)."""
from __future__ import annotations

import bisect
import heapq
import itertools
from collections import deque
from dataclasses import dataclass

from pdcli.bench.metrics import RequestRecord
from pdcli.config import CacheConfig
from pdcli.coordinator.policy import RouteInput, make_policy
from pdcli.coordinator.routing import can_hand_off
from pdcli.plan.sim import SimSeq, SimSpec, SimStep, SimWorker, shared_step_ms
from pdcli.router.adaptive import pair_candidates
from pdcli.router.cost_model import CostModel
from pdcli.router.load import LoadForecast, WorkerLoad, committed_batch, mark_gpu_sharing, mark_step
from pdcli.router.prefix import PrefixIndex, prompt_hashes


def pair_kind(p: SimSpec, d: SimSpec) -> str:
    """How KV moves between two simulated workers: the key of the fitted transfer cost."""
    if p.device == d.device:
        return "cpu-gloo" if p.device.endswith("cpu") else "gpu-ipc"
    return "gpu-nccl" if p.device.split(":")[0] == d.device.split(":")[0] else "net"


@dataclass(frozen=True)
class CoordinatorHops:
    """The coordinator's time around a worker's, ms: before a prompt reaches an idle worker (submit + route + the
    pipe) and after its first or last token (the report). Medians of the queue-empty requests of 56 runs on one
    H100 host (results/router/ttft_parts_nvidia-h100-80gb-hbm3.json: submit 0.15, route 1.0-1.4, pipe to an idle
    prefill worker 0.4, report 0.2-0.3); a busy worker's wait for its step is simulated."""
    dispatch_ms: float = 1.6
    report_ms: float = 0.25


def block_hashes(prompts: list[list[int]], block_size: int) -> list[list[bytes]] | None:
    """Each prompt's chained block hashes (prefix caching), or None where no two prompts share a first block:
    then nothing can hit a cache, and the simulator skips the lookups."""
    firsts = [tuple(ids[:block_size]) for ids in prompts if len(ids) >= block_size]
    if len(set(firsts)) == len(firsts):
        return None
    return [prompt_hashes(ids, block_size) for ids in prompts]


class Simulator:
    def __init__(self, cm: CostModel, specs: list[SimSpec], mode: str, pd_on_collocated: bool = False, router=None,
                 max_num_seqs: int = 256, net_gbps: float | None = None, block_size: int = CacheConfig.block_size,
                 hops: CoordinatorHops = CoordinatorHops()):
        self.cm, self.policy, self.router, self.hops = cm, make_policy(mode), router, hops
        cm.assume_net(net_gbps)
        self.workers = [SimWorker(s, cm, max_num_seqs, cm.max_num_batched_tokens) for s in specs]
        self.pairs = [(p, d) for p in self.workers for d in self.workers
                      if can_hand_off(p.spec, d.spec, pd_on_collocated)]
        self.events: list = []
        self.order = itertools.count()
        self.turn = itertools.count()
        self.forecast = LoadForecast()
        self.block_size = block_size
        self.prefixes = PrefixIndex(block_size, {})  # what each worker computed (no eviction: pools not modelled)
        self.now = 0.0
        self.slots, self.waiting_for_slot = None, deque()

    def push(self, t: float, kind: str, *data) -> None:
        heapq.heappush(self.events, (t, next(self.order), kind, data))

    def run(self, prompt_lens: list[int], output_lens: list[int], arrivals, paths: list[str] | None = None,
            prompts: list[list[int]] | None = None, max_concurrency: int | None = None,
            hashes: list[list[bytes]] | None = None) -> list[RequestRecord]:
        """paths: the path each request took in a recorded run (validation follows them), else routed here;
        prompts: the token ids, for prefix caching (the leading blocks a worker computed before are not computed
        again, their attention is), else every prompt is computed whole; hashes: block_hashes(prompts) made before
        (one set of requests simulated on several layouts); max_concurrency (bench's, vLLM's): at most that many
        requests in flight, one that finds none free sent when one ends and timed from then."""
        seqs = [SimSeq(i, float(a), n, o) for i, (a, n, o) in enumerate(zip(arrivals, prompt_lens, output_lens))]
        for s, h in zip(seqs, hashes or block_hashes(prompts or [], self.block_size) or []):
            s.hashes = h
        for s, path in zip(seqs, paths or []):
            s.path = path
        self.slots, self.waiting_for_slot = max_concurrency or None, deque()  # free slots (None: no limit)
        for s in seqs:
            if max_concurrency:
                self.push(s.arrival, "request", s)
            else:
                self.push(s.arrival + self.hops.dispatch_ms / 1e3, "arrive", s)
        while self.events:
            self.now, _, kind, data = heapq.heappop(self.events)
            getattr(self, f"_on_{kind}")(*data)
        report = lambda t: None if t is None else t + self.hops.report_ms / 1e3  # noqa: E731
        return [RequestRecord(s.arrival, s.prompt_len, s.output_len, first_token=report(s.first), end=report(s.end),
                              path=s.path, workers=s.workers, error=None if s.end is not None else "not finished",
                              launched=s.launched)
                for s in seqs]

    # ---- events ----
    def _on_request(self, seq: SimSeq) -> None:
        """A request under max_concurrency: sent now if a slot is free, else when one frees (_ended)."""
        if self.slots:
            self.slots -= 1
            seq.arrival = self.now
            self.push(self.now + self.hops.dispatch_ms / 1e3, "arrive", seq)
        else:
            self.waiting_for_slot.append(seq)

    def _ended(self) -> None:
        if self.slots is None:
            return
        self.slots += 1
        if self.waiting_for_slot:
            self._on_request(self.waiting_for_slot.popleft())

    def _on_arrive(self, seq: SimSeq) -> None:
        first, second = self.route(seq)
        seq.workers = (first.spec.rank,) if second is None else (first.spec.rank, second.spec.rank)
        seq.path = "collocated" if second is None else "disaggregated"
        seq.cached = self.prefixes.cached_tokens(first.spec.rank, seq.hashes)
        seq.scheduled = seq.prefilled = seq.reported = seq.cached
        first.waiting.append(seq)
        first.hold(seq)
        first.inflight += 1
        if second is not None:
            second.inflight += 1
            second.incoming += 1
        out = self.router.predictor.mean(seq.prompt_len, seq.output_len) if self.router else seq.output_len
        computes = seq.prompt_len - seq.scheduled  # its cached prefix left out
        self.forecast.route(self.now, first.spec.rank, (second or first).spec.rank, computes, out)
        self.kick(first)

    def _on_step_end(self, w: SimWorker, step: SimStep) -> None:
        prefilled, done = w.finish_step(step, self.now)
        for seq in prefilled:
            for rank in set(seq.workers):  # both ends of a handoff hold its blocks from now on
                self.prefixes.add(rank, seq.hashes)
            if len(seq.workers) > 1:
                w.inflight -= 1
                d = self.workers[seq.workers[1]]
                self.push(self.now + self.transfer_ms(seq, w, d) / 1e3, "landed", seq, d)
            if seq.output_len <= 1:
                seq.end = self.now
                self.workers[seq.workers[-1]].inflight -= 1
                if len(seq.workers) > 1:
                    self.workers[seq.workers[1]].incoming -= 1
                self._ended()
        for seq in done:
            w.inflight -= 1
            self._ended()
        if w.queued is not None:
            step, w.queued = w.queued, None
            self.start(w, step)
        else:
            self.kick(w)

    def _on_landed(self, seq: SimSeq, d: SimWorker) -> None:
        if seq.output_len > 1:
            d.incoming -= 1
            d.admit(seq)
            self.kick(d)

    def kick(self, w: SimWorker) -> None:
        """An idle worker with work starts a step (and with async scheduling plans the one after it)."""
        if w.idle and w.has_work:
            self.start(w, w.plan())

    def start(self, w: SimWorker, step: SimStep) -> None:
        neighbours = [o for o in self.workers if o is not w and o.spec.device == w.spec.device
                      and not o.spec.device.endswith("cpu")]
        ms = shared_step_ms(w, step, neighbours, self.now)
        w.running, w.busy_until, w.step_has_decodes = step, self.now + ms / 1e3, step.decode_rows > 0
        self.push(w.busy_until, "step_end", w, step)
        self._launched(step)
        if w.async_steps and w.has_work:
            w.queued = w.plan()
            self._launched(w.queued)

    def _launched(self, step: SimStep) -> None:
        """Mark its chunks' sequences launched now (the engine launches a step when it plans it), once."""
        for seq, _, _ in step.chunks:
            if seq.launched is None:
                seq.launched = self.now

    def transfer_ms(self, seq: SimSeq, p: SimWorker, d: SimWorker) -> float:
        return self.cm.transfer_ms(seq.prompt_len, pair_kind(p.spec, d.spec))

    # ---- routing: the coordinator's rules on simulated state ----
    def _least(self, pairs: list, key):
        if not pairs:
            return None
        best = min(map(key, pairs))
        tied = [pd for pd in pairs if key(pd) == best]
        return tied[next(self.turn) % len(tied)]

    def route(self, seq: SimSeq) -> tuple[SimWorker, SimWorker | None]:
        colls = [w for w in self.workers if w.spec.role == "collocated"]
        coll = min(colls, key=lambda w: w.inflight) if colls else None
        if seq.path:  # recorded: the least loaded workers of that path
            pair = self._least(self.pairs, lambda pd: (pd[0].inflight, pd[1].inflight))
            return pair if seq.path == "disaggregated" and pair else (coll, None)
        if self.policy.name == "adaptive" and self.router is not None and coll and self.pairs:
            return self._by_cost_model(seq, colls)
        pair = self._least(self.pairs, lambda pd: (pd[0].inflight, pd[1].inflight))
        want = self.policy.choose(RouteInput(seq.prompt_len, None, prefill_queue=pair[0].inflight if pair else 0,
                                             collocated_load=coll.inflight if coll else 0))
        if pair and (want == "disaggregated" or coll is None):
            return pair
        return coll, None

    def loads(self) -> dict[int, WorkerLoad]:
        """Each worker's load as the coordinator sees it: prompts until their first token lands, less what the
        landed steps computed of them (the workers report a partly prefilled prompt's progress)."""
        out = {}
        left = lambda s: (s.arrival, s.prompt_len - min(s.reported, s.prompt_len - 1))  # noqa: E731
        for w in self.workers:
            out[w.spec.rank] = load = WorkerLoad(
                queued_prefill_tokens=w.queued_tokens, queued_prefill_sq_tokens=w.queued_sq,
                decode_batch=w.num_decoding, decode_ctx=w.decode_ctx, role=w.spec.role, async_steps=w.async_steps,
                device=w.spec.device, incoming_decodes=w.incoming)
            # the prompts that matter to when its step began: the oldest, and those after its last step ended
            # (prompts are in arrival order; a deep queue is mostly older)
            i = 0 if w.last_step_end is None else \
                bisect.bisect_right(w.prompts, w.last_step_end, key=lambda s: s.arrival)
            mark_step(load, w.last_step_end, [left(s) for s in w.prompts[:min(i, 1)] + w.prompts[i:]], self.now)
        mark_gpu_sharing(out, {w.spec.rank: w.spec.device for w in self.workers})
        self.forecast.apply(out, self.now)
        return out

    def _by_cost_model(self, seq: SimSeq, colls: list[SimWorker]) -> tuple[SimWorker, SimWorker | None]:
        loads = self.loads()
        # queued and uncached prompt tokens, decoding sequences: the least loaded worker for this prompt
        by_rank = {r: w.queued_prefill_tokens + seq.prompt_len + committed_batch(w) -
                   (self.prefixes.cached_tokens(r, seq.hashes) if seq.hashes else 0) for r, w in loads.items()}
        load = lambda w: by_rank[w.spec.rank]  # noqa: E731
        coll = min(colls, key=load)
        (pre, dec), *more = pair_candidates(self.pairs, load, lambda w: committed_batch(loads[w.spec.rank]))
        hit = lambda w: self.prefixes.cached_tokens(w.spec.rank, seq.hashes) if seq.hashes else 0  # noqa: E731
        d = self.router.decide(seq.prompt_len, seq.output_len, loads[coll.spec.rank], loads[pre.spec.rank],
                               loads[dec.spec.rank], pair_kind(pre.spec, dec.spec), list(loads.values()),
                               dict(collocated=hit(coll), disaggregated=hit(pre)),
                               [(loads[p.spec.rank], loads[q.spec.rank], pair_kind(p.spec, q.spec), hit(p))
                                for p, q in more])
        pre, dec = ((pre, dec), *more)[d.pair_index]
        return (coll, None) if d.path == "collocated" else (pre, dec)
