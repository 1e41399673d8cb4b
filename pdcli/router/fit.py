"""`pdcli fit`: profile_data.pt -> params.json (each component with its parameters, r2 and max_rel_err)."""
from __future__ import annotations

import json
import os

import numpy as np
import torch

from pdcli.router.cost_model import CostModel, decode_features, fit_linear, fit_prefill, prefill_marginal_features

SCHEMA_VERSION = 1  # profile_data.pt
PARAMS_SCHEMA_VERSION = 2  # params.json (2: prefill floor and separate prefix/self attention rates, mixed-step form)
PROFILE_FILE, PARAMS_FILE = "profile_data.pt", "params.json"


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


def fit_profile(data: dict) -> dict:
    p, d, m = data["prefill"], data["decode"], data["mixed"]
    prefill = fit_prefill(p["n"], p["c"], np.asarray(p["ms"], float))
    decode = fit_linear(decode_features(d["batch"], d["ctx"]), np.asarray(d["ms"], float))
    _, d1, d2 = decode.params
    dec_marg = d1 * np.asarray(m["batch"], float) + d2 * np.asarray(m["ctx"], float)
    pre_marg = prefill_marginal_features(m["n"], m["c"]) @ np.asarray(prefill.params[2:])
    inter = fit_linear(np.stack([np.ones_like(dec_marg), dec_marg, pre_marg], -1), np.asarray(m["ms"], float))
    transfer = {}
    for pair, t in data["transfer"].items():
        # median of the repeats of each size: a first (warm-up) transfer can be 20x the others
        nbytes = np.asarray(t["bytes"], float)
        sizes = np.unique(nbytes)
        med = np.array([np.median(np.asarray(t["ms"], float)[nbytes == b]) for b in sizes])
        f = fit_linear(np.stack([np.ones(len(sizes)), sizes], -1), med)
        slope = max(f.params[1], 1e-15)
        transfer[pair] = dict(f.to_dict(), t0_ms=f.params[0], gb_s=1.0 / (slope * 1e6))
    return dict(schema_version=PARAMS_SCHEMA_VERSION, model=data["model"], device=data.get("device"),
                provenance=data.get("provenance", {}), max_num_batched_tokens=int(data["max_num_batched_tokens"]),
                kv_bytes_per_token=int(data["kv_bytes_per_token"]), prefill=prefill.to_dict(),
                decode=decode.to_dict(), interference=inter.to_dict(), transfer=transfer)


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
                         max_num_batched_tokens=p["max_num_batched_tokens"], kv_bytes_per_token=p["kv_bytes_per_token"])
    except (KeyError, IndexError, TypeError) as e:
        raise ProfileError(f"{path} lacks {e}: {again}") from e
