"""`pdcli profile`: measure the real engine on this hardware for the cost model.

Prefill steps (chunk n after c cached tokens), decode steps (batch B, total context S), mixed steps
(a decode batch carrying a prefill chunk), all through ModelRunner.execute (CUDA graphs included); KV
transfer through the real worker paths (CentralScheduler with a prefill and a decode worker).
"""
from __future__ import annotations

import logging
import platform
import random
import re
import time
from typing import Protocol

import torch

from pdcli import __version__
from pdcli.engine.llm_engine import LLMEngine
from pdcli.engine.scheduler import SchedulerOutput
from pdcli.engine.sequence import Sequence
from pdcli.profile_plan import (TRANSFER_LENGTHS, TRANSFER_REPEATS, ComponentPlan, Limits, Point, ProfilePlan,
                                plan_profile)
from pdcli.router.fit import SCHEMA_VERSION
from pdcli.sampling_params import SamplingParams

logger = logging.getLogger("pdcli.profile")


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "x"


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")


class ProgressSink(Protocol):
    def update(self, stage: str, done: int, total: int, left_s: float, unit: str = "points") -> None:
        """done of total in stage (prefill, decode, mixed, KV transfer (...)); left_s: estimated seconds left
        of the whole profile."""


class StepTimer:
    """Times runner.execute on hand-built batches: the timer the plan's probes and points go through (ms)."""

    def __init__(self, engine: LLMEngine, seed: int = 0):
        self.engine, self.rng = engine, random.Random(seed)
        self.vocab = engine.arch.vocab_size

    def _seq(self, length: int) -> Sequence:
        return Sequence("profile", [self.rng.randrange(self.vocab) for _ in range(length)],
                        SamplingParams(temperature=0), 0)

    def time_step(self, batch: list[tuple[Sequence, int]], reps: int) -> float:
        """Median ms of runner.execute over a batch of (sequence, new tokens); KV content is irrelevant."""
        e = self.engine
        out = SchedulerOutput([s for s, _ in batch], [n for _, n in batch])
        sync = torch.cuda.synchronize if e.device.type == "cuda" else (lambda: None)
        times = []
        for _ in range(reps + 1):
            sync()
            t = time.perf_counter()
            e.runner.execute(out)
            sync()
            times.append((time.perf_counter() - t) * 1e3)
        return sorted(times[1:])[len(times[1:]) // 2]

    def prepared(self, total: int, computed: int) -> Sequence | None:
        seq = self._seq(total)
        if not self.engine.block_manager.allocate(seq, total):
            return None
        seq.num_computed_tokens = computed
        return seq

    def free(self, seqs) -> None:
        for s in seqs:
            self.engine.block_manager.free_seq(s)

    def prefill_ms(self, n: int, c: int, reps: int) -> float | None:
        """A chunk of n tokens after c cached ones; None: no room in the KV pool."""
        seq = self.prepared(c + n, c)
        if seq is None:
            return None
        try:
            return self.time_step([(seq, n)], reps)
        finally:
            self.free([seq])

    def decode_ms(self, batch: int, ctx: int, reps: int) -> float | None:
        """One token for each of batch sequences of ctx tokens."""
        return self.mixed_ms(batch, ctx, 0, reps)

    def mixed_ms(self, batch: int, ctx: int, n: int, reps: int) -> float | None:
        """batch decoding sequences of ctx tokens and an n-token prefill chunk (none: n = 0) in one step."""
        seqs = [self.prepared(ctx, ctx - 1) for _ in range(batch)]
        extra = self.prepared(n, 0) if n else None
        try:
            if any(s is None for s in seqs) or (n and extra is None):
                return None
            return self.time_step([(s, 1) for s in seqs] + ([(extra, n)] if n else []), reps)
        finally:
            self.free([s for s in [*seqs, extra] if s is not None])

    def shared_decode_ms(self, batch: int, ctx: int, prefix: int, groups: int, reps: int) -> float | None:
        """One token for each of batch sequences of ctx tokens whose first `prefix` tokens are the blocks of one of
        `groups` prefixes (shared by reference, as prefix-cache hits are); None: no room in the KV pool."""
        bm = self.engine.block_manager
        owners = [self.prepared(prefix, prefix) for _ in range(groups)]
        seqs = []
        try:
            if any(o is None for o in owners):
                return None
            for i in range(batch):
                seq = self._seq(ctx)
                bm.fork(owners[i % groups], seq)
                seqs.append(seq)
                seq.num_computed_tokens = prefix
                if not bm.allocate(seq, ctx - prefix):
                    return None
                seq.num_computed_tokens = ctx - 1
            return self.time_step([(s, 1) for s in seqs], reps)
        finally:
            self.free([*seqs, *(o for o in owners if o is not None)])


class Pace:
    """Measured over estimated seconds of the points run so far, to correct the estimates of the rest."""

    def __init__(self):
        self.est_s, self.actual_s = 0.0, 0.0

    def add(self, est_s: float, actual_s: float) -> None:
        self.est_s, self.actual_s = self.est_s + est_s, self.actual_s + actual_s

    @property
    def ratio(self) -> float:
        return min(5.0, max(0.2, self.actual_s / self.est_s)) if self.est_s > 0 else 1.0


def empty_steps() -> dict:
    return dict(prefill=dict(n=[], c=[], ms=[]), decode=dict(batch=[], ctx=[], ms=[]),
                mixed=dict(batch=[], ctx=[], n=[], c=[], ms=[]))


def measure(timer, kind: str, p: Point, reps: int) -> float | None:
    if kind == "prefill":
        return timer.prefill_ms(p.n, p.c, reps)
    if kind == "decode":
        return timer.decode_ms(p.batch, p.ctx, reps)
    return timer.mixed_ms(p.batch, p.ctx, p.n, reps)


def record(data: dict, kind: str, p: Point, ms: float) -> None:
    # decode and mixed ctx: the batch's total context, tokens
    row = dict(prefill=dict(n=p.n, c=p.c), decode=dict(batch=p.batch, ctx=p.batch * p.ctx),
               mixed=dict(batch=p.batch, ctx=p.batch * p.ctx, n=p.n, c=0))[kind]
    for key, v in (*row.items(), ("ms", ms)):
        data[kind][key].append(v)


class StepRun:
    """Times a plan's components in turn against one deadline (seconds on clock), correcting the estimates by
    the pace so far."""

    def __init__(self, timer, plan: ProfilePlan, progress, clock):
        self.timer, self.plan, self.progress, self.clock = timer, plan, progress, clock
        self.data, self.pace, self.start = empty_steps(), Pace(), clock()
        self.deadline = self.start + plan.steps_budget_s

    def left_s(self, est_s: float) -> float:
        """Seconds left of the profile with est_s (estimated) of steps to go."""
        return self.pace.ratio * est_s + self.plan.transfer_est_s

    def run(self, comp: ComponentPlan, later_s: float) -> None:
        """comp's points, cheapest first; past its min_points, none that would end after the deadline less
        the time of the later components (later_s, estimated)."""
        total, ran = len(comp.points), 0
        for i, (p, est) in enumerate(zip(comp.points, comp.est_s)):
            self.update(comp.kind, i, total, sum(comp.est_s[i:]) + later_s)
            end = self.clock() + self.pace.ratio * (est + later_s)
            if i >= comp.min_points and end > self.deadline:
                logger.info("%s stopped at %d of %d points (time budget)", comp.kind, i, total)
                break
            t = self.clock()
            ms = measure(self.timer, comp.kind, p, comp.reps)
            self.pace.add(est, self.clock() - t)
            ran += 1
            if ms is not None:
                record(self.data, comp.kind, p, ms)
        self.update(comp.kind, ran, total, later_s)

    def update(self, stage: str, done: int, total: int, est_s: float) -> None:
        if self.progress:
            self.progress.update(stage, done, total, self.left_s(est_s))


def run_steps(timer, plan: ProfilePlan, progress=None, clock=time.monotonic) -> dict:
    """Time the plan's points within plan.steps_budget_s (each component keeps its min_points) -> the
    profile's prefill, decode and mixed columns."""
    steps = StepRun(timer, plan, progress, clock)
    comps = plan.components
    for i, comp in enumerate(comps):
        steps.run(comp, sum(c.total_s for c in comps[i + 1:]))
    logger.info("steps took %.0f s for an estimate of %.0f s", clock() - steps.start, plan.steps_est_s)
    return steps.data


def engine_limits(engine: LLMEngine) -> Limits:
    sched = engine.config.scheduler
    return Limits(sched.max_num_batched_tokens, sched.max_num_seqs, engine.max_model_len, engine.runner.num_blocks,
                  engine.config.cache.block_size)


def plan_engine(engine: LLMEngine, max_seconds: float, transfer: bool = False) -> ProfilePlan:
    """Probe engine's steps and plan a profile that takes about max_seconds (steps, and the KV transfer)."""
    return plan_profile(StepTimer(engine), engine_limits(engine), max_seconds, transfer, time.monotonic)


def profile_engine(engine: LLMEngine, progress=None, max_seconds: float = 90.0,
                   plan: ProfilePlan | None = None) -> dict:
    """Time prefill, decode and mixed steps: plan's points, else a plan for max_seconds (steps only); then the
    shared-decode points (shared_decode)."""
    plan = plan or plan_engine(engine, max_seconds)
    timer = StepTimer(engine)
    steps = run_steps(timer, plan, progress)
    shared = shared_decode(timer, engine_limits(engine))
    if shared["ms"]:
        steps["shared_decode"] = shared
    return steps


SHARED_PREFIX = 2048  # tokens: the shared-prefix workload's system prompt
SHARED_BATCHES = (16, 64)
SHARED_GROUPS = (1, 8)  # distinct prefixes in a batch
SHARED_REPS = 5


def shared_decode(timer, lim: Limits) -> dict:
    """Decode steps whose sequences share a prefix's blocks (as prefix-cache hits do) beside the same batch
    unshared, per batch of SHARED_BATCHES that the limits hold, SHARED_PREFIX (at most half of max_model_len)
    tokens of each sequence's ctx = prefix + 256 in one of SHARED_GROUPS prefixes: how much a step reads of shared
    context (fit.shared_read). Points the KV pool cannot hold are left out."""
    out = dict(batch=[], ctx=[], prefix=[], groups=[], ms=[], unique_ms=[])
    prefix = min(SHARED_PREFIX, lim.max_len // 2) // lim.block_size * lim.block_size
    ctx = prefix + 256
    if prefix <= 0 or ctx > lim.max_len:
        return out
    for batch in (b for b in SHARED_BATCHES if b <= lim.max_seqs):
        unique = timer.decode_ms(batch, ctx, SHARED_REPS)
        for groups in (g for g in SHARED_GROUPS if g < batch):
            ms = None if unique is None else timer.shared_decode_ms(batch, ctx, prefix, groups, SHARED_REPS)
            if ms is not None:
                for k, v in dict(batch=batch, ctx=ctx, prefix=prefix, groups=groups, ms=ms, unique_ms=unique).items():
                    out[k].append(v)
    return out


def transfer_pairs(device: str, tp: int = 1) -> list[tuple[str, str]]:
    """(prefill device, decode device): gloo on CPU; on a GPU the same-GPU pair, and the next GPU if any; with
    tp > 1, a worker's tp GPUs from `device` and the next tp for the decode worker."""
    if device == "cpu":
        return [("cpu", "cpu")]
    if tp > 1:
        first = int(device.split(":")[1]) if ":" in device else 0
        grp = lambda k: "+".join(f"cuda:{first + k + i}" for i in range(tp))  # noqa: E731
        return [(grp(0), grp(tp))] if torch.cuda.device_count() >= first + 2 * tp else []
    pairs = [(device, device)]
    if torch.cuda.device_count() > 1:
        idx = int(device.split(":")[1]) if ":" in device else 0
        pairs.append((device, f"cuda:{(idx + 1) % torch.cuda.device_count()}"))
    return pairs


def time_transfers(cs, lengths: tuple[int, ...], repeats: int, stage: str, progress, est_s: float,
                   budget_s: float | None) -> dict:
    """Handoffs of random prompts of each length, repeats times -> tokens, bytes, ms columns. est_s: the
    estimate of them all, shared by length (+ 64 tokens of overhead each) for the ETA and the budget_s
    check (past it no new length starts once 2 are done)."""
    out = dict(tokens=[], bytes=[], ms=[])
    rng, pace, begin = random.Random(0), Pace(), time.monotonic()
    sp = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    todo = [n for n in lengths for _ in range(repeats)]
    weights = [(n + 64) / sum(m + 64 for m in todo) * est_s for n in todo]
    for i, (n, est) in enumerate(zip(todo, weights)):
        if progress:
            progress.update(stage, i, len(todo), pace.ratio * sum(weights[i:]), unit="transfers")
        late = budget_s is not None and time.monotonic() + pace.ratio * est > begin + budget_s
        if late and i % repeats == 0 and len(set(out["tokens"])) >= 2:
            logger.info("KV transfer stopped before %d tokens (time budget)", n)
            break
        start = time.monotonic()
        t = cs.submit([rng.randrange(3, 256) for _ in range(n)], sp)
        cs.wait_transfer(t, 300)
        pace.add(est, time.monotonic() - start)
        if t.error is None and t.transfer_bytes and t.transfer_kind:
            out["tokens"].append(n), out["bytes"].append(t.transfer_bytes)
            out["ms"].append(t.transfer_s * 1e3)
    if progress:
        progress.update(stage, len(todo), len(todo), 0.0, unit="transfers")
    return out


SERVED_PROMPTS = 8  # the burst through the first pair that times the prefill worker as it serves


def time_served_prefill(cs, prompt_len: int, n: int = SERVED_PROMPTS, seed: int = 1) -> dict:
    """n prompts of prompt_len tokens sent at once through a prefill -> decode pair: when the last first token
    came (ms after the burst), what a prefill worker serves (its loop, the handoffs) against what its
    profiled steps alone predict (`pdcli fit` takes the ratio)."""
    rng = random.Random(seed)
    sp = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    ts = [cs.submit([rng.randrange(3, 256) for _ in range(prompt_len)], sp, mode="disaggregated") for _ in range(n)]
    for t in ts:
        t.done.wait(300)
    ok = [t for t in ts if t.error is None and t.first_token_time is not None]
    if len(ok) < n:
        raise RuntimeError(f"{n - len(ok)} of the {n} prompts of the served-prefill burst failed")
    began = min(t.arrival for t in ts)
    return dict(prompts=n, prompt_len=prompt_len, last_first_token_ms=(max(t.first_token_time for t in ok) - began) * 1e3)


def profile_transfer(model: str, device: str, engine_kwargs: dict, progress=None, lengths=TRANSFER_LENGTHS,
                     repeats: int = TRANSFER_REPEATS, est_s: float = 0.0, budget_s: float | None = None,
                     served: dict | None = None) -> dict:
    """KV transfer time vs tokens through real prefill -> decode worker pairs (transfer_pairs), prompts of
    each of lengths (tokens) handed off repeats times; est_s, budget_s: seconds, see time_transfers. served: a
    dict filled with the first pair's `time_served_prefill` of its longest length."""
    from pdcli.coordinator.central import CentralScheduler
    from pdcli.workers.layout import parse_layout, transfer_pair

    result = {}
    tp = engine_kwargs.get("tensor_parallel_size") or 1
    for pre, dec in transfer_pairs(device, tp):
        layout = parse_layout("", pre, dec, tp=tp)
        kind = transfer_pair(*layout)
        stage = f"KV transfer ({kind})"
        if progress:
            progress.update(stage, 0, len(lengths) * repeats, est_s, unit="transfers")
        with CentralScheduler(model, layout, mode="disaggregated", **engine_kwargs) as cs:
            rng = random.Random(0)
            sp = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
            cs.generate([[rng.randrange(3, 256) for _ in range(lengths[0])]], sp, timeout=300)  # warm-up: the
            # first transfer sets the path up (20 ms against 0.8 on the H100's same-GPU pair) and is not timed
            result[kind] = time_transfers(cs, lengths, repeats, stage, progress, est_s, budget_s)
            if served is not None and not served:
                served.update(time_served_prefill(cs, max(lengths)))
    return result


def provenance(engine: LLMEngine, model: str, command: str) -> dict:
    return dict(pdcli=__version__, torch=str(torch.__version__), cuda=str(torch.version.cuda), device=device_name(engine.device),
                model=model, dtype=str(engine.dtype), kernel_path=engine.runner.kernel_path, command=command,
                date=time.strftime("%Y-%m-%dT%H:%M:%S"))


def build_profile(engine: LLMEngine, model: str, steps: dict, transfer: dict, command: str,
                  max_seconds: float | None = None) -> dict:
    """max_seconds: the profile's time budget, kept in its provenance (a fit short of points asks for more)."""
    prov = dict(provenance(engine, model, command), **({} if max_seconds is None else dict(max_seconds=max_seconds)))
    return dict(schema_version=SCHEMA_VERSION, model=model, device=device_name(engine.device),
                max_num_batched_tokens=engine.config.scheduler.max_num_batched_tokens,
                kv_bytes_per_token=engine.arch.kv_bytes_per_token * engine.dtype.itemsize,
                provenance=prov, transfer=transfer, **steps)


def profile_transfer_net(model: str, device: str, engine_kwargs: dict, addr: tuple[str, int], node_timeout: float,
                         progress=None, lengths=TRANSFER_LENGTHS, repeats: int = TRANSFER_REPEATS, est_s: float = 0.0,
                         budget_s: float | None = None) -> dict:
    """The cross-node pair ("net"): a prefill worker on `device` here, the decode worker of the node that joins
    at addr (`pdcli node --node-rank 1 --decode DEVICE`); as profile_transfer otherwise."""
    from pdcli.cluster.fingerprint import model_fingerprint
    from pdcli.cluster.head import ClusterHead
    from pdcli.cluster.transport import authkey
    from pdcli.coordinator.central import CentralScheduler
    from pdcli.workers.layout import parse_layout

    stage = "KV transfer (net)"
    with CentralScheduler(model, parse_layout("", device, "", whole=False), mode="disaggregated", host=addr[0],
                          **engine_kwargs) as cs:
        head = ClusterHead(cs, addr, authkey(addr[0]), model_fingerprint(model, engine_kwargs))
        try:
            if progress:
                progress.say(f"waiting for node 1 (a decode worker) at {addr[0]}:{addr[1]}")
            head.wait_for(2, node_timeout)
            cs.pool.wait_pairs()
            if not cs.routing.pairs():
                raise RuntimeError("node 1 brought no decode worker that this prefill worker can reach")
            if progress:
                progress.update(stage, 0, len(lengths) * repeats, est_s, unit="transfers")
            rng = random.Random(0)
            sp = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
            cs.generate([[rng.randrange(3, 256) for _ in range(lengths[0])]], sp, timeout=300)  # warm-up
            return {"net": time_transfers(cs, lengths, repeats, stage, progress, est_s, budget_s)}
        finally:
            head.close()
