"""CPU tests of the kernel build key and the fallback to the reference path."""
import os

import pytest
import torch

from pdcli.kernels import build, ops


def test_build_key_changes_with_source_and_arch(tmp_path, monkeypatch):
    k1 = build.build_key("9.0")
    assert k1 == build.build_key("9.0") and k1 != build.build_key("8.0")
    fake = tmp_path / "csrc"
    fake.mkdir()
    for name in os.listdir(build.CSRC):
        (fake / name).write_bytes(open(os.path.join(build.CSRC, name), "rb").read())
    monkeypatch.setattr(build, "CSRC", str(fake))
    assert build.build_key("9.0") == k1
    (fake / "decode_attention.cu").write_text("// changed\n" + (fake / "decode_attention.cu").read_text())
    assert build.build_key("9.0") != k1


def test_build_root_in_checkout_is_ignored_by_git():
    root = build.build_root()
    repo = os.path.dirname(os.path.dirname(build.CSRC))
    if os.path.isdir(os.path.join(repo, ".git")):
        assert root == os.path.join(repo, ".kernel_build")
        assert "/.kernel_build/" in open(os.path.join(repo, ".gitignore")).read()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
def test_no_gpu_falls_back_to_reference(monkeypatch):
    build.load.cache_clear()
    monkeypatch.setattr(build, "_warned", False)
    assert build.unavailable_reason() == "no CUDA GPU"
    with pytest.raises(build.KernelUnavailable):
        build.load()
    assert build.get() is None
    ops._kernels_for.cache_clear()
    assert ops.kernel_path(torch.device("cuda"), torch.bfloat16, 128, 4) == "reference"
    assert ops.kernel_path(torch.device("cpu"), torch.float32, 128, 4) == "reference"
    monkeypatch.setenv("PDCLI_REQUIRE_KERNEL", "1")
    with pytest.raises(build.KernelUnavailable, match="PDCLI_REQUIRE_KERNEL"):
        build.get()
    ops._kernels_for.cache_clear()


def test_disable_env_wins(monkeypatch):
    monkeypatch.setenv("PDCLI_DISABLE_KERNEL", "1")
    assert build.unavailable_reason() == "PDCLI_DISABLE_KERNEL is set"


TINY_SRC = """#include <pybind11/pybind11.h>
#include <cstdint>
int64_t twice(int64_t x) { return 2 * x; }
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("twice", &twice); }
"""
TINY_BUILD = """
import sys
from torch.utils.cpp_extension import load
from pdcli.kernels.build import build_once
d, src = sys.argv[1], sys.argv[2]
m = build_once("pdcli_tiny_ext", d, lambda: load(name="pdcli_tiny_ext", sources=[src], build_directory=d))
print(m.twice(21))
"""


def test_a_build_killed_midway_never_blocks_a_later_start(tmp_path):
    """torch's cpp_extension leaves its `lock` file behind when a build is killed, and every later build of that
    directory then waits on it for ever; build_once (an flock the kernel drops with its holder) clears it."""
    import signal
    import subprocess
    import sys
    import time

    d, src = tmp_path / "build", tmp_path / "tiny.cpp"
    d.mkdir()
    src.write_text(TINY_SRC)
    cmd = [sys.executable, "-c", TINY_BUILD, str(d), str(src)]
    first = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (d / "build.ninja").exists():  # the build has started (its lock taken before)
        assert first.poll() is None and time.monotonic() < deadline, "the first build did not start"
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(30)
    assert (d / "lock").exists()  # what a killed build leaves
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert again.returncode == 0 and again.stdout.strip().splitlines()[-1] == "42", again.stderr[-2000:]


def test_the_regression_check_flags_figures_worse_by_more_than_5_percent():
    from pdcli.benchmarks.check import compare

    old = dict(device="H200", decode_step_llama3_8b_bs1_ms=10.0, ttft_llama3_8b_2k_ms=40.0,
               offline_qwen3_8b_out_tok_s=10000.0, prefill_attn_8k_tflops=320.0, prefill_attn_8k_sdpa_tflops=540.0,
               hf_generate_llama3_8b_bs1_ms=20.0)
    new = dict(old, decode_step_llama3_8b_bs1_ms=10.4, ttft_llama3_8b_2k_ms=42.5, offline_qwen3_8b_out_tok_s=9400.0,
               prefill_attn_8k_tflops=400.0, prefill_attn_8k_sdpa_tflops=400.0, hf_generate_llama3_8b_bs1_ms=30.0)
    rows = {r["key"]: r for r in compare(new, old)}
    assert "device" not in rows
    assert [k for k, r in rows.items() if r["worse"]] == ["ttft_llama3_8b_2k_ms", "offline_qwen3_8b_out_tok_s"]
    assert rows["prefill_attn_8k_sdpa_tflops"]["reference"] and rows["hf_generate_llama3_8b_bs1_ms"]["reference"]


def test_per_op_roofline():
    from pdcli.benchmarks.roofline import (decode_step_ops, offline_bound_tok_s, offline_run_bound_tok_s,
                                           offline_serial_bound_tok_s, roofline_ms)
    from pdcli.models.arch import ModelArch
    from pdcli.models.presets import PRESETS

    arch = ModelArch.from_hf_config(PRESETS["llama3-8b"])
    bw, mm = 4.0e12, 700e12
    weights = arch.num_params() * 2 - arch.vocab_size * arch.hidden_size * 2  # the embedding table: rows gathered
    one = roofline_ms(decode_step_ops(arch, 1, 256), bw, mm)
    assert weights / bw * 1e3 < one < 1.01 * weights / bw * 1e3  # batch 1: the weight read
    ops = decode_step_ops(arch, 256, 256)
    assert sum(o["flops"] for o in ops) / mm * 1e3 < roofline_ms(ops, bw, mm)
    assert roofline_ms(ops, bw, mm) > sum(o["bytes"] for o in ops) / bw * 1e3  # the GEMMs' FLOPs count at 256
    tok_s, batch = offline_bound_tok_s(arch, 512, 1024, 1024, 256 * 2048, bw, mm)
    assert batch == 256 and tok_s == 256 / roofline_ms(decode_step_ops(arch, 256, 1536), bw, mm) * 1e3
    assert offline_bound_tok_s(arch, 512, 1024, 1024, 10**9, bw, mm, max_num_seqs=128)[1] == 128
    # the whole run: the prefill (linear FLOPs of every prompt token at least) and two waves of 256, 1023 steps each
    run = offline_run_bound_tok_s(arch, 512, 1024, 1024, 256 * 2048, bw, mm, 256)
    linear = arch.num_params() - 2 * arch.vocab_size * arch.hidden_size  # no embedding, logits of last rows only
    prefill_s = 2 * linear * 512 * 1024 / mm
    decode_s = 2 * 1023 * roofline_ms(decode_step_ops(arch, 256, 1536), bw, mm) / 1e3
    assert 512 * 1024 / (prefill_s * 1.2 + decode_s) < run < 512 * 1024 / (prefill_s + decode_s) < tok_s
    # any schedule of one kernel at a time: the prefill as above, the decode's linears (FLOP-bound at 256 rows
    # here) and every generated token's context K/V read once; no schedule of waves beats it
    serial = offline_serial_bound_tok_s(arch, 512, 1024, 1024, bw, mm, 256)
    kv_s = 512 * sum(range(1025, 2048)) * 2 * arch.num_key_value_heads * arch.head_dim * 2 * \
        arch.num_hidden_layers / bw
    decode_linear_s = 512 * 1023 * 2 * (linear + arch.vocab_size * arch.hidden_size) / mm
    assert 512 * 1024 / (prefill_s * 1.2 + decode_linear_s + kv_s) < serial
    assert serial < 512 * 1024 / (prefill_s + decode_linear_s + kv_s) and run < serial


def test_the_skinny_matmul_is_used_only_where_it_was_faster():
    from pdcli.kernels import gemv_choice

    def fake_gemv(y, x, w, bias):
        y.copy_(x @ w.T)

    w_fast, w_slow = torch.randn(16, 32), torch.randn(48, 32)
    # (gemv us, cuBLAS us) for 1-4 rows: the kernel faster on the 16x32 weight, slower on the 48x32 one
    timings = iter([1.0, 2.0] * 4 + [3.0, 2.0] * 4)
    rows = gemv_choice.tune([w_fast, w_slow], fake_gemv, time_us=lambda fn: next(timings))
    try:
        assert [r["path"] for r in rows] == ["gemv"] * 4 + ["cublas"] * 4
        assert gemv_choice.use_gemv(2, 16, 32) and not gemv_choice.use_gemv(2, 48, 32)
        assert gemv_choice.use_gemv(2, 99, 32)  # a shape never timed keeps the kernel
    finally:
        for m in gemv_choice.ROWS:
            gemv_choice._choice.pop((m, 16, 32), None)
            gemv_choice._choice.pop((m, 48, 32), None)


class FakeLt:
    """The cuBLASLt extension's interface on the CPU: two candidates per shape, #1 wrong for the 16x32 weight."""

    def __init__(self):
        self.calls = []

    def lt_algos(self, m, n, k, ldx, bf16, max_count, workspace_bytes):
        return torch.tensor([[0] * 8, [1] * 8], dtype=torch.uint8), torch.tensor([0, 1024])

    def lt_linear(self, y, x, w, blob, workspace):
        self.calls.append(int(blob[0]))
        y.copy_(x @ w.T + (1.0 if int(blob[0]) == 1 and w.shape[0] == 16 else 0.0))


def test_a_cublaslt_algorithm_is_used_only_where_it_matched_and_was_timed_faster():
    from pdcli.kernels import blas_choice, ops

    fake = FakeLt()
    w_lt, w_default = torch.randn(16, 32, dtype=torch.bfloat16), torch.randn(48, 32, dtype=torch.bfloat16)
    # per (shape, rows): default, then each candidate that matched. 16x32 at 8 rows: #0 clearly faster (#1 is
    # wrong: never timed); at 16 rows #0 within the margin. 48x32: #1 faster at 8 rows, neither at 16
    timings = iter([10.0, 9.0, 10.0, 9.9, 10.0, 12.0, 8.0, 10.0, 11.0, 10.5])
    rows = blas_choice.tune([w_lt, w_default], [8, 16], fake, time_us=lambda call, ws: next(timings))
    try:
        assert [r["algo"] for r in rows] == [0, None, 1, None]
        assert rows[0]["algos_us"] == [9.0, None] and rows[2]["algos_us"] == [12.0, 8.0]
        assert [r["library"] for r in rows] == ["cublaslt", "default", "cublaslt", "default"]
        fake.calls.clear()
        x8, x16 = torch.randn(8, 32, dtype=torch.bfloat16), torch.randn(16, 32, dtype=torch.bfloat16)
        assert torch.allclose(ops.linear(x8, w_lt), x8 @ w_lt.T) and fake.calls == [0]
        assert torch.allclose(ops.linear(x8, w_default), x8 @ w_default.T) and fake.calls == [0, 1]
        ops.linear(x16, w_lt)
        ops.linear(x8[:, :16].contiguous(), w_lt[:, :16].contiguous())  # a shape never timed
        ops.linear(x8, w_lt, torch.zeros(16, dtype=torch.bfloat16))  # with a bias: torch's
        ops.linear(x8.float(), w_lt.float())  # not half precision
        assert fake.calls == [0, 1]
    finally:
        for key in [(8, 16, 32), (16, 16, 32), (8, 48, 32), (16, 48, 32)]:
            blas_choice._choice.pop(key, None)


def test_the_prefill_kernel_is_chosen_per_chunk_length_among_those_that_match_the_reference():
    """PDCLI_PREFILL_KERNEL=auto: a kernel whose output disagrees with the reference is never used however fast
    it times; among the others the fastest per chunk-length bucket; untuned, mma.sync."""
    from pdcli.kernels import prefill_choice
    from pdcli.kernels.ops import reference_prefill

    def wrong(out, *args):
        out.zero_()

    assert prefill_choice.kernel_for(5000) == "mma"
    kernels = dict(mma=reference_prefill, wgmma=reference_prefill, wgmma_ws=wrong)
    shapes = ((256, 0), (1024, 64))
    timings = iter([3.0, 5.0, 9.0, 4.0])  # (mma, wgmma) per shape: mma faster on short chunks, wgmma on long
    try:
        rows = prefill_choice.tune(kernels, 4, 2, 16, 16, torch.float32, "cpu", time_us=lambda fn: next(timings),
                                   shapes=shapes)
        assert [r["choice"] for r in rows] == ["mma", "wgmma"]
        assert all("wgmma_ws_us" not in r for r in rows)  # failed the check: not even timed
        assert prefill_choice.kernel_for(100) == "mma" and prefill_choice.kernel_for(700) == "wgmma"
        assert prefill_choice.kernel_for(50000) == "wgmma"  # past the longest bucket: the longest's
    finally:
        prefill_choice._choice.clear()


def test_the_kernel_benchmark_reports_the_prefill_kernel_the_engine_runs(monkeypatch):
    """The kernels JSON's prefill figures are the engine's kernel's: by default (auto) the fastest that matched
    the reference, else the one PDCLI_PREFILL_KERNEL names."""
    from pdcli.benchmarks.kernels import engine_prefill_row

    rows = [dict(seq_len=8192, kernel="mma", tflops=320.0, correct=True),
            dict(seq_len=8192, kernel="wgmma", tflops=600.0, correct=False),
            dict(seq_len=8192, kernel="wgmma_ws", tflops=500.0, correct=True)]
    monkeypatch.delenv("PDCLI_PREFILL_KERNEL", raising=False)
    assert engine_prefill_row(rows, 8192)["kernel"] == "wgmma_ws"
    monkeypatch.setenv("PDCLI_PREFILL_KERNEL", "mma")
    assert engine_prefill_row(rows, 8192)["kernel"] == "mma"
    monkeypatch.setenv("PDCLI_PREFILL_KERNEL", "wgmma")
    assert engine_prefill_row(rows, 8192)["kernel"] == "wgmma"
    assert engine_prefill_row(rows[:1], 8192)["kernel"] == "mma"  # a build without the Hopper kernels


def test_the_prefill_kernel_the_engine_calls_and_the_one_its_benchmark_names_are_one_choice(monkeypatch):
    """ops.prefill_kernel_name: PDCLI_PREFILL_KERNEL's kernel, auto's per chunk length, the Hopper ones only where
    the build has them."""
    from types import SimpleNamespace

    from pdcli.kernels import prefill_choice
    from pdcli.kernels.ops import prefill_kernel, prefill_kernel_name

    hopper = SimpleNamespace(has_prefill_attention_wgmma=lambda d: d == 128, prefill_attention="mma_fn",
                             prefill_attention_wgmma="wgmma_fn", prefill_attention_wgmma_ws="ws_fn")
    monkeypatch.setenv("PDCLI_PREFILL_KERNEL", "wgmma")
    assert prefill_kernel_name(hopper, 128, 100) == "wgmma" and prefill_kernel(hopper, 128, 100) == "wgmma_fn"
    assert prefill_kernel_name(hopper, 64, 100) == "mma" and prefill_kernel(hopper, 64, 100) == "mma_fn"
    monkeypatch.delenv("PDCLI_PREFILL_KERNEL")
    assert prefill_kernel_name(hopper, 128, 8192) == "mma"  # auto, untuned
    prefill_choice._choice[:] = ["mma", "mma", "wgmma", "wgmma_ws"]
    try:
        assert prefill_kernel_name(hopper, 128, 8192) == "wgmma_ws" and prefill_kernel(hopper, 128, 8192) == "ws_fn"
        assert prefill_kernel_name(hopper, 128, 300) == "mma"
    finally:
        prefill_choice._choice.clear()
