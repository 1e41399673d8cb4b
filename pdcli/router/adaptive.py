"""The adaptive router: predict TTFT, TPOT and end-to-end latency of a request on each path from the cost
model, the predicted output length and the live state of the workers; pick the path that meets the SLOs,
else the lower predicted end-to-end latency. Every decision keeps its predictions."""
from __future__ import annotations

from dataclasses import dataclass, field

from pdcli.router.calibration import LatencyCalibration
from pdcli.router import latency
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
        return latency.tpot_ms(self.cm, w, prompt_len, out_len)

    def ttft_ms(self, prompt_len: int, w: WorkerLoad) -> float:
        return latency.ttft_ms(self.cm, w, prompt_len)

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
