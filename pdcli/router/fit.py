"""`pdcli fit`: profile_data.pt -> params.json (each component with its parameters, r2 and max_rel_err)."""
from __future__ import annotations

import json
import os

import numpy as np
import torch

from pdcli.router.cost_model import CostModel, decode_features, prefill_marginal_features
from pdcli.router.fitters import fit_linear, fit_mixed, fit_prefill

SCHEMA_VERSION = 1  # profile_data.pt
PARAMS_SCHEMA_VERSION = 2  # params.json (2: prefill floor and separate prefix/self attention rates, mixed-step form)
PROFILE_FILE, PARAMS_FILE = "profile_data.pt", "params.json"

# the profiled GPU-sharing factors (profile_sharing.py) a fit keeps: own step beside a neighbour / alone
SHARING_FACTORS = ("decode_beside_decode", "prefill_beside_decode", "decode_beside_prefill", "prefill_beside_prefill")


class ProfileError(ValueError):
    """A missing, corrupt or stale profile or params file; the message names the command that remakes it."""


def load_profile(folder: str) -> dict:
    path = os.path.join(folder, PROFILE_FILE)
    again = f"run `pdcli profile --out {folder}` to measure it again"
    if not os.path.isfile(path):
        raise ProfileError(f"no {PROFILE_FILE} in {folder}: {again}")
    try:
        data = torch.load(path, weights_only=True)
    except Exception as e:
        raise ProfileError(f"{path} is unreadable ({type(e).__name__}): {again}") from e
    if not isinstance(data, dict) or data.get("schema_version") != SCHEMA_VERSION:
        raise ProfileError(f"{path} has schema_version {data.get('schema_version') if isinstance(data, dict) else '?'}, "
                           f"expected {SCHEMA_VERSION}: {again}")
    for key in ("prefill", "decode", "mixed", "transfer", "model", "max_num_batched_tokens", "kv_bytes_per_token"):
        if key not in data:
            raise ProfileError(f"{path} lacks '{key}': {again}")
    return data


# component -> (points, {shape: distinct values}) a fit needs: its parameters + 1, and shapes that pin each term
FIT_NEEDS = dict(prefill=(6, {"chunk size": 3, "prefix context": 2}),
                 decode=(4, {"batch size": 2, "context per sequence": 2}),
                 mixed=(5, {"batch size": 2, "chunk size": 3}))
COMPONENT_NAMES = dict(prefill="prefill", decode="decode", mixed="mixed steps (interference)")
DEFAULT_MAX_SECONDS = 120.0  # `pdcli profile --max-seconds`


def _count(k: int, what: str) -> str:
    plural = what.replace("context per", "contexts per") if "context per" in what else what + "s"
    return f"{k} {what if k == 1 else plural}"


def shape_columns(comp: str, part: dict) -> tuple[dict, np.ndarray]:
    """({shape: values} counted for FIT_NEEDS, the linear features whose rank the fit needs full) of a component."""
    if comp == "prefill":
        n, c = np.asarray(part["n"], float), np.asarray(part["c"], float)
        return {"chunk size": n, "prefix context": c}, np.stack([np.ones_like(n), n, n * c, n * n / 2], -1)
    b, s = np.asarray(part["batch"], float), np.asarray(part["ctx"], float)
    if comp == "decode":
        return {"batch size": b, "context per sequence": s / np.maximum(b, 1)}, decode_features(b, s)
    n = np.asarray(part["n"], float)
    return {"batch size": b, "chunk size": n}, np.stack([np.ones_like(b), b, n], -1)


def _lacks(comp: str, part: dict) -> str | None:
    """Why comp's points cannot be fitted, or None."""
    if len({len(v) for v in part.values()}) > 1:
        return f"its columns differ in length ({', '.join(f'{k} {len(v)}' for k, v in part.items())})"
    need, shapes_needed = FIT_NEEDS[comp]
    shapes, x = shape_columns(comp, part)
    counts = {k: len(np.unique(v)) for k, v in shapes.items()}
    has = f"{_count(len(part['ms']), 'point')} over {' and '.join(_count(v, k) for k, v in counts.items())}"
    if len(part["ms"]) < need or any(counts[k] < v for k, v in shapes_needed.items()):
        wants = " and ".join(_count(v, k) for k, v in shapes_needed.items())
        return f"it has {has}, and needs at least {need} points over {wants}"
    scaled = x / np.maximum(np.abs(x).max(axis=0), 1e-30)
    if np.linalg.matrix_rank(scaled) < x.shape[1]:
        return f"its {has} do not vary independently (degenerate shapes)"
    return None


def check_points(data: dict, folder: str | None = None) -> None:
    """ProfileError naming the first component (or transfer pair) with too few or degenerate points, and the
    command that measures more."""
    budget = 2 * float(data.get("provenance", {}).get("max_seconds", DEFAULT_MAX_SECONDS))
    again = f"run `pdcli profile --max-seconds {budget:.0f} --out {folder or 'DIR'}` to measure more"
    for comp in ("prefill", "decode", "mixed"):
        why = _lacks(comp, data[comp])
        if why:
            raise ProfileError(f"cannot fit {COMPONENT_NAMES[comp]}: {why}: {again}")
    for pair, t in data["transfer"].items():
        sizes = len(np.unique(np.asarray(t["bytes"], float)))
        if sizes < 2 or len(t["ms"]) != len(t["bytes"]):
            raise ProfileError(f"cannot fit transfer {pair}: it has {_count(len(t['ms']), 'transfer')} of "
                               f"{_count(sizes, 'size')}, and needs 2 sizes at least: {again} (or --no-transfer)")


def fit_profile(data: dict, folder: str | None = None) -> dict:
    """params.json's content; ProfileError (check_points) when a component cannot be fitted. folder: for the
    command in that error."""
    check_points(data, folder)
    p, d, m = data["prefill"], data["decode"], data["mixed"]
    prefill = fit_prefill(p["n"], p["c"], np.asarray(p["ms"], float))
    decode = fit_linear(decode_features(d["batch"], d["ctx"]), np.asarray(d["ms"], float))
    _, d1, d2 = decode.params
    dec_marg = d1 * np.asarray(m["batch"], float) + d2 * np.asarray(m["ctx"], float)
    pre_marg = prefill_marginal_features(m["n"], m["c"]) @ np.asarray(prefill.params[2:])
    inter = fit_mixed(dec_marg, pre_marg, np.asarray(m["ms"], float))
    transfer = {}
    for pair, t in data["transfer"].items():
        # median of the repeats of each size: a first (warm-up) transfer can be 20x the others
        nbytes = np.asarray(t["bytes"], float)
        sizes = np.unique(nbytes)
        med = np.array([np.median(np.asarray(t["ms"], float)[nbytes == b]) for b in sizes])
        f = fit_linear(np.stack([np.ones(len(sizes)), sizes], -1), med)
        slope = max(f.params[1], 1e-15)
        transfer[pair] = dict(f.to_dict(), t0_ms=f.params[0], gb_s=1.0 / (slope * 1e6))
    prefill_worker = served_prefill_scale(data, prefill.params, decode.params, inter.params)
    shared = shared_read(data.get("shared_decode"), decode.params)
    return dict(schema_version=PARAMS_SCHEMA_VERSION, model=data["model"], device=data.get("device"),
                provenance=dict(data.get("provenance", {}), **({"sharing": data["sharing_provenance"]}
                                                               if "sharing_provenance" in data else {})),
                max_num_batched_tokens=int(data["max_num_batched_tokens"]),
                kv_bytes_per_token=int(data["kv_bytes_per_token"]), prefill=prefill.to_dict(),
                decode=dict(decode.to_dict(), **({} if shared is None else dict(shared_read=shared))),
                interference=inter.to_dict(), transfer=transfer,
                sharing=fit_sharing(data.get("sharing", {})),
                prefill_worker=prefill_worker)


def shared_read(points: dict | None, decode: list) -> float | None:
    """The share of a shared context token a decode step costs against an unshared one, from the profile's
    shared-decode points (profiler.shared_decode): each step's saving over the same batch unshared, against what
    the fitted decode step (d2, ms per context token) gives for the context tokens sharing takes off, median over
    the points, within [0, 1]; None without points."""
    if not points or not points.get("ms"):
        return None
    d2, reads = float(decode[2]), []
    for b, prefix, g, ms, unique in zip(*(points[k] for k in ("batch", "prefix", "groups", "ms", "unique_ms"))):
        repeats = (b - g) * prefix  # context tokens read again from another sequence's blocks
        if d2 > 0 and repeats > 0:
            reads.append(1.0 - (unique - ms) / (d2 * repeats))
    return float(min(1.0, max(0.0, np.median(reads)))) if reads else None


def fit_sharing(got: dict) -> dict:
    """The profiled sharing factors, and from the unequal-length grids (profile_sharing's beside_prefill_grid,
    beside_decode_grid) prompt_beside_prefill_points / decode_beside_prefill_points / prompt_beside_decode_points:
    [[own step / neighbour step, extra / neighbour step]] sorted by the ratio, one point per ratio (their mean)."""
    out = {k: float(v) for k, v in got.items() if k in SHARING_FACTORS}
    for key, grid, decode in (("prompt_beside_prefill_points", "beside_prefill_grid", False),
                              ("decode_beside_prefill_points", "beside_prefill_grid", True),
                              ("prompt_beside_decode_points", "beside_decode_grid", False)):
        by_ratio: dict[float, list[float]] = {}
        for g in got.get(grid) or []:
            if (g["own"] == 0) != decode or not all(g.get(k) for k in ("own_alone_ms", "own_beside_ms",
                                                                       "neighbour_ms")):
                continue
            ratio = round(g["own_alone_ms"] / g["neighbour_ms"], 6)
            by_ratio.setdefault(ratio, []).append(max(0.0, g["own_beside_ms"] - g["own_alone_ms"]) / g["neighbour_ms"])
        if by_ratio:
            out[key] = [[r, float(np.mean(v))] for r, v in sorted(by_ratio.items())]
    return out


def served_prefill_scale(data: dict, prefill: list, decode: list, interference: list) -> dict:
    """The profile's burst through a real pair (its last first token) over what the fitted steps predict for it:
    the queue of the burst's other prompts, then the last one's own chunks. {} without a burst."""
    s = data.get("served_prefill")
    if not s:
        return {}
    from pdcli.router.cost_model import CostModel

    cm = CostModel(list(prefill), list(decode), list(interference), {}, int(data["max_num_batched_tokens"]),
                   int(data["kv_bytes_per_token"]))
    n, length = int(s["prompts"]), int(s["prompt_len"])
    predicted = cm.queued_prefill_ms((n - 1) * length, sq_tokens=(n - 1) * length**2) + cm.chunked_prefill_ms(length)
    return dict(scale=s["last_first_token_ms"] / predicted, measured_ms=s["last_first_token_ms"],
                predicted_ms=predicted, prompts=n, prompt_len=length)


def write_params(folder: str, params: dict) -> str:
    path = os.path.join(folder, PARAMS_FILE)
    with open(path, "w") as f:
        json.dump(params, f, indent=1)
    return path


def load_cost_model(folder: str, model: str | None = None) -> CostModel:
    path = os.path.join(folder, PARAMS_FILE)
    again = f"run `pdcli fit {folder}` to fit it again"
    if not os.path.isfile(path):
        raise ProfileError(f"no {PARAMS_FILE} in {folder}: {again}")
    try:
        with open(path) as f:
            p = json.load(f)
    except (OSError, ValueError) as e:
        raise ProfileError(f"{path} is unreadable ({type(e).__name__}): {again}") from e
    if not isinstance(p, dict) or p.get("schema_version") != PARAMS_SCHEMA_VERSION:
        raise ProfileError(f"{path} has a stale schema_version, expected {PARAMS_SCHEMA_VERSION}: {again}")
    if model is not None and p.get("model") != model:
        raise ProfileError(f"{path} was fitted for model {p.get('model')!r}, not {model!r}: "
                           f"run `pdcli profile --model {model}` and `pdcli fit`")
    try:
        return CostModel(prefill=p["prefill"]["params"], decode=p["decode"]["params"],
                         interference=p["interference"]["params"],
                         transfer={k: (v["t0_ms"], v["gb_s"]) for k, v in p["transfer"].items()},
                         max_num_batched_tokens=p["max_num_batched_tokens"], kv_bytes_per_token=p["kv_bytes_per_token"],
                         sharing=dict(p.get("sharing") or {}), prefill_worker=dict(p.get("prefill_worker") or {}),
                         shared_read=p["decode"].get("shared_read"))
    except (KeyError, IndexError, TypeError) as e:
        raise ProfileError(f"{path} lacks {e}: {again}") from e
