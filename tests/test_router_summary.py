"""Issue 20's summary: the knee is the best static mode's highest rate at >= 90% attainment, errors and path
shares count only the bins up to it."""
from pdcli.benchmarks.router_summary import folder_profiles, highest_rate, summarize


def _row(mode, rate, att, ttft=0.1, tpot=0.1, mix=None):
    return dict(mode=mode, rate=rate, slo_attainment=att, replay_ttft_err=ttft, replay_tpot_err=tpot,
                online_ttft_err=ttft if mode == "adaptive" else None, online_tpot_err=None,
                routing_mix=mix or {mode: 1.0})


def test_the_knee_and_the_maxima_below_it():
    rows = [_row("collocated", 4, 0.95), _row("collocated", 5, 0.91), _row("collocated", 6, 0.85, ttft=0.9),
            _row("disaggregated", 4, 0.92), _row("disaggregated", 5, 0.89, tpot=0.3),
            _row("adaptive", 5, 0.99, ttft=0.2, mix={"collocated": 0.9, "disaggregated": 0.1}),
            _row("adaptive", 7, 0.93, ttft=0.5, mix={"collocated": 1.0})]
    assert highest_rate([r for r in rows if r["mode"] == "collocated"]) == 5
    assert highest_rate([_row("adaptive", 1, 0.5)]) is None
    sweep = dict(folder="results/router/x_b0.5", rows=rows, knee=5,
                 highest_rate={m: highest_rate([r for r in rows if r["mode"] == m])
                               for m in ("collocated", "disaggregated", "adaptive")})
    s = summarize([sweep], "dev", "results/router/x_b0.5/")
    assert s["replay_ttft_err_max"] == 0.2 and s["replay_tpot_err_max"] == 0.3  # the 6 and 7 req/s bins are past it
    assert s["online_ttft_err_max"] == 0.2 and s["online_tpot_err_max"] is None
    assert s["min_path_share"] == 0.1 and s["bins_below_knee"] == 5
    assert s["bimodal_adaptive_highest_rate"] == 7 and s["bimodal_best_static_highest_rate"] == 5
    assert s["replay_below_outside_band"] == []  # no bin records its share under the measurement
    old = dict(sweep, folder="results/bench/older", rows=[_row("adaptive", 4, 0.99, mix={"collocated": 1.0})])
    s = summarize([sweep, old], "dev", None, online={"results/router/x_b0.5"})
    assert s["min_path_share"] == 0.1 and s["min_path_share_replay_set"] == 0.0  # an older run's apart


def test_the_bins_whose_predictions_lean_outside_35_to_65_percent_under():
    rows = [_row("collocated", 4, 0.95), _row("collocated", 5, 0.95), _row("collocated", 6, 0.5)]
    for r, below in zip(rows, (0.34, 0.5, 0.9)):  # the last is past the knee: not counted
        r.update(replay_ttft_below=0.5, replay_tpot_below=below)
    sweep = dict(folder="f", rows=rows, knee=5, highest_rate={"collocated": 5})
    assert summarize([sweep], "dev", None)["replay_below_outside_band"] == [
        dict(folder="f", mode="collocated", rate=4, metric="tpot", below=0.34)]


def test_a_rate_with_fewer_than_100_requests_is_not_a_bin():
    rows = [_row("collocated", 4, 0.95, ttft=0.4), _row("collocated", 5, 0.95), _row("disaggregated", 5, 0.95)]
    rows[0].update(bin=False)  # e.g. 4 s of arrivals at 8 req/s
    sweep = dict(folder="f", rows=rows, knee=5, highest_rate={"collocated": 5, "disaggregated": 5})
    s = summarize([sweep], "dev", None)
    assert s["replay_ttft_err_max"] == 0.1 and s["bins_below_knee"] == 2
    assert s["short_rows_below_knee"] == 1 and s["short_rows_ttft_err_max"] == 0.4


def test_the_prediction_that_aims_at_the_likeliest_futures():
    """router_floor's window oracle: the largest share of futures one value gets within 15% of (1.15 is within
    15% of 1.0 and of 1.25, not of 1.45), and the median of those futures."""
    from pdcli.benchmarks.router_floor import best_window

    assert best_window([1.0, 1.0, 1.0, 1.25, 1.25, 1.25, 1.45, 1.8]) == (0.75, 1.125)
    assert best_window([1.0, 2.0, 4.0, 8.0])[0] == 0.25  # a factor 2 apart: one at a time
    assert best_window([5.0] * 4) == (1.0, 5.0)


def test_a_simulated_bimodal_run_decomposes_its_tpot_by_long_prefills_met():
    """router_sim_hindsight: with the cost model exact, a short request that met no long prefill decodes at its
    hindsight price; one that met one, slower."""
    from pathlib import Path

    from pdcli.benchmarks.router_sim_hindsight import one_run
    from pdcli.router.fit import load_cost_model

    cm = load_cost_model(str(Path(__file__).parent.parent / "profiles/nvidia-h200/dummy-llama3-8b"))
    r = one_run(cm, 0.5, 4.0, 32, 20.0)
    by_k = r["tpot_hindsight"]["measured_over_hindsight_by_long_prefills"]
    assert abs(by_k["0"]["median"] - 1) < 0.05 and by_k["1"]["median"] > 1.1
    assert r["num_scored"] > 40 and 0 < r["router_tpot_err"] < 1


def test_each_folder_replays_with_the_profile_it_ran_with():
    assert folder_profiles(["a", "b=profiles/old", "c"], "profiles/new") == [
        ("a", "profiles/new"), ("b", "profiles/old"), ("c", "profiles/new")]


def test_calibration_prior_counts_a_bin_biased_outside_35_to_65_percent_below():
    from pdcli.benchmarks.calibration_prior import summarize

    rows = [dict(tpot_err=e, tpot_below=b) for e, b in ((0.1, 0.5), (0.2, 0.3), (0.3, 0.7), (0.4, 0.65))]
    s = summarize(rows)
    assert s["bins"] == 4 and s["tpot_err_median"] == 0.25 and s["biased_bin_share"] == 0.5


def test_the_oracle_on_a_served_trace_simulates_it_and_scores_against_the_measurement():
    """router_floor --traces on a committed one-H100 bimodal run (balanced split, its own profile): the simulator
    re-runs the trace within a few percent of each measured TPOT, and every predictor gets a finite score."""
    from pathlib import Path

    from pdcli.benchmarks.router_floor import one_trace
    from pdcli.router.fit import load_cost_model
    from pdcli.router.replay import load_runs

    root = Path(__file__).parent.parent
    cm = load_cost_model(str(root / "profiles/nvidia-h100-80gb-hbm3/dummy-llama3-8b-sharing-grid"))  # its run's
    run = next(r for r in load_runs(str(root / "results/router/h100_bal_bimodal_s1")) if r.mode == "collocated")
    r = one_trace(cm, run, "bimodal", 1.0, futures=2, sample=4, seed=0)
    assert r["num_scored"] == 4 and r["simulated_vs_measured_tpot_err"] < 0.05
    assert all(0 <= r[f"{k}_tpot_err"] < 1 for k in ("router_raw", "router", "oracle", "oracle_window"))


def test_adaptive_against_the_best_static_mode_past_the_knee_averaged_over_seeds():
    """Acceptance 2's comparison: each seed's knee, adaptive's attainment at 1.25x / 1.5x of it against the
    higher static mode's there (interpolated between measured rates), then the means over the seeds."""
    from pdcli.benchmarks.versus_static import attainment_at, versus_static

    def seed(folder, coll, disagg, adapt):
        rows = [_row(m, rate, a) for m, pts in (("collocated", coll), ("disaggregated", disagg), ("adaptive", adapt))
                for rate, a in pts]
        return dict(folder=folder, workload="random", rows=rows, knee=8.0,
                    highest_rate={m: highest_rate([r for r in rows if r["mode"] == m])
                                  for m in ("collocated", "disaggregated", "adaptive")})

    s1 = seed("s1", [(8, 0.95), (10, 0.7), (12, 0.3)], [(8, 0.9), (10, 0.8), (12, 0.2)],
              [(8, 0.97), (9, 0.91), (10, 0.75), (12, 0.35)])
    s2 = seed("s2", [(8, 0.92), (10, 0.6), (12, 0.2)], [(8, 0.9), (10, 0.5)], [(8, 0.9), (10, 0.7)])
    assert attainment_at(s1["rows"], "collocated", 11.0) == 0.5 and attainment_at(s1["rows"], "collocated", 13) is None
    out = versus_static([s1, s2])["random"]
    a, b = out["seeds"]
    assert a["adaptive_highest_rate"] == 9 and a["best_static_highest_rate"] == 8.0
    assert a["at_1.25x"] == dict(rate=10.0, adaptive=0.75, best_static=0.8)  # disaggregated's is the higher there
    assert a["at_1.5x"]["best_static"] == 0.3 and a["at_1.5x"]["adaptive"] == 0.35
    # disaggregated's rates end at 10 req/s with 0.5, above collocated's 0.2 at 12: it may be the best there
    assert b["at_1.5x"] == dict(rate=12.0, adaptive=None, best_static=None)  # not known: out of the mean
    from pdcli.benchmarks.versus_static import best_static_at

    ended = [_row("collocated", 12, 0.4), _row("disaggregated", 10, 0.3)]  # it fell to 0.3 by 10 req/s
    assert best_static_at(ended, 12.0) == 0.4 and best_static_at(ended, 13.0) is None
    m = out["means"]
    assert m["adaptive_highest_rate"] == 8.5 and m["at_1.5x"]["seeds_with"] == 1
    assert abs(m["at_1.25x"]["adaptive"] - 0.725) < 1e-12 and abs(m["at_1.25x"]["best_static"] - 0.7) < 1e-12
