"""Latency under load, from the fitted cost model and a worker's load and forecast (router/load.py): what
the router predicts per path and what the planner simulates with. All times in ms.

TPOT on a decoding worker is the time of its steps over the request's life. Its batch then holds those
running now, which leave, and those that arrive meanwhile (Little's law: arrival rate x time in decode);
prompts that arrive meanwhile ride in its steps as prefill chunks, taking a share rho of the GPU's time, so
  TPOT = decode_step(forecast batch) x (1 + e x busy GPU neighbours) x m / (1 - rho)
where e is what a decoding neighbour adds to a step (CostModel.decode_neighbour_extra: profiled, else 1) and m
what the neighbours' prefills add while they run (prefill_stretch).
TTFT is the wait for the steps already scheduled, then the prompts queued ahead and its own chunks, and the
prompts that come before its last step is scheduled and join it (joining_ms), slowed by the GPU's neighbours.
"""
from __future__ import annotations

import math

from pdcli.router.cost_model import CostModel
from pdcli.router.load import WorkerLoad, committed_batch

MAX_RHO = 0.95  # a worker past this share of prefill work is saturated: its latencies grow without bound
# where when a worker's last step ended is not known (replays of runs that did not record it): the wait for
# the steps it has scheduled, in steps, as served runs measured it at low load (0.6-1.1 of a step, one H100)
UNSEEN_STEP_WAIT = 0.8


def lifetime_batch(now: float, steady: float, life_ms: float, mean_life_ms: float) -> float:
    """Average number of other sequences decoding beside a request over its life of life_ms: those running now
    leave at a uniform rate over a mean life (they are on average halfway), new ones arrive into a steady
    state of `steady` (M/G/inf)."""
    if mean_life_ms <= 0 or life_ms <= 0:
        return now
    x = life_ms / mean_life_ms
    if x <= 1:
        return now * (1 - x / 2) + steady * x / 2
    return now / (2 * x) + steady * (1 - 1 / (2 * x))


def prefill_share(cm: CostModel, w: WorkerLoad) -> float:
    """Share of the GPU's time its prefill work takes: the prompts routed per second to w and to the other
    workers on its GPU (under MPS a prefill beside a decode batch takes its share of the GPU), each costing its
    cost in the decode steps it rides on (CostModel.prefill_work_ms)."""
    if w.gpu_prefill_per_s is None:
        return _share(cm, w.prefill_per_s, w.prefill_tokens_per_s, w.prefill_sq_tokens_per_s)
    return _share(cm, w.gpu_prefill_per_s, w.gpu_prefill_tokens_per_s, w.gpu_prefill_sq_tokens_per_s)


def prefill_stretch(cm: CostModel, w: WorkerLoad, step_ms: float, backlog: float = 1.0) -> tuple[float, float]:
    """(rho, m): a decode step of w taking step_ms alone takes step_ms x m / (1 - rho) on average. Unmeasured
    (time-slicing): rho is all of the GPU's prefill share, m 1. Measured (`pdcli profile --sharing`): rho is w's
    own prompts' share (they ride in its steps); while the neighbours prefill (a fraction b of the time) each
    step gains beside_prefill_share of their step T, so a decode runs at (1 - b) / step + b / (step + share T)
    steps per ms (the harmonic mean: a slowed step makes fewer tokens, it does not cost more per token).
    backlog: the prefill work met over a span, as a multiple of what arrives during it (tpot_ms)."""
    total = prefill_share(cm, w) * backlog
    share = cm.beside_prefill_share
    if share is None:
        return min(total, MAX_RHO), 1.0
    own = _share(cm, w.prefill_per_s, w.prefill_tokens_per_s, w.prefill_sq_tokens_per_s) * backlog
    theirs = neighbour_prefill_step_ms(cm, w)
    if total <= own or theirs <= 0 or step_ms <= 0:
        return min(own, MAX_RHO), 1.0
    extra = cm.prompt_beside_decode_ms(theirs, step_ms)  # their steps beside our decode step
    stretch = 1 + (extra / theirs if extra is not None else cm.prefill_neighbour_extra)
    b = min(1.0, (total - own) * stretch)
    slow = step_ms + share * theirs
    return min(own, MAX_RHO), 1 / ((1 - b) + b * step_ms / slow)


def neighbour_prefill_step_ms(cm: CostModel, w: WorkerLoad) -> float:
    """The prefill step of the other workers on w's GPU as time sees it (a long prompt's steps weigh by their
    length): one of the size-biased mean prompt length (sum of squares / sum) of what is routed to them, at most
    a full chunk."""
    if w.gpu_prefill_tokens_per_s is None:
        return 0.0
    tokens = w.gpu_prefill_tokens_per_s - w.prefill_tokens_per_s
    squares = (w.gpu_prefill_sq_tokens_per_s or 0.0) - w.prefill_sq_tokens_per_s
    if tokens <= 0:
        return 0.0
    n = squares / tokens if squares > 0 else tokens / max(w.gpu_prefill_per_s - w.prefill_per_s, 1e-9)
    return float(cm.prefill_ms(int(min(max(n, 1.0), cm.max_num_batched_tokens))))


def _share(cm: CostModel, per_s: float, tokens: float, squares: float) -> float:
    if tokens <= 0:
        return 0.0
    if not squares:  # a load without the squares (older records): all prompts of the mean length
        squares = tokens * tokens / max(per_s, 1e-9)
    return cm.prefill_work_rate_ms(per_s, tokens, squares) / 1e3


def step_ms(cm: CostModel, w: WorkerLoad, stretched: bool = True) -> float:
    """A step of worker w's decode batch now, slowed by its decode neighbours and stretched by the GPU's prefill
    share (on average over the steps to come; stretched=False: a step whose content is known, no prompts)."""
    alone = float(cm.decode_ms(w.decode_batch, w.decode_ctx))
    rho, m = prefill_stretch(cm, w, alone)
    step = alone * (1 + cm.decode_neighbour_extra * w.sharing) * m
    return step / (1 - rho) if stretched else step


def split_queue(cm: CostModel, w: WorkerLoad) -> tuple[int, int]:
    """(queued prompt tokens riding in the steps worker w has already scheduled, those ahead of a prompt
    arriving now). Steps are scheduled two ahead with async scheduling, else one; they hold the prompts that
    came before the running step began (load.mark_step), up to their token budget. With no step seen, all are
    ahead."""
    if w.since_step_ms is None:
        return 0, w.queued_prefill_tokens
    budget = (2 if w.async_steps else 1) * max(1, cm.max_num_batched_tokens - w.decode_batch)
    older = w.queued_prefill_tokens - w.queued_since_step_tokens
    held = min(older, budget)
    return held, w.queued_since_step_tokens + older - held


def queued_sq(w: WorkerLoad, tokens: int) -> float:
    """The part of w's queued squared prompt lengths that goes with `tokens` of its queued tokens (pro rata)."""
    return w.queued_prefill_sq_tokens * tokens / w.queued_prefill_tokens if w.queued_prefill_tokens else 0.0


def start_wait_ms(cm: CostModel, w: WorkerLoad, prefill_scale: float = 1.0, prefill_step_extra: float = 0.0) -> float:
    """Expected wait before a prompt arriving now runs its first step on worker w: the steps already scheduled
    (the one running and, with async scheduling, the one behind it), priced by the cost model (decode rows and
    the prompts they hold, these as ttft_ms prices a prompt's steps on w: x prefill_scale, + prefill_step_extra
    ms beside the GPU's neighbours) less the time since the running step began, at least one step with async
    scheduling; in a replay that did not record when steps ended, what served runs measured at low load."""
    held, _ = split_queue(cm, w)
    steps = 2 if w.async_steps else 1
    if not (w.decode_batch or held):
        return 0.0
    step = scheduled_step_ms(cm, w) if w.decode_batch else 0.0  # the prompts they hold are priced apart
    if not w.steps_seen:  # a replay of a run that did not record when steps ended
        return UNSEEN_STEP_WAIT * step if w.async_steps else 0.5 * step
    if w.since_step_ms is None:  # no step yet
        return 0.0
    sq = queued_sq(w, held)
    prompts = (cm.prefill_in_decode_ms(held, w.decode_batch, w.decode_ctx, sq) if w.decode_batch
               else cm.queued_prefill_ms(held, sq_tokens=sq))
    scheduled = steps * step + (prompts * prefill_scale + prefill_step_extra if held else 0.0)
    return max(scheduled - w.since_step_ms, step if steps > 1 else 0.0)


def scheduled_step_ms(cm: CostModel, w: WorkerLoad) -> float:
    """A decode step of w already scheduled: beside its decoding neighbours and, while a neighbour on its GPU has
    prompts queued, beside that neighbour's prefill step (CostModel.decode_beside_prefill_ms: one H100, a 7.9 ms
    step took 77 ms beside 8k-token prefills); else stretched by the neighbours' prefill on average (step_ms).
    The first needs the profile's unequal-length grid: the share measured at equal lengths, taken at an 8k
    neighbour, priced these waits on top of prompt steps it already over-priced (one H100, adaptive on bimodal:
    the collocated path's median TTFT error 14% -> 21% before calibration)."""
    theirs = neighbour_chunk_ms(cm, w) if "decode_beside_prefill_points" in cm.sharing else 0.0
    if not theirs:
        return step_ms(cm, w, stretched=False)
    alone = float(cm.decode_ms(w.decode_batch, w.decode_ctx))
    steps = 2 if w.async_steps else 1  # the extra of the steps scheduled, at most the neighbour's prefill left
    extra = min(cm.decode_beside_prefill_ms(alone, theirs), neighbour_prefill_left_ms(cm, w) / steps)
    return alone * (1 + cm.decode_neighbour_extra * w.sharing) + extra


def neighbour_prefill_left_ms(cm: CostModel, w: WorkerLoad) -> float:
    """The GPU neighbours' queued prefill (their steps of it), less how far into it they are when that is known."""
    q, b, ctx = w.neighbour_queued_tokens, w.neighbour_decode_batch, w.neighbour_decode_ctx
    if q <= 0:
        return 0.0
    return max(0.0, float(cm.queued_prefill_ms(q, b, ctx)) - (w.neighbour_since_step_ms or 0.0))


def neighbour_chunk_ms(cm: CostModel, w: WorkerLoad) -> float:
    """The step of w's GPU neighbours now if they have prompts queued (their next chunk beside their decode
    batch), else 0."""
    q, b = w.neighbour_queued_tokens, w.neighbour_decode_batch
    if q <= 0:
        return 0.0
    return float(cm.step_ms(b, w.neighbour_decode_ctx, [(min(q, max(1, cm.max_num_batched_tokens - b)), 0)]))


def ttft_ms(cm: CostModel, w: WorkerLoad, prompt_len: int, cached: int = 0) -> float:
    """Until the prompt's first token on worker w: the wait for the steps it has already scheduled, then the
    queued prompts ahead of it and its own chunks beside its decode batch (less the `cached` leading tokens
    its prefix cache holds), each step slowed by what the other workers on its GPU run beside it (neighbour_ms)."""
    _, ahead = split_queue(cm, w)
    work = cm.queued_prefill_ms(ahead, w.decode_batch, w.decode_ctx, queued_sq(w, ahead)) + \
        cm.chunked_prefill_ms(prompt_len, w.decode_batch, w.decode_ctx, cached)
    served = cm.prefill_role_scale if w.role == "prefill" else 1.0  # a dedicated prefill worker as profiled serving
    budget = max(1, cm.max_num_batched_tokens - w.decode_batch)
    own_steps = -(-(ahead + max(0, prompt_len - cached)) // budget)
    own_step = work * served / max(own_steps, 1)  # one of its steps alone
    per_step = neighbour_ms(cm, w, 1, own_step)
    slow = 1 + cm.prefill_neighbour_extra * w.sharing if per_step is None else 1.0  # unmeasured: a factor
    wait = start_wait_ms(cm, w, served * slow, per_step or 0.0)  # a running step's prompts run as ours do
    work += joining_ms(cm, w, wait, work, own_steps * budget - ahead - max(0, prompt_len - cached), own_steps)
    beside = neighbour_ms(cm, w, own_steps, own_step)
    return wait + work * served * slow + (beside or 0.0)


def joining_ms(cm: CostModel, w: WorkerLoad, wait_ms: float, work_ms: float, room: int, steps: int) -> float:
    """What the prompts that arrive before the step holding a prompt's last chunk is scheduled add to that step
    (they join it behind it, first come first served, up to its token budget's room): over that window (the
    wait for the running step, less with async scheduling the step already planned behind it, and the prompt's
    earlier steps) the median of a Poisson count of the forecast's prompts (floor(x + 1/3 - 0.02 / x) for x
    expected), each of the forecast's typical length: mean^3 / mean of squares, the mean for prompts of one
    length, near the common length of a skewed mix (bimodal's 90% of 256 and 10% of 8k-12k: ~350 tokens where the
    mean is ~1,800; behind a long prompt a short one met 2 joiners priced as 3,600 tokens, ~80 ms too many: with
    the typical length the collocated bimodal runs' median TTFT error went from 9-17% to 6-14% on one H100). The
    median count, since the router prices the typical prompt: with x < 0.7 most meet none (in the simulator, where
    the cost model is exact, the median TTFT came out exact; the mean, put on every prompt, over-predicted it by
    2-13%). On one H100's prefill worker (1024-token prompts at 32 req/s, budget 8192) a step held 1-5 prompts:
    the fifth's first token came 150 ms after the first's."""
    if room <= 0 or w.prefill_per_s <= 0:
        return 0.0
    step = float(cm.decode_ms(w.decode_batch, w.decode_ctx)) if w.decode_batch else 0.0
    window = max(0.0, wait_ms - step if w.async_steps else wait_ms) + work_ms * (steps - 1) / max(steps, 1)
    x = w.prefill_per_s * window / 1e3
    count = math.floor(x + 1 / 3 - 0.02 / x) if x > 0 else 0
    if count <= 0:
        return 0.0
    mean_len = w.prefill_tokens_per_s / w.prefill_per_s
    typical = min(mean_len, mean_len ** 3 * w.prefill_per_s / w.prefill_sq_tokens_per_s) \
        if w.prefill_sq_tokens_per_s > 0 else mean_len
    tokens = min(float(room), count * typical)
    return cm.joined_prefill_ms(tokens, w.decode_batch, tokens * min(tokens, typical))


def neighbour_ms(cm: CostModel, w: WorkerLoad, steps: int, own_step_ms: float) -> float | None:
    """What `steps` prompt-carrying steps of worker w, each own_step_ms alone, gain beside the other workers on its
    GPU: each a share of the neighbours' step (CostModel.prompt_beside_prefill_ms while they have prompts queued,
    capped by their remaining prefill; else CostModel.prompt_beside_decode_ms of each decoding neighbour's step).
    None where that share is unmeasured or nothing is known to run beside it (then the decoding-neighbour factor
    prices it, 1 without busy neighbours)."""
    q, b, ctx = w.neighbour_queued_tokens, w.neighbour_decode_batch, w.neighbour_decode_ctx
    if q <= 0 and b <= 0:
        return None
    if steps <= 0:
        return 0.0
    if q > 0:
        extra = cm.prompt_beside_prefill_ms(own_step_ms, neighbour_chunk_ms(cm, w))
        return None if extra is None else min(steps * extra, neighbour_prefill_left_ms(cm, w))
    k = max(1, w.neighbour_decoders)  # each decoding neighbour runs its own steps: k steps of the mean batch
    extra = cm.prompt_beside_decode_ms(own_step_ms, float(cm.decode_ms(b / k, ctx / k)))
    return None if extra is None else steps * k * extra


def tpot_ms(cm: CostModel, w: WorkerLoad, prompt_len: int, out_len: float, iterations: int = 4,
            held_ms: float = 0.0) -> float:
    """Time per output token of a request decoding on worker w (see the module's docstring). held_ms: how long
    its own prompt's steps held the prefilling worker's token budget: the prompts routed there meanwhile queued
    behind it and are prefilled during its decode, on top of those that arrive during it (a long prompt's
    backlog: with it, bimodal's 8k-12k prompts decode at 0.95-1.41x their raw prediction on one H200,
    `long_tpot_over_raw` in results/router_nvidia-h200.json; a short prompt's steps end before much queues)."""
    out_len = max(out_len, 1.0)
    mean_out = w.mean_output_len or out_len
    ctx_per_seq = w.decode_ctx / w.decode_batch if w.decode_batch else prompt_len + out_len / 2
    now = committed_batch(w)  # with those on their way here
    slow = 1 + cm.decode_neighbour_extra * w.sharing_avg  # decode batches of other workers on the GPU
    tpot = float(cm.decode_ms(now + 1, ctx_per_seq * now + prompt_len + out_len / 2)) * slow
    for _ in range(iterations):  # the batch depends on how long decodes last, which depends on the batch
        steady = w.decode_per_s * mean_out * tpot / 1e3
        batch = lifetime_batch(now, steady, out_len * tpot, mean_out * tpot) + 1
        ctx = (batch - 1) * ctx_per_seq + prompt_len + out_len / 2  # with its own
        life = out_len * tpot
        rho, m = prefill_stretch(cm, w, float(cm.decode_ms(batch, ctx)), (life + held_ms) / life)
        # at most every step carries a full chunk of prompt tokens: past that, prompts queue (TTFT grows)
        full = float(cm.mixed_ms(batch, ctx, max(1, cm.max_num_batched_tokens - int(batch)), attention=False))
        tpot = min(float(cm.decode_ms(batch, ctx)) / (1 - rho), full) * slow * m
    return tpot
