"""`pdcli profile` fits its plan to the device and a time budget; `pdcli fit` says which component lacks points.

The planner runs against fake step timers (formulas in ms on a virtual clock), so CPU, GPU and slow devices are
all checked here in milliseconds; one short real run on a tiny model checks the command end to end."""
import re
import time

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pdcli.cli import app
from pdcli.profile_plan import PLAN_NEEDS, Limits, ladder, plan_profile
from pdcli.profiler import run_steps
from pdcli.router.fit import SCHEMA_VERSION, ProfileError, check_points, fit_profile

# H200 fit of dummy:llama3-8b (profiles/nvidia-h200): prefill p0, a0, a1, a2, a3; decode d0, d1, d2
GPU = dict(prefill=[7.26, 8.99, 0.0135, 1.6e-6, 3.3e-6], decode=[4.9, 0.0098, 3.1e-5], cross=0.0)
# smollm2 on this 2-core CPU: prefill ~2 ms a token, decode ~4 ms a sequence, mixed steps padded (reference path)
CPU = dict(prefill=[76.0, 52.0, 1.9, 5e-4, 5e-4], decode=[45.0, 3.8, 4e-4], cross=6e-4)
GPU_LIMITS = Limits(max_tokens=8192, max_seqs=256, max_len=131072, kv_blocks=40000, block_size=16)
CPU_LIMITS = Limits(max_tokens=8192, max_seqs=256, max_len=8192, kv_blocks=728, block_size=16)


class FakeTimer:
    """Step times from the cost-model forms (ms), on a virtual clock each step advances (its warm-up run too);
    speed multiplies every step from when it is set."""

    def __init__(self, prefill, decode, cross, speed=1.0):
        self.pre, self.dec, self.cross, self.speed, self.now = prefill, decode, cross, speed, 0.0

    def clock(self) -> float:
        return self.now

    def _step(self, ms: float, reps: int) -> float:
        self.now += (reps + 1) * ms * self.speed / 1e3
        return ms * self.speed

    def _prefill(self, n, c):
        p0, a0, a1, a2, a3 = self.pre
        return max(p0, a0 + a1 * n + a2 * n * c + a3 * n * n / 2)

    def _decode(self, b, ctx):
        d0, d1, d2 = self.dec
        return d0 + d1 * b + d2 * b * ctx

    def prefill_ms(self, n, c, reps):
        return self._step(self._prefill(n, c), reps)

    def decode_ms(self, b, ctx, reps):
        return self._step(self._decode(b, ctx), reps)

    def mixed_ms(self, b, ctx, n, reps):
        padded = self.cross * (b + 1) * n * max(n, ctx)
        return self._step(self._decode(b, ctx) + self._prefill(n, 0) - self.dec[0] + padded, reps)


def fake(device: dict, speed=1.0) -> FakeTimer:
    return FakeTimer(device["prefill"], device["decode"], device["cross"], speed)


def shapes(comp) -> dict:
    return {f: sorted({getattr(p, f) for p in comp.points}) for f in ("n", "c", "batch", "ctx")}


def profile_of(steps: dict) -> dict:
    tb = np.repeat([16, 64, 256, 1024], 3) * 4096
    transfer = dict(tokens=(tb // 4096).tolist(), bytes=tb.tolist(), ms=(0.5 + tb / 1e6).tolist())
    return dict(schema_version=SCHEMA_VERSION, model="fake", device="fake", max_num_batched_tokens=8192,
                kv_bytes_per_token=4096, provenance=dict(max_seconds=120.0), transfer=dict(cpu=transfer), **steps)


def assert_enough_points(steps: dict) -> None:
    """The planner's margin: 2x each fit's parameters, over a spread of shapes."""
    for kind, (count, _) in PLAN_NEEDS.items():
        assert len(steps[kind]["ms"]) >= count, kind
    assert len(set(steps["prefill"]["n"])) >= 4 and len(set(steps["prefill"]["c"])) >= 3
    per_seq = {s // b for s, b in zip(steps["decode"]["ctx"], steps["decode"]["batch"])}
    assert len(set(steps["decode"]["batch"])) >= 3 and len(per_seq) >= 2
    assert len(set(steps["mixed"]["batch"])) >= 2 and len(set(steps["mixed"]["n"])) >= 2
    check_points(profile_of(steps))  # what `pdcli fit` asks of them


def test_ladder_thins_from_the_bottom():
    assert ladder(16, 8192, 7) == (16, 64, 256, 1024, 2048, 4096, 8192)
    assert ladder(1, 256, 6) == (1, 4, 16, 64, 128, 256)
    assert ladder(16, 512, 7) == (16, 32, 64, 128, 256, 512)
    assert ladder(16, 300, 5) == (16, 32, 64, 128, 256)


def test_gpu_keeps_the_full_plan():
    """On an H200-like device the whole plan fits: the shapes of the profiles in profiles/, 3 repeats."""
    t = fake(GPU)
    plan = plan_profile(t, GPU_LIMITS, 120.0, True, t.clock)
    pre, dec, mix = plan.components
    assert {(p.n, p.c) for p in pre.points} == {(n, c) for n in (16, 64, 256, 1024, 2048, 4096, 8192)
                                                for c in (0, 1024, 4096, 16384)}
    assert {(p.batch, p.ctx) for p in dec.points} == {(b, x) for b in (1, 4, 16, 64, 128, 256)
                                                      for x in (128, 1024, 4096) if b * x <= 40000 * 16}
    assert {(p.batch, p.ctx, p.n) for p in mix.points} == {(b, 512, n) for b in (4, 16, 64, 256)
                                                           for n in (64, 256, 1024, 4096, 8192 - b)}  # the step's budget
    assert [c.reps for c in plan.components] == [3, 3, 3]
    assert plan.transfer_lengths == (16, 64, 256, 1024, 2048) and plan.transfer_repeats == 3
    start = t.now
    steps = run_steps(t, plan, None, t.clock)
    assert {k: len(v["ms"]) for k, v in steps.items()} == dict(prefill=28, decode=17, mixed=20)
    assert t.now - start < 60


def test_cpu_plan_fits_the_budget_with_enough_points_per_component():
    t = fake(CPU)
    plan = plan_profile(t, CPU_LIMITS, 120.0, True, t.clock)
    probes = t.now
    steps = run_steps(t, plan, None, t.clock)
    assert probes < 15 and t.now <= 0.75 * 120.0 and plan.transfer_est_s <= 0.25 * 120.0
    assert_enough_points(steps)
    pre = shapes(plan.components[0])
    assert 256 <= pre["n"][-1] < 8192 and pre["c"][-1] < 16384  # smaller shapes than a GPU's, still a spread
    assert len(plan.transfer_lengths) >= 4 and plan.transfer_lengths[-1] < 2048
    params = fit_profile(profile_of(steps))
    assert params["prefill"]["r2"] > 0.99 and params["decode"]["r2"] > 0.99


def test_slow_device_gets_the_smallest_plan_and_still_enough_points():
    """30x this CPU: no grid fits, so the smallest that keeps the fit's shapes runs once per point."""
    t = fake(CPU, speed=30.0)
    plan = plan_profile(t, CPU_LIMITS, 60.0, True, t.clock)
    assert all(c.reps == 1 for c in plan.components)
    steps = run_steps(t, plan, None, t.clock)
    assert_enough_points(steps)


def test_a_device_slower_than_probed_stops_at_the_deadline_with_the_spread():
    t = fake(CPU)
    plan = plan_profile(t, CPU_LIMITS, 120.0, True, t.clock)
    t.speed, start = 4.0, t.now  # every step from now on takes 4x its estimate
    steps = run_steps(t, plan, None, t.clock)
    assert t.now - start <= 1.3 * plan.steps_budget_s
    assert sum(len(v["ms"]) for v in steps.values()) < sum(len(c.points) for c in plan.components)
    assert_enough_points(steps)


def few_prefill_points() -> dict:
    """The issue's profile: 7 prefill chunks at no cached prefix, nothing else."""
    prefill = dict(n=[16, 64, 256, 1024, 2048, 4096, 8192], c=[0] * 7, ms=[90.0 * i for i in range(1, 8)])
    return profile_of(dict(prefill=prefill, decode=dict(batch=[], ctx=[], ms=[]),
                           mixed=dict(batch=[], ctx=[], n=[], c=[], ms=[])))


def test_fit_profile_names_the_component_short_of_points():
    with pytest.raises(ProfileError, match=r"cannot fit prefill: .*1 prefix context.*profile --max-seconds 240"):
        fit_profile(few_prefill_points(), "DIR")
    t = fake(CPU)
    steps = run_steps(t, plan_profile(t, CPU_LIMITS, 120.0, True, t.clock), None, t.clock)
    for k in steps["decode"]:
        steps["decode"][k] = steps["decode"][k][:3]
    with pytest.raises(ProfileError, match=r"cannot fit decode: it has 3 points"):
        fit_profile(profile_of(steps))


def test_fit_command_fails_in_one_line_naming_prefill(tmp_path):
    torch.save(few_prefill_points(), tmp_path / "profile_data.pt")
    r = CliRunner().invoke(app, ["fit", str(tmp_path), "--no-plots"])
    assert r.exit_code == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: cannot fit prefill: it has 7 points") and "pdcli profile" in lines[0]
    assert "Warning" not in r.output and not (tmp_path / "params.json").exists()


def test_profile_on_a_tiny_model_keeps_its_budget_and_reports_progress(tmp_path):
    """Default engine limits: the planner, not the flags, keeps the shapes small enough for the budget."""
    out, budget = str(tmp_path / "prof"), 6.0
    t0 = time.monotonic()
    r = CliRunner().invoke(app, ["profile", "--model", "dummy:tiny-llama", "--device", "cpu", "--out", out,
                                 "--max-seconds", str(budget)])
    wall = time.monotonic() - t0
    assert r.exit_code == 0, r.stderr
    assert wall < budget + 30
    plan = re.search(r"^profile: plan: prefill \d+ points.*; ~(\d+) s$", r.stderr, re.M)
    assert plan and int(plan[1]) <= budget, r.stderr  # the plan's estimate (probes aside) fits the budget
    progress = r"^profile: (.+?) (\d+)/(\d+) (points|transfers), (\d+) s elapsed, ~(\d+) s left$"
    lines = re.findall(progress, r.stderr, re.M)
    assert {s for s, *_ in lines} >= {"prefill", "decode", "mixed", "KV transfer (cpu-gloo)"}, r.stderr
    data = torch.load(f"{out}/profile_data.pt", weights_only=True)
    assert_enough_points({k: data[k] for k in ("prefill", "decode", "mixed")})
    assert len(set(data["transfer"]["cpu-gloo"]["tokens"])) >= 2 and data["provenance"]["max_seconds"] == budget
    r = CliRunner().invoke(app, ["fit", out, "--no-plots"])
    assert r.exit_code == 0, r.stderr
    assert "R²" in r.stdout and "interference" in r.stdout
    assert len(data["shared_decode"]["ms"]) == 4 and "shared prefix in" in r.stdout  # profiler.shared_decode


def test_shared_decode_points_and_the_share_of_shared_context_a_step_reads():
    """profiler.shared_decode times decode steps whose sequences hold one of a few prefixes by reference (as prefix
    hits do) beside the same batch unshared, and gives every block back; fit.shared_read turns the saving into the
    share of a shared token's cost (CostModel.shared_context_read, which the router's loads and the simulator use)."""
    from pdcli import LLM
    from pdcli.profiler import StepTimer, engine_limits, shared_decode
    from pdcli.router.cost_model import SHARED_CONTEXT_READ, CostModel
    from pdcli.router.fit import shared_read

    llm = LLM("dummy:tiny-llama", device="cpu", max_model_len=512, num_kv_blocks=4096, block_size=16)
    bm = llm.engine.block_manager
    free = bm.num_free_blocks
    got = shared_decode(StepTimer(llm.engine), engine_limits(llm.engine))
    assert bm.num_free_blocks == free  # every block back, the shared ones' references too
    assert got["batch"] == [16, 16, 64, 64] and got["groups"] == [1, 8, 1, 8] and set(got["prefix"]) == {256}
    assert all(ms > 0 for ms in got["ms"] + got["unique_ms"])
    d2 = 1e-3  # ms per context token
    pts = dict(batch=[16, 64], ctx=[2304, 2304], prefix=[2048, 2048], groups=[1, 8], ms=[10.0, 20.0],
               unique_ms=[10.0 + 0.5 * d2 * 15 * 2048, 20.0 + 0.5 * d2 * 56 * 2048])
    assert shared_read(pts, [1.0, 0.01, d2]) == pytest.approx(0.5)
    assert shared_read(dict(pts, unique_ms=[5.0, 5.0]), [1.0, 0.01, d2]) == 1.0  # slower shared: clamped
    assert shared_read(None, [1.0, 0.01, d2]) is None
    cm = CostModel([1.0] * 5, [1.0, 0.01, d2], [0.0] * 4, {}, 8192, 1)
    assert cm.shared_context_read == SHARED_CONTEXT_READ
    assert CostModel([1.0] * 5, [1.0, 0.01, d2], [0.0] * 4, {}, 8192, 1, shared_read=0.3).shared_context_read == 0.3
