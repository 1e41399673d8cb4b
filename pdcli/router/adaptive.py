"""The adaptive router: predict TTFT, TPOT and end-to-end latency of a request on each path from the cost
model, the predicted output length, the live state of the workers and the forecast of what is coming to
them (router/latency.py), corrected by what finished requests measured; choose the path that costs the
fewest SLO misses counting the requests already there (router/decision.py). Every decision keeps its
predictions."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from pdcli.router.calibration import CalibrationConfig, LatencyCalibration
from pdcli.router import decision, latency
from pdcli.router.cost_model import CostModel
from pdcli.router.load import WorkerLoad
from pdcli.router.predictor import OutputLengthPredictor


@dataclass
class Decision:
    path: str
    predicted: dict = field(default_factory=dict)  # path -> {ttft_ms, tpot_ms, e2e_ms}, calibrated
    predicted_raw: dict = field(default_factory=dict)  # the same from the cost model alone
    roles: dict = field(default_factory=dict)  # path -> {metric: role of the worker running that phase}
    output_len: float = 0.0
    decided_by: str = "cost-model"  # or "exploration" (a path left unused gets a request now and then)
    scores: dict = field(default_factory=dict)  # path -> expected SLO misses (with SLOs) or total added ms
    pair_index: int = 0  # the handoff pair priced for the disaggregated path: 0 the given one, i alternatives[i - 1]


PAIRS_PRICED = 2  # the router prices the handoff pairs among this many least loaded prefill and decode workers
# ... for prompts whose prefill stalls a decode batch for at least this many steps (in the simulator on 2x H100,
# pricing both directions for every prompt took random 1024 -> 128 from 94% to 85% attainment at 48 req/s: the
# greedy choice piled decodes on one GPU; for bimodal's long prompts it made a prefill GPU, 64% -> 98% at 20)
LONG_PREFILL_STEPS = 10


def pair_candidates(pairs: list[tuple], prefill_key, decode_key, k: int = PAIRS_PRICED) -> list[tuple]:
    """The handoff pairs worth pricing: the least loaded pair first (by prefill_key of its prefill worker, then
    decode_key of its decode worker), then those between the k workers that can prefill with the least
    prefill_key (e.g. queued prompt tokens) and the k that can decode with the least decode_key (e.g. sequences
    decoding or on their way). On two GPUs serving each other both directions get priced: the pair the load
    alone picks made a prefill GPU of whichever was idler, and bimodal traffic lost half its goodput to it in the
    simulator."""
    if not pairs:
        return []
    by = lambda ws, key: {id(w) for w in sorted({id(w): w for w in ws}.values(), key=key)[:k]}  # noqa: E731
    pres, decs = by((p for p, _ in pairs), prefill_key), by((d for _, d in pairs), decode_key)
    order = lambda pd: (prefill_key(pd[0]), decode_key(pd[1]))  # noqa: E731
    least = min(pairs, key=order)
    return [least] + sorted((pd for pd in pairs if pd is not least and id(pd[0]) in pres and id(pd[1]) in decs),
                            key=order)



BESIDE_PREFILL = ":beside-prefill"  # a TTFT priced while a GPU neighbour had prompts queued: calibrated apart


def calibration_roles(pre: WorkerLoad, dec: WorkerLoad) -> dict:
    """metric -> the key its calibration learns under: the role of the worker that runs that phase, and for TTFT
    whether a neighbour on its GPU was prefilling when it was priced. Those prompts' steps run beside the
    neighbour's chunks and miss by tens of ms more than the others (one H100, adaptive on bimodal, 8 req/s: 194 ms
    measured against 116 priced at the median, where the others were 25 / 25): one offset learnt over both moved
    the others' TTFT 15% -> 25% off."""
    beside = BESIDE_PREFILL if pre.neighbour_queued_tokens > 0 else ""
    return dict(ttft_ms=pre.role + beside, tpot_ms=dec.role)

class AdaptiveRouter:
    name = "adaptive"

    def __init__(self, model: CostModel, slo_ttft_ms: float | None = None, slo_tpot_ms: float | None = None,
                 predictor: OutputLengthPredictor | None = None, slo_ttft_per_token_ms: float = 0.0,
                 calibration: CalibrationConfig = CalibrationConfig()):
        self.cm, self.slo = model, decision.Slo(slo_ttft_ms, slo_tpot_ms, slo_ttft_per_token_ms)
        self.predictor = predictor or OutputLengthPredictor()
        self.calibration = LatencyCalibration(calibration)
        self.chooser = decision.PathChooser()

    def predict(self, prompt_len: int, out_len: float, coll: WorkerLoad | None, pre: WorkerLoad | None,
                dec: WorkerLoad | None, pair: str = "default", cached: dict | None = None) -> dict:
        """pair: how KV would move (cpu-gloo, gpu-ipc, gpu-nccl), the key of the fitted transfer cost; cached:
        path -> leading prompt tokens in the prefix cache of the worker that would prefill it."""
        res, cached = {}, cached or {}
        if coll is not None:
            ttft = self.ttft_ms(prompt_len, coll, cached.get("collocated", 0))
            held = self._prefill_steps_ms(prompt_len, cached.get("collocated", 0), coll)
            tpot = self.tpot_ms(prompt_len, out_len, coll, held)
            res["collocated"] = dict(ttft_ms=ttft, tpot_ms=tpot, e2e_ms=ttft + max(out_len - 1, 0) * tpot)
        if pre is not None and dec is not None:
            # a prefill worker has no decode batch and a decode worker no queued prompts; a collocated worker
            # doing either job for another (pd_on_collocated) has both, priced as on the collocated path
            ttft = self.ttft_ms(prompt_len, pre, cached.get("disaggregated", 0))
            # its prompt's backlog meets its decode where the prefill worker shares the decode worker's GPU
            held = self._prefill_steps_ms(prompt_len, cached.get("disaggregated", 0), pre) \
                if pre.device == dec.device != "cpu" else 0.0
            tpot = self.tpot_ms(prompt_len, out_len, dec, held)
            xfer = self.cm.transfer_ms(prompt_len, pair) * (1 + dec.inflight_transfers)
            res["disaggregated"] = dict(ttft_ms=ttft, tpot_ms=tpot, transfer_ms=xfer,
                                        e2e_ms=ttft + xfer + max(out_len - 1, 0) * tpot)
        return res

    def price(self, path: str, prompt_len: int, out_len: float, pre: WorkerLoad, dec: WorkerLoad,
              pair: str = "default", cached: int = 0) -> tuple[dict, dict, dict]:
        """A path already chosen (a static policy's, or a recorded one replayed), on its prefill and decode
        workers (the same one for collocated): (raw predictions, calibrated predictions, roles per metric)."""
        if path == "collocated":
            raw = self.predict(prompt_len, out_len, pre, None, None, cached={path: cached})[path]
        else:
            raw = self.predict(prompt_len, out_len, None, pre, dec, pair, {path: cached})[path]
        roles = calibration_roles(pre, dec)
        return raw, self.calibration.apply(roles, raw, out_len, prompt_len), roles

    def tpot_ms(self, prompt_len: int, out_len: float, w: WorkerLoad, held_ms: float = 0.0) -> float:
        return latency.tpot_ms(self.cm, w, prompt_len, out_len, held_ms=held_ms)

    def ttft_ms(self, prompt_len: int, w: WorkerLoad, cached: int = 0) -> float:
        return latency.ttft_ms(self.cm, w, prompt_len, cached)

    def decide(self, prompt_len: int, max_tokens: int | None, coll: WorkerLoad | None, pre: WorkerLoad | None,
               dec: WorkerLoad | None, pair: str = "default", others: list[WorkerLoad] | None = None,
               cached: dict | None = None, alternatives: list[tuple] = ()) -> Decision:
        """others: every worker's load (the GPU neighbours a prompt's prefill work also slows); cached: path ->
        prompt tokens the prefilling worker holds already; alternatives: more handoff pairs to price, each
        (prefill load, decode load, pair kind, cached tokens): the disaggregated path takes the best of them and
        (pre, dec) (Decision.pair_index: 0 for (pre, dec), i for alternatives[i - 1])."""
        cached = cached or {}
        out_len = self.predictor.mean(prompt_len, max_tokens)
        if alternatives and float(self.cm.prefill_ms(prompt_len)) < LONG_PREFILL_STEPS * float(
                self.cm.decode_ms(1, prompt_len)):
            alternatives = ()  # a short prefill stalls nobody for long: where it runs matters less than balance
        options = []  # (path, prefill load, decode load, pair kind, cached tokens)
        if coll is not None:
            options.append(("collocated", coll, coll, None, cached.get("collocated", 0)))
        if pre is not None and dec is not None:
            options += [("disaggregated", pre, dec, pair, cached.get("disaggregated", 0)), *(
                ("disaggregated", *alt) for alt in alternatives)]
        if not options:
            raise ValueError("no path can serve the request")
        best: dict[str, tuple] = {}  # path -> (score, option index, raw, corrected, feasible)
        for i, (path, p, d, kind, c) in enumerate(options):
            raw = self.predict(prompt_len, out_len, coll if path == "collocated" else None,
                               p if path != "collocated" else None, d if path != "collocated" else None, kind or "default",
                               {path: c})[path]
            pred = self.calibration.apply(calibration_roles(p, d), raw, out_len, prompt_len)
            score = self._score(path, pred, prompt_len, c, p, d, others or [], out_len)
            feasible = not decision.saturated(self.cm, *([p] if path == "collocated" else [p, d]))
            if path not in best or (feasible, -score[0], -score[1]) > (best[path][4], -best[path][0][0],
                                                                    -best[path][0][1]):
                best[path] = (score, i, raw, pred, feasible)
        feasible = [k for k, v in best.items() if v[4]]
        if "disaggregated" in best and not feasible:
            feasible = ["collocated"] if "collocated" in best else feasible  # no handoff when both are saturated
        path, why = self.chooser.choose({k: v[0] for k, v in best.items()}, feasible)
        roles = {k: calibration_roles(options[v[1]][1], options[v[1]][2]) for k, v in best.items()}
        first_pair = 1 if coll is not None else 0
        return Decision(path, {k: v[3] for k, v in best.items()}, {k: v[2] for k, v in best.items()}, roles, out_len,
                        decided_by=why, scores={k: v[0][0] for k, v in best.items()},
                        pair_index=best["disaggregated"][1] - first_pair if "disaggregated" in best else 0)

    def _score(self, path: str, pred: dict, prompt_len: int, cached: int, prefill_on: WorkerLoad,
               decode_on: WorkerLoad, others: list[WorkerLoad], out_len: float) -> tuple[float, float]:
        """(expected SLO misses, total added ms) with SLOs, else (total added ms, own end-to-end): the request's
        own and those of the sequences decoding where its work lands."""
        work = float(self.cm.prefill_work_ms(prompt_len - cached, cached))
        steps = self._prefill_steps_ms(prompt_len, cached, prefill_on)
        landings = self._landings(path, work, lambda o: steps * self._beside_loss(prompt_len, cached, prefill_on, o),
                                  prefill_on, decode_on, others, out_len)
        extra_misses, added = decision.others_cost(self.cm, landings, self.slo, out_len)
        if self.slo.any:
            return decision.own_miss(pred, self.slo, prompt_len) + extra_misses, pred["e2e_ms"] + added
        return pred["e2e_ms"] + added, pred["e2e_ms"]

    def _beside_loss(self, prompt_len: int, cached: int, w: WorkerLoad, o: WorkerLoad) -> float:
        """What the decode batch of o, beside w on its GPU, loses per ms of w's prefill steps for the prompt (their
        time alone). Under MPS each slows the other by a share of the other's step (CostModel.beside_prefill_share
        a; b from CostModel.prompt_beside_decode_ms, at most 1, 0 where unmeasured): a prefill step T beside decode
        steps s lasts T (s + aT) / (s + aT - bs), and o makes a step per s + aT of it, so o loses aT / (s + aT - bs) per ms of
        T: about all of it for b ~ 1, however small a is (one H200: b = 1.02). Unmeasured (time-slicing), a decode
        step waits for the prefill: all of it. Until 2026-12-05 the charge was f - 1 for a slowdown f (1.85 on the
        H200): adaptive's simulated highest rates on one H200 moved by -0.9 to +1.5% (results/plan/h200_*.txt);
        charged 1 - 1/f, or aT / (s + aT) (the prefill's own slowdown left out: 0.5 for a short prompt), the short
        prompts went to the prefill worker and adaptive fell from 8.3 to 6.4-6.6 req/s
        (results/plan/h200_bimodal_bursty_*_charge.txt)."""
        a = self.cm.beside_prefill_share
        if a is None or not o.decode_batch:
            return 1.0
        budget = max(1, self.cm.max_num_batched_tokens - w.decode_batch)
        step = float(self.cm.step_ms(w.decode_batch, w.decode_ctx, [(min(budget, max(1, prompt_len - cached)), cached)]))
        s = float(self.cm.decode_ms(o.decode_batch, o.decode_ctx))
        b = (self.cm.prompt_beside_decode_ms(step, s) or 0.0) / s  # the grid's share at these steps, else the factor's
        T = a * step
        return T / (s * (1 - min(b, 1.0)) + T) if T > 0 else 1.0

    def _prefill_steps_ms(self, prompt_len: int, cached: int, w: WorkerLoad) -> float:
        """The time of the steps that prefill the prompt on worker w (beside its decode batch, if any): what its
        prefill takes from the decode steps of the other workers on its GPU (all of it while sharing is unmeasured:
        a decode step waits for a neighbour's prefill, as under time-slicing; else as _score says)."""
        steps = self.cm.chunked_prefill_ms(prompt_len, w.decode_batch, w.decode_ctx, cached)
        return steps * self.cm.prefill_role_scale if w.role == "prefill" else steps

    @staticmethod
    def _landings(path: str, work: float, beside: Callable[[WorkerLoad], float], prefill_on: WorkerLoad,
                  decode_on: WorkerLoad, others: list[WorkerLoad], out_len: float) -> list:
        """The decode-capable workers a path loads: its decode worker (a slot), the worker that prefills it
        (the prompt's work in its steps) and the others on that GPU (beside(o): the time its prefill steps take
        from o's decode batch)."""
        gpu = [o for o in others if o is not prefill_on and o.device != "cpu" and o.device == prefill_on.device]
        landing = {id(prefill_on): decision.Landing(prefill_on, prefill_on is decode_on, work)}
        for o in gpu:
            landing[id(o)] = decision.Landing(o, o is decode_on, beside(o))
        if id(decode_on) not in landing:
            landing[id(decode_on)] = decision.Landing(decode_on, True, 0.0)
        ext = decision.extension_tokens(decode_on, out_len) if decode_on.device != "cpu" else 0.0
        for o in others if ext else []:  # the decode batch it keeps going slows the GPU's other decode batches
            if o is not decode_on and o.device == decode_on.device and o.decode_batch:
                landing.setdefault(id(o), decision.Landing(o, False, 0.0)).extends_neighbour = ext
        return list(landing.values())

    def observe(self, prompt_len: int, output_len: int, roles: dict | None = None, predicted_raw: dict | None = None,
                measured: dict | None = None) -> None:
        """A finished request: its output length, and (when it was routed by this router) the uncorrected
        predictions for the path it took, with the roles that ran it, against its measured ttft_ms / tpot_ms."""
        self.predictor.observe(prompt_len, output_len)
        if roles and predicted_raw and measured:
            self.calibration.observe(roles, predicted_raw, measured, prompt_len)
