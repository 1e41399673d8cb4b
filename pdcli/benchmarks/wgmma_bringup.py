"""Bring-up of the Hopper prefill kernels in one call: the two wgmma products on one tile (`wgmma_probe`) with
the default shared-memory descriptor strides and, if those are wrong, the other plausible ones (set through
PDCLI_WGMMA_DESC, which the kernels read at each launch); then each prefill kernel against the fp32 reference on
a ragged paged case and its time at 8k. Prints a line per check and the PDCLI_WGMMA_DESC to use; needs an
sm_90a GPU."""
from __future__ import annotations

import os
import sys

import torch

# (k_sbo, v_lbo, v_sbo) bytes: the default, then N-major LBO / SBO swapped, then K-major with an 8-row step
CANDIDATES = ((1024, 16384, 1024), (1024, 1024, 16384), (128, 16384, 1024), (1024, 16384, 128))


def probe(mod, dtype) -> tuple[bool, bool]:
    """(S right, O right) for the current PDCLI_WGMMA_DESC."""
    gen = torch.Generator(device="cuda").manual_seed(5)
    a, k, v = (torch.randn(n, 128, generator=gen, device="cuda").to(dtype) for n in (64, 128, 128))
    s_out, o_out = (torch.full((64, 128), float("nan"), device="cuda") for _ in range(2))
    mod.wgmma_probe(a, k, v, s_out, o_out)
    s_ref = a.float() @ k.float().T
    o_ref = s_ref.to(dtype).float() @ v.float()
    return (bool(torch.allclose(s_out, s_ref, rtol=1e-4, atol=1e-3)),
            bool(torch.allclose(o_out, o_ref, rtol=1e-3, atol=0.5)))


def main() -> int:
    from pdcli.benchmarks.device import time_us
    from pdcli.kernels import build, prefill_choice
    from pdcli.kernels.ops import prefill_kernel_fn

    try:
        mod = build.load()
    except build.KernelUnavailable as e:
        print(f"error: the CUDA kernels are unavailable: {e}", file=sys.stderr)
        return 2
    if not mod.has_prefill_attention_wgmma(128):
        print("error: this build has no wgmma kernel (it needs an sm_90a GPU)", file=sys.stderr)
        return 2
    found = None
    for cand in CANDIDATES:
        os.environ["PDCLI_WGMMA_DESC"] = ",".join(map(str, cand))
        s_ok, o_ok = probe(mod, torch.bfloat16)
        print(f"probe PDCLI_WGMMA_DESC={os.environ['PDCLI_WGMMA_DESC']}: S {'right' if s_ok else 'WRONG'}, "
              f"O {'right' if o_ok else 'WRONG'}", flush=True)
        if s_ok and o_ok:
            found = cand
            break
    if found is None:
        print("no candidate strides give both products right: the layouts or the fragments are off")
        return 1
    case = prefill_choice.paged_case(300, 77, 32, 8, 128, 16, torch.bfloat16, "cuda")
    big = prefill_choice.paged_case(8192, 0, 32, 8, 128, 16, torch.bfloat16, "cuda")
    flops = 4 * 32 * 128 * 8192 * 8193 / 2
    for name in ("mma", "wgmma", "wgmma_ws"):
        fn = prefill_kernel_fn(mod, name)
        ok = prefill_choice.matches_reference(fn, case, 128 ** -0.5)
        q, k, v, table, lens, qsl = big
        out = torch.empty_like(q)
        us = time_us(lambda: fn(out, q, k, v, table, lens, qsl, 8192, 128 ** -0.5), iters=10)
        print(f"{name:>8}: {'matches' if ok else 'DISAGREES WITH'} the reference; 8k causal {flops / us / 1e6:.0f} "
              f"TFLOP/s", flush=True)
    print(f"use PDCLI_WGMMA_DESC={','.join(map(str, found))}" + (" (the default)" if found == CANDIDATES[0] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
