"""GPU checks (reference attention path): tiny-model equivalence on CUDA, dummy presets run."""
import subprocess
import sys

import pytest
import torch

from conftest import assert_pool_full
from pdcli import LLM, SamplingParams
from tiny_models import hf_greedy, hf_logits, pdcli_logits

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("name", ["llama-gqa", "qwen2-gqa-tied", "qwen3-gqa", "llama3-rope"])
def test_cuda_fp32_tokens_match_hf(name, tiny_model_dir, prompts):
    path = tiny_model_dir(name)
    ref = hf_greedy(path, prompts, 32, device="cuda")
    llm = LLM(path, device="cuda", dtype="float32", max_num_batched_tokens=16, block_size=8, num_kv_blocks=64)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    assert [o.token_ids for o in outs] == ref
    assert_pool_full(llm)


@pytest.mark.parametrize("name", ["llama-gqa", "qwen2-gqa-tied", "qwen3-gqa"])
def test_cuda_bf16_logits_close_to_hf(name, tiny_model_dir, prompts):
    path = tiny_model_dir(name)
    ref32 = hf_logits(path, prompts[2], device="cuda")
    ref16 = hf_logits(path, prompts[2], device="cuda", dtype=torch.bfloat16)
    llm = LLM(path, device="cuda", dtype="bfloat16", block_size=8, num_kv_blocks=64)
    ours = pdcli_logits(llm, prompts[2])
    err, hf_err = (ours - ref32).norm() / ref32.norm(), (ref16 - ref32).norm() / ref32.norm()
    print(f"{name}: bf16 rel err pdcli {err:.2e}, transformers {hf_err:.2e}")
    assert err < max(2 * hf_err, 1e-2)


def test_cuda_dummy_qwen3_0_6b_generate():
    r = subprocess.run([sys.executable, "-m", "pdcli", "generate", "Hello, my name is", "--model", "dummy:qwen3-0.6b",
                        "--max-tokens", "32", "--ignore-eos"], capture_output=True, text=True, timeout=600)
    print(r.stdout, r.stderr)
    assert r.returncode == 0, r.stderr
    assert "32 tokens" in r.stderr and "cuda" in r.stderr
