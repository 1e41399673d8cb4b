"""The plan of `pdcli profile`: which step shapes to time, and how often, to fit the device and a time budget.

A few probe steps give step-time estimates (StepCosts: linear in the tokens of a prefill, in batch and
context of a decode, plus padded attention in a mixed step). Each component (prefill, decode, mixed) takes
the shape grid of the full plan (the one a GPU runs: chunks 16..8192 tokens after 0..16k cached ones, decode
batches 1..256 at 128..4096 tokens each, mixed steps between them) divided by the smallest power of two
whose estimate fits its share of the budget (STEP_SHARES) while keeping the distinct shapes its fit needs
(PLAN_NEEDS), with 3 repeats, else 2, else (smallest grid) 1; mixed steps stay within the prefill and decode
grids. Points run cheapest first, so a component cut short by the deadline keeps its spread. The KV transfer
takes the longest prompt lengths whose handoffs fit its share (TRANSFER_SHARE).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

logger = logging.getLogger("pdcli.profile")

FULL_CHUNK, FULL_CTX, FULL_BATCH, FULL_SEQ_CTX, FULL_MIXED_CTX = 8192, 16384, 256, 4096, 512  # tokens | seqs
MIXED_SHORT_CHUNK = 256  # tokens: bimodal's short prompt (one H100: 16-256-token prefills alone took 9.1-9.6 ms,
# launch-bound, where the mixed fit put a 256-token chunk at +1.5 ms over a batch-32 decode step)
MIXED_MID_BATCH = 16  # sequences: served 1024-2048-token prompts ride on decode batches of ~20-40 (one H100,
# random and mixed, 2026-12-06), where the fit, between its batch-4 and batch-64 points, ran ~6% over
SCALES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
STEP_SHARES = dict(prefill=0.45, decode=0.25, mixed=0.30)  # of the step budget
TRANSFER_SHARE = 0.25  # of the whole budget, when the KV transfer is measured
TRANSFER_LENGTHS = (16, 64, 256, 1024, 2048)  # prompt tokens, the full plan
TRANSFER_REPEATS = 3
TRANSFER_STEP_FACTOR = 2.0  # a handoff costs about 2 prefill steps of its length (the two workers share a CPU)
ALLOC_S_PER_TOKEN = 1e-6  # building and allocating a profiled sequence, per token
PROBE_STEP_SHARE = 0.02  # of the budget: no probe step doubles past this (its two runs)
# component -> (points, {shape: distinct values}) the planner asks of a grid: 2x the fit's parameters at least
PLAN_NEEDS = dict(prefill=(10, dict(n=4, c=3)), decode=(8, dict(batch=3, ctx=2)), mixed=(6, dict(batch=2, n=3)))


@dataclass(frozen=True)
class Limits:
    max_tokens: int  # tokens in one step
    max_seqs: int  # sequences in one step
    max_len: int  # tokens in one sequence
    kv_blocks: int
    block_size: int  # tokens per KV block

    def blocks(self, tokens: int) -> int:
        return -(-tokens // self.block_size)


@dataclass(frozen=True, order=True)
class Point:
    n: int = 0  # prefill chunk, tokens
    c: int = 0  # cached prefix before the chunk, tokens
    batch: int = 0  # decoding sequences
    ctx: int = 0  # context of each decoding sequence, tokens


@dataclass(frozen=True)
class StepCosts:
    """Linear step-time estimates in ms from the probe steps."""
    fixed_ms: float  # a prefill step's overhead
    token_ms: float  # per prefill token
    pair_ms: float  # per (new token, attended token) pair
    decode_fixed_ms: float
    row_ms: float  # per decoding sequence
    cross_ms: float = 0.0  # mixed steps, per (sequence, query row, key) of attention padded to the longest ones

    def prefill_ms(self, n: int, c: int) -> float:
        return self.fixed_ms + self.token_ms * n + self.pair_ms * n * (c + n / 2)

    def decode_ms(self, batch: int, ctx: int) -> float:
        return self.decode_fixed_ms + self.row_ms * batch + self.pair_ms * batch * ctx

    def point_ms(self, kind: str, p: Point) -> float:
        if kind == "prefill":
            return self.prefill_ms(p.n, p.c)
        if kind == "decode":
            return self.decode_ms(p.batch, p.ctx)
        return self.additive_ms(p.batch, p.ctx, p.n) + self.cross_ms * padded(p.batch, p.ctx, p.n)

    def additive_ms(self, batch: int, ctx: int, n: int) -> float:
        """A mixed step as a decode step and a prefill step sharing one step's overhead."""
        return self.decode_ms(batch, ctx) + self.prefill_ms(n, 0) - min(self.fixed_ms, self.decode_fixed_ms)


def padded(batch: int, ctx: int, n: int) -> int:
    """(sequence, query, key) triples of a mixed step's attention padded to its longest query and context."""
    return (batch + 1) * n * max(n, ctx)


@dataclass(frozen=True)
class ComponentPlan:
    kind: str  # prefill | decode | mixed
    points: tuple[Point, ...]  # cheapest first
    est_s: tuple[float, ...]  # estimated seconds of each point, warm-up run and allocation included
    reps: int  # timed runs per point (after one warm-up run)
    scale: int  # the full grid divided by this
    min_points: int  # run the first ones whatever the deadline

    @property
    def total_s(self) -> float:
        return sum(self.est_s)


@dataclass(frozen=True)
class ProfilePlan:
    components: tuple[ComponentPlan, ...]
    steps_budget_s: float  # for the planned points, the probes' time taken off
    transfer_lengths: tuple[int, ...]  # prompt tokens; empty: no transfer
    transfer_repeats: int
    transfer_est_s: float
    transfer_budget_s: float  # past it, the transfer stops once it has 2 lengths
    costs: StepCosts

    @property
    def steps_est_s(self) -> float:
        return sum(c.total_s for c in self.components)


def ladder(lo: int, hi: int, k: int) -> tuple[int, ...]:
    """Powers of two lo..hi thinned from the bottom, every other one, to at most k:
    (16, 8192, 7) -> 16 64 256 1024 2048 4096 8192; (1, 256, 6) -> 1 4 16 64 128 256."""
    lo = max(1, min(lo, hi))
    vals = [lo << i for i in range(40) if lo << i <= hi]
    i = 1
    while len(vals) > k and i < len(vals) - 1:
        del vals[i]
        i += 1
    return tuple(vals)


def every_other(vals: tuple[int, ...], k: int = 3) -> tuple[int, ...]:
    """vals[1::2] (the full plan's mixed shapes) while it keeps k values, else vals[::2], else vals."""
    return next((v for v in (vals[1::2], vals[::2]) if len(v) >= k), vals)


def _round16(x: int) -> int:
    return x // 16 * 16


def prefill_grid(lim: Limits, s: int) -> list[Point]:
    chunks = ladder(16, min(FULL_CHUNK // s, lim.max_tokens, lim.max_len // 2), 7)  # room for prefixes
    top = _round16(max(0, min(FULL_CTX // s, lim.max_len - chunks[-1])))
    ctxs = sorted({0, *(_round16(top // d) for d in (16, 4, 1))})
    return [Point(n=n, c=c) for c in ctxs for n in chunks
            if n + c <= lim.max_len and lim.blocks(n + c) <= lim.kv_blocks]


def decode_batches(lim: Limits, s: int) -> tuple[int, ...]:
    return ladder(1, min(FULL_BATCH // s, lim.max_seqs), 6)


def decode_grid(lim: Limits, s: int) -> list[Point]:
    top = min(FULL_SEQ_CTX // s, lim.max_len)
    ctxs = sorted({max(16, min(top, top // d)) for d in (32, 4, 1)})
    return [Point(batch=b, ctx=x) for x in ctxs for b in decode_batches(lim, s) if b * lim.blocks(x) <= lim.kv_blocks]


def mixed_grid(lim: Limits, s: int) -> list[Point]:
    """Decode batches beside chunks of every other size, beside the largest chunk and beside a short prompt's:
    a long prompt's steps ride on decode batches with a full chunk (8192 tokens), which the fit extrapolated to
    from 4096 until 2026-12-05; a short prompt (MIXED_SHORT_CHUNK) rides on them where its prefill alone sits on
    the launch-bound floor, which the fit interpolated to from 64 and 1024 until 2026-12-05 night; and beside a
    middle decode batch (MIXED_MID_BATCH), where served prompts ride, interpolated from 4 and 64 until 2026-12-06."""
    ctx = max(16, min(FULL_MIXED_CTX // s, lim.max_len))
    sizes = ladder(16, min(FULL_CHUNK // s, lim.max_tokens, lim.max_len - ctx), 7)
    short = [n for n in sizes if n == MIXED_SHORT_CHUNK // s]
    chunks = tuple(sorted({*every_other(sizes), sizes[-1], *short}))
    batches = decode_batches(lim, s)
    mid = [b for b in batches if b == MIXED_MID_BATCH // s]
    pts = {Point(n=max(1, min(n, lim.max_tokens - b)), batch=b, ctx=ctx)
           for b in {*every_other(batches), *mid} for n in chunks}
    return sorted(p for p in pts if p.batch * lim.blocks(ctx) + lim.blocks(p.n) <= lim.kv_blocks)


GRIDS = dict(prefill=prefill_grid, decode=decode_grid, mixed=mixed_grid)


def meets(kind: str, points: list[Point]) -> bool:
    count, distinct = PLAN_NEEDS[kind]
    return len(points) >= count and all(len({getattr(p, f) for p in points}) >= k for f, k in distinct.items())


def point_s(costs: StepCosts, kind: str, p: Point, reps: int) -> float:
    tokens = p.n + p.c + p.batch * p.ctx
    return (reps + 1) * costs.point_ms(kind, p) / 1e3 + ALLOC_S_PER_TOKEN * tokens


def component_plan(kind: str, points: list[Point], costs: StepCosts, reps: int, s: int) -> ComponentPlan:
    """points cheapest first; the mandatory ones: the shortest such prefix with the shapes of PLAN_NEEDS."""
    est = sorted((point_s(costs, kind, p, reps), p) for p in points)
    ordered = [p for _, p in est]
    need = next((k for k in range(1, len(ordered) + 1) if meets(kind, ordered[:k])), len(ordered))
    return ComponentPlan(kind, tuple(ordered), tuple(t for t, _ in est), reps, s, need)


def plan_component(kind: str, costs: StepCosts, lim: Limits, budget_s: float, min_scale: int = 1) -> ComponentPlan:
    """The largest grid (smallest scale, min_scale at least) that keeps enough shapes and fits budget_s, with 3
    repeats, else 2; failing that the smallest grid that keeps enough shapes, with 1."""
    grids = [(s, GRIDS[kind](lim, s)) for s in SCALES if s >= min_scale]
    valid = [(s, g) for s, g in grids if meets(kind, g)]
    for s, grid in valid:
        for reps in (3, 2):
            plan = component_plan(kind, grid, costs, reps, s)
            if plan.total_s <= budget_s:
                return plan
    s, grid = valid[-1] if valid else max(grids, key=lambda sg: len(sg[1]))
    plan = component_plan(kind, grid, costs, 1, s)
    if valid:
        logger.warning("the smallest %s plan (%d points) takes ~%.0f s, over its budget of %.0f s",
                       kind, len(grid), plan.total_s, budget_s)
    else:
        logger.warning("no %s grid has the shapes its fit needs within these engine limits (%s)", kind, lim)
    return plan


def transfer_lengths(top: int) -> tuple[int, ...]:
    """The full plan's lengths up to top, else (fewer than 4) powers of two up to top, at most 5."""
    lens = tuple(n for n in TRANSFER_LENGTHS if n <= top)
    return lens if len(lens) >= 4 else ladder(16, top, 5)


def plan_transfer(costs: StepCosts, lim: Limits, budget_s: float) -> tuple[tuple[int, ...], float]:
    """The longest prompt lengths whose handoffs (TRANSFER_REPEATS each) fit budget_s -> (lengths, est s)."""
    cap = min(TRANSFER_LENGTHS[-1], lim.max_len - 2)  # each prompt decodes 2 tokens
    for top in [t for t in (2048, 1024, 512, 256, 128, 64) if t <= cap] or [cap]:
        lens = transfer_lengths(top)
        est = TRANSFER_REPEATS * sum(TRANSFER_STEP_FACTOR * costs.prefill_ms(n, 0) / 1e3 for n in lens)
        if est <= budget_s:
            break
    return lens, est


def probe_prefill(timer, lim: Limits, cap_ms: float) -> tuple[float, float, float, int]:
    """(fixed ms, ms per token, ms per attended pair, last chunk): chunks 16, 32, ... until one takes 4x the
    first (or the next would take over cap_ms), then the last one after a cached prefix of 4x its length."""
    n, first = 16, timer.prefill_ms(16, 0, 1)
    last = first
    while last < 4 * first and 2 * last <= cap_ms and 2 * n <= min(lim.max_tokens, lim.max_len):
        t = timer.prefill_ms(2 * n, 0, 1)
        if t is None:
            break
        n, last = 2 * n, t
    token = (last - first) / (n - 16) if n > 16 else first / 16
    c = _round16(min(4 * n, lim.max_len - n))
    with_prefix = timer.prefill_ms(n, c, 1) if c > 0 else None
    pair = max(0.0, (with_prefix - last) / (n * c)) if with_prefix is not None else token / 4096
    return max(0.0, first - 16 * token), max(token, 1e-6), pair, n


def probe_decode(timer, lim: Limits, pair_ms: float, cap_ms: float) -> tuple[float, float, int]:
    """(fixed ms, ms per sequence, last batch): batches 1, 2, ... of 128-token contexts until one takes 4x the
    first (or the next would take over cap_ms)."""
    ctx = min(128, lim.max_len)
    b, first = 1, timer.decode_ms(1, ctx, 1)
    last = first
    while last < 4 * first and 2 * last <= cap_ms and 2 * b <= lim.max_seqs and \
            2 * b * lim.blocks(ctx) <= lim.kv_blocks:
        t = timer.decode_ms(2 * b, ctx, 1)
        if t is None:
            break
        b, last = 2 * b, t
    row = (last - first) / (b - 1) if b > 1 else first / 2
    return max(0.0, first - row - pair_ms * ctx), max(row, 1e-6), b


def probe_costs(timer, lim: Limits, budget_s: float) -> StepCosts:
    """Prefill and decode probes, then one mixed step of their largest shapes (at most 8 sequences): what it
    takes over their sum goes to the padded attention (cross_ms)."""
    cap_ms = PROBE_STEP_SHARE * budget_s * 1e3 / 2  # one run of a probe step
    fixed, token, pair, n = probe_prefill(timer, lim, cap_ms)
    decode_fixed, row, b = probe_decode(timer, lim, pair, cap_ms)
    costs = StepCosts(fixed, token, pair, decode_fixed, row)
    b, ctx = min(b, 8), min(128, lim.max_len)
    n = max(1, min(n, lim.max_tokens - b))
    t = timer.mixed_ms(b, ctx, n, 1)
    cross = max(0.0, (t - costs.additive_ms(b, ctx, n)) / padded(b, ctx, n)) if t is not None else 0.0
    return StepCosts(fixed, token, pair, decode_fixed, row, cross)


def plan_profile(timer, lim: Limits, budget_s: float, transfer: bool, clock) -> ProfilePlan:
    """Probe, then share budget_s (seconds, probes included) among the components and the KV transfer."""
    start = clock()
    costs = probe_costs(timer, lim, budget_s)
    steps_s = max(0.0, budget_s * (1 - TRANSFER_SHARE if transfer else 1) - (clock() - start))
    pre, dec = (plan_component(kind, costs, lim, STEP_SHARES[kind] * steps_s) for kind in ("prefill", "decode"))
    # mixed steps within the shapes measured alone: their fit uses the prefill and decode marginal costs
    mix = plan_component("mixed", costs, lim, STEP_SHARES["mixed"] * steps_s, max(pre.scale, dec.scale))
    comps = (pre, dec, mix)
    transfer_budget_s = budget_s * TRANSFER_SHARE if transfer else 0.0
    lens, transfer_s = plan_transfer(costs, lim, transfer_budget_s) if transfer else ((), 0.0)
    plan = ProfilePlan(comps, steps_s, lens, TRANSFER_REPEATS, transfer_s, transfer_budget_s, costs)
    logger.info("profile plan: %s; %s", costs, describe(plan))
    return plan


def describe(plan: ProfilePlan) -> str:
    """One line: the points, shapes and repeats of each component, the transfer lengths, the estimate."""
    parts = []
    for c in plan.components:
        shapes = {f: sorted({getattr(p, f) for p in c.points}) for f in PLAN_NEEDS[c.kind][1]}
        spread = ", ".join(f"{f} {v[0]}..{v[-1]} ({len(v)})" for f, v in shapes.items())
        parts.append(f"{c.kind} {len(c.points)} points ({spread}) x{c.reps}")
    if plan.transfer_lengths:
        parts.append(f"KV transfer at {'/'.join(map(str, plan.transfer_lengths))} tokens x{plan.transfer_repeats}")
    return f"{'; '.join(parts)}; ~{plan.steps_est_s + plan.transfer_est_s:.0f} s"
