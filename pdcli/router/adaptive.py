"""The adaptive router: predict TTFT, TPOT and end-to-end latency of a request on each path from the cost
model, the predicted output length and the live state of the workers; pick the path that meets the SLOs,
else the lower predicted end-to-end latency. Every decision keeps its predictions."""
from __future__ import annotations

from dataclasses import dataclass, field

from pdcli.router.calibration import LatencyCalibration
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
    decided_by: str = "cost-model"


class AdaptiveRouter:
    name = "adaptive"

    def __init__(self, model: CostModel, slo_ttft_ms: float | None = None, slo_tpot_ms: float | None = None,
                 predictor: OutputLengthPredictor | None = None):
        self.cm, self.slo_ttft, self.slo_tpot = model, slo_ttft_ms, slo_tpot_ms
        self.predictor = predictor or OutputLengthPredictor()
        self.calibration = LatencyCalibration()

    def predict(self, prompt_len: int, out_len: float, coll: WorkerLoad | None, pre: WorkerLoad | None,
                dec: WorkerLoad | None, pair: str = "default") -> dict:
        """pair: how KV would move (cpu-gloo, gpu-ipc, gpu-nccl), the key of the fitted transfer cost."""
        res = {}
        if coll is not None:
            ttft, tpot = self.ttft_ms(prompt_len, coll), self.tpot_ms(prompt_len, out_len, coll)
            res["collocated"] = dict(ttft_ms=ttft, tpot_ms=tpot, e2e_ms=ttft + max(out_len - 1, 0) * tpot)
        if pre is not None and dec is not None:
            # a prefill worker has no decode batch and a decode worker no queued prompts; a collocated worker
            # doing either job for another (pd_on_collocated) has both, priced as on the collocated path
            ttft, tpot = self.ttft_ms(prompt_len, pre), self.tpot_ms(prompt_len, out_len, dec)
            xfer = self.cm.transfer_ms(prompt_len, pair) * (1 + dec.inflight_transfers)
            res["disaggregated"] = dict(ttft_ms=ttft, tpot_ms=tpot, transfer_ms=xfer,
                                        e2e_ms=ttft + xfer + max(out_len - 1, 0) * tpot)
        return res

    def tpot_ms(self, prompt_len: int, out_len: float, w: WorkerLoad) -> float:
        """Time per output token on decode worker w: a step of its batch with this request in it, at the
        request's mean context; the queued prompts share those steps, their prefill time spread over this
        request's tokens; slowed by the GPU's other workers over time."""
        cm = self.cm
        b, s = w.decode_batch + 1, w.decode_ctx + prompt_len + out_len / 2
        tpot = float(cm.decode_ms(b, s)) + cm.prefill_in_decode_ms(w.queued_prefill_tokens, b, s) / max(out_len, 1.0)
        return tpot * (1 + w.sharing_avg)

    def split_queue(self, w: WorkerLoad) -> tuple[int, int]:
        """(queued prompt tokens riding in the steps worker w has already scheduled, those ahead of a prompt
        arriving now). Steps are scheduled two ahead with async scheduling, else one; they hold the prompts
        that came before the last step ended, up to their token budget. With no step seen, all are ahead."""
        if w.since_step_ms is None:
            return 0, w.queued_prefill_tokens
        budget = (2 if w.async_steps else 1) * max(1, self.cm.max_num_batched_tokens - w.decode_batch)
        older = w.queued_prefill_tokens - w.queued_since_step_tokens
        held = min(older, budget)
        return held, w.queued_since_step_tokens + older - held

    def start_wait_ms(self, w: WorkerLoad) -> float:
        """Expected wait before a prompt arriving now at worker w runs its first step: for the steps already
        scheduled (the one running and, with async scheduling, the one queued behind it, so the prompt runs
        in the third after the last one landed), priced by the cost model (their decode rows and the prompts
        they hold), less the time since the last step ended; at least one step with async scheduling."""
        cm = self.cm
        held, _ = self.split_queue(w)
        if w.since_step_ms is None or not (w.decode_batch or held):
            return 0.0
        steps = 2 if w.async_steps else 1
        if w.decode_batch:
            step = float(cm.decode_ms(w.decode_batch, w.decode_ctx))
            scheduled = steps * step + cm.prefill_in_decode_ms(held, w.decode_batch, w.decode_ctx)
        else:
            step, scheduled = 0.0, cm.queued_prefill_ms(held)
        scale = 1 + w.sharing
        return max(scheduled * scale - w.since_step_ms, step * scale if steps > 1 else 0.0)

    def ttft_ms(self, prompt_len: int, w: WorkerLoad) -> float:
        """Until the prompt's first token on worker w: the wait for the steps it has already scheduled, then
        the queued prompts ahead of it and its own chunks, slowed by GPU sharing."""
        cm = self.cm
        _, ahead = self.split_queue(w)
        work = cm.queued_prefill_ms(ahead, w.decode_batch, w.decode_ctx) + \
            cm.chunked_prefill_ms(prompt_len, w.decode_batch, w.decode_ctx)
        return self.start_wait_ms(w) + work * (1 + w.sharing)

    def decide(self, prompt_len: int, max_tokens: int | None, coll: WorkerLoad | None, pre: WorkerLoad | None,
               dec: WorkerLoad | None, pair: str = "default") -> Decision:
        out_len = self.predictor.mean(prompt_len, max_tokens)
        raw = self.predict(prompt_len, out_len, coll, pre, dec, pair)
        if not raw:
            raise ValueError("no path can serve the request")
        roles = {}
        if coll is not None:
            roles["collocated"] = dict(ttft_ms=coll.role, tpot_ms=coll.role)
        if pre is not None and dec is not None:
            roles["disaggregated"] = dict(ttft_ms=pre.role, tpot_ms=dec.role)
        pred = {k: self.calibration.apply(roles[k], v, out_len) for k, v in raw.items()}

        def meets(p: dict) -> bool:
            return (self.slo_ttft is None or p["ttft_ms"] <= self.slo_ttft) and \
                   (self.slo_tpot is None or p["tpot_ms"] <= self.slo_tpot)

        ok = [k for k, v in pred.items() if meets(v)]
        pool = ok or list(pred)
        return Decision(min(pool, key=lambda k: pred[k]["e2e_ms"]), pred, raw, roles, out_len)

    def observe(self, prompt_len: int, output_len: int, roles: dict | None = None, predicted_raw: dict | None = None,
                measured: dict | None = None) -> None:
        """A finished request: its output length, and (when it was routed by this router) the uncorrected
        predictions for the path it took, with the roles that ran it, against its measured ttft_ms / tpot_ms."""
        self.predictor.observe(prompt_len, output_len)
        if roles and predicted_raw and measured:
            self.calibration.observe(roles, predicted_raw, measured)
