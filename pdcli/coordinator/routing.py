"""Routing: which path a request takes and on which workers. The policy of the run (or of the request)
chooses the path; mode "adaptive" with a fitted cost model asks the router (router/adaptive.py), which sees
the workers' load through router/load.py; the others choose from queue lengths."""
from __future__ import annotations

import itertools
from typing import Callable, NamedTuple

from pdcli.coordinator.policy import RouteInput, make_policy
from pdcli.coordinator.tracked import Tracked
from pdcli.coordinator.worker_pool import WorkerHandle, WorkerPool
from pdcli.router.adaptive import pair_candidates
from pdcli.router.load import LoadView, committed_batch, compact
from pdcli.router.prefix import PrefixIndex, prompt_hashes
from pdcli.workers.layout import WorkerSpec, transfer_pair


class Route(NamedTuple):
    path: str  # collocated | disaggregated
    worker: WorkerHandle  # runs the prompt (collocated path: all of it)
    decode: WorkerHandle | None  # the disaggregated path's decode worker


def can_hand_off(p: WorkerSpec, d: WorkerSpec, pd_on_collocated: bool) -> bool:
    """p may prefill for d: a prefill and a decode worker (on one GPU: through CUDA IPC), or, with
    pd_on_collocated, two collocated workers (or one and a P/D worker) on different devices, or a prefill worker
    and the collocated worker beside it (workers/layout.py: pd_on_collocated)."""
    if p.rank == d.rank or p.tp_size != d.tp_size:  # KV shards go rank i to rank i
        return False
    if p.tp_size > 1 and transfer_pair(p, d) == "gpu-ipc":  # one CUDA IPC copy per shard: not yet
        return False
    if p.role == "prefill" and d.role == "decode":
        return True
    if not pd_on_collocated or d.role not in ("decode", "collocated"):
        return False
    # a prefill worker hands to any of them (on its own GPU: back to the collocated worker beside it, through CUDA
    # IPC); a collocated worker prefills for the others, on other devices
    return p.role == "prefill" or (p.role == "collocated" and (p.place != d.place or p.device == "cpu"))


class Routing:
    def __init__(self, pool: WorkerPool, mode: str, router=None, pd_on_collocated: bool = False,
                 block_size: int | None = None, prefix_caching: bool = True):
        """router: the cost-model router (AdaptiveRouter) for mode adaptive, when a params.json is given;
        block_size, prefix_caching: the workers' (prompts priced by their uncached part)."""
        self.pool, self.policy, self.router, self.pd_on_collocated = pool, make_policy(mode), router, pd_on_collocated
        self.loads = LoadView(*([router.cm.shared_context_read] if router is not None else []))
        self.prefixes = PrefixIndex(block_size, {w.spec.rank: w.info.num_blocks for w in pool.workers}) \
            if prefix_caching and block_size else None
        self._turn = itertools.count()

    def pairs(self) -> list[tuple[WorkerHandle, WorkerHandle]]:
        live = self.pool.serving()
        return [(p, d) for p in live for d in live
                if can_hand_off(p.spec, d.spec, self.pd_on_collocated) and self.pool.can_transfer(p, d)]

    def added(self, workers: list[WorkerHandle]) -> None:
        """Workers that joined (another node's): their pools bound what the prefix index keeps of them."""
        if self.prefixes is not None:
            self.prefixes.capacity.update({w.spec.rank: w.info.num_blocks for w in workers})

    def _least(self, pairs: list, key):
        """The pair of least key; ties taken in turn (two collocated workers serve each other both ways)."""
        if not pairs:
            return None
        best = min(map(key, pairs))
        tied = [pd for pd in pairs if key(pd) == best]
        return tied[next(self._turn) % len(tied)]

    def route(self, t: Tracked, mode: str | None, active: Callable[[], list[Tracked]]) -> Route | None:
        """The route for t (its decision recorded in t.decision), or None if no live worker can serve it.
        active(): the requests not done, whose load the cost model weighs."""
        colls = self.pool.serving("collocated")
        coll = min(colls, key=lambda w: len(w.inflight)) if colls else None
        if t.params.n > 1:  # forks share KV inside one engine
            return Route("collocated", coll, None) if coll else None
        pairs = self.pairs()
        policy = make_policy(mode) if mode else self.policy
        if policy.name == "adaptive" and self.router is not None and coll and pairs:
            route = self._by_cost_model(t, colls, pairs, active)
        else:
            route = self._by_policy(t, policy, coll, pairs)
            if route is not None and self.router is not None:
                self._price(t, route, active)
        if route is not None:
            out_len = self.router.predictor.mean(len(t.prompt_ids), t.params.max_tokens) if self.router else \
                t.params.max_tokens
            decode = route.decode or route.worker
            # its worker computes only what it has not cached: the prompt's load and forecast count the rest (a
            # shared-prefix run at 25 req/s, 2k of 2.3k tokens cached, was priced at a prefill share of 1.03)
            cached = self.cached(t, route.worker)
            t.prefilled, t.cached_tokens = max(t.prefilled, cached), cached
            self.loads.routed(route.worker.spec.rank, decode.spec.rank, len(t.prompt_ids) - cached, out_len)
            if self.prefixes is not None:  # the prefill worker caches its blocks, the decode worker too
                for w in {route.worker.spec.rank, decode.spec.rank}:
                    self.prefixes.add(w, self._hashes(t))
        return route

    def _hashes(self, t: Tracked) -> list[bytes]:
        if t.prefix_hashes is None:
            t.prefix_hashes = prompt_hashes(t.prompt_ids, self.prefixes.block_size)
        return t.prefix_hashes

    def cached(self, t: Tracked, w: WorkerHandle) -> int:
        return self.prefixes.cached_tokens(w.spec.rank, self._hashes(t)) if self.prefixes is not None else 0

    def _by_cost_model(self, t: Tracked, colls: list, pairs: list, active: Callable[[], list[Tracked]]) -> Route:
        loads = self.loads.snapshot(self.pool.workers, active())
        n = len(t.prompt_ids)
        # queued and uncached prompt tokens, decoding sequences: the least loaded worker for this prompt
        load = lambda w: loads[w.spec.rank].queued_prefill_tokens + n - self.cached(t, w) + \
            committed_batch(loads[w.spec.rank])  # noqa: E731
        coll = min(colls, key=load)
        (pre, dec), *more = pair_candidates(pairs, load, lambda w: committed_batch(loads[w.spec.rank]))
        cached = dict(collocated=self.cached(t, coll), disaggregated=self.cached(t, pre))
        d = self.router.decide(n, t.params.max_tokens, loads[coll.spec.rank], loads[pre.spec.rank],
                               loads[dec.spec.rank], transfer_pair(pre.spec, dec.spec), list(loads.values()), cached,
                               [(loads[p.spec.rank], loads[q.spec.rank], transfer_pair(p.spec, q.spec), self.cached(t, p))
                                for p, q in more])
        pre, dec = ((pre, dec), *more)[d.pair_index]
        t.decision = dict(policy="adaptive", decided_by=d.decided_by, scores=d.scores, path=d.path, predicted=d.predicted,
                          predicted_raw=d.predicted_raw, roles=d.roles, predicted_output_len=d.output_len,
                          loads={r: compact(w) for r, w in loads.items()}, cached_tokens=cached)
        return Route(d.path, coll, None) if d.path == "collocated" else Route(d.path, pre, dec)

    def _price(self, t: Tracked, route: Route, active: Callable[[], list[Tracked]]) -> None:
        """A policy's decision priced by the cost model as well (when one is loaded): the loads it saw and the
        router's predictions for the path it took, recorded as adaptive's are, so that a run of any mode can be
        replayed from its recorded state and its online errors measured; the outcomes calibrate the router."""
        loads = self.loads.snapshot(self.pool.workers, active())
        n, path, dec = len(t.prompt_ids), route.path, route.decode or route.worker
        out_len = self.router.predictor.mean(n, t.params.max_tokens)
        cached = self.cached(t, route.worker)
        raw, pred, roles = self.router.price(path, n, out_len, loads[route.worker.spec.rank], loads[dec.spec.rank],
                                             transfer_pair(route.worker.spec, dec.spec), cached)
        t.decision.update(predicted={path: pred}, predicted_raw={path: raw}, roles={path: roles},
                          predicted_output_len=out_len, loads={r: compact(w) for r, w in loads.items()},
                          cached_tokens={path: cached})

    def _by_policy(self, t: Tracked, policy, coll: WorkerHandle | None, pairs: list) -> Route | None:
        n_in = lambda w: len(w.inflight)  # noqa: E731
        pair = self._least(pairs, lambda pd: (n_in(pd[0]), n_in(pd[1])))
        r = RouteInput(len(t.prompt_ids), t.params,
                       prefill_queue=n_in(pair[0]) if pair else 0, collocated_load=n_in(coll) if coll else 0)
        want = policy.choose(r)
        t.decision = dict(policy=policy.name, decided_by=getattr(policy, "decided_by", policy.name), path=want)
        if pair and (want == "disaggregated" or not coll):
            return Route("disaggregated", *pair)
        return Route("collocated", coll, None) if coll else None
