import json
import os

import pytest
import torch

from conftest import assert_pool_full
from pdcli import LLM, SamplingParams
from pdcli.models.arch import ModelArch
from pdcli.models.loader import ModelLoadError, resolve
from pdcli.models.presets import PRESETS
from tiny_models import hf_logits, pdcli_logits


def test_gguf_default_model_matches_transformers_greedy():
    """SmolLM2's GGUF: our loader (dequantise, un-permute q/k) gives transformers' own greedy tokens."""
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pdcli.models.loader import SMOLLM2_FILE, smollm2_path

    path = smollm2_path()
    folder = os.path.dirname(path)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_FILE)
    hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_FILE, torch_dtype=torch.float32)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    ref = hf.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False)[0, len(ids):].tolist()
    llm = LLM("smollm2", device="cpu")
    out = llm.generate("What is the capital of France?", SamplingParams(temperature=0, max_tokens=20), chat=True)[0]
    assert llm.engine.encode("What is the capital of France?", chat=True) == ids
    ref = ref[:ref.index(tok.eos_token_id) + 1] if tok.eos_token_id in ref else ref
    assert out.token_ids == ref
    assert "Paris" in out.text
    assert_pool_full(llm)


@pytest.mark.parametrize("preset, params_b", [("llama3-8b", 8.03), ("qwen3-8b", 8.19), ("qwen3-0.6b", 0.596),
                                              ("qwen2-1.5b", 1.54)])
def test_presets_have_real_shapes(preset, params_b):
    arch = ModelArch.from_hf_config(PRESETS[preset])
    assert arch.num_params() / 1e9 == pytest.approx(params_b, rel=0.01)


def test_qwen3_8b_kv_bytes():
    arch = ModelArch.from_hf_config(PRESETS["qwen3-8b"])
    assert arch.kv_bytes_per_token * 2 * 2048 == 301_989_888  # 302 MB for a 2k prompt in bf16


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2", "tiny-qwen3"])
def test_dummy_tiny_presets_generate(preset):
    llm = LLM(f"dummy:{preset}", device="cpu", num_kv_blocks=32)
    out = llm.generate(["hello", [5, 6, 7]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert [len(o.token_ids) for o in out] == [8, 8]
    assert_pool_full(llm)


@pytest.mark.parametrize("dtype, tol", [("bfloat16", 0.08), ("float16", 0.01)])
def test_half_precision_logits_close_to_fp32_hf(dtype, tol, tiny_model_dir, prompts):
    path = tiny_model_dir("qwen3-gqa")
    llm = LLM(path, device="cpu", dtype=dtype, num_kv_blocks=32)
    ours = pdcli_logits(llm, prompts[2])
    ref = hf_logits(path, prompts[2])
    assert (ours - ref).abs().max().item() < tol * ref.abs().max().item()


def test_fp32_logits_match_hf(tiny_model_dir, prompts):
    path = tiny_model_dir("qwen2-yarn")
    llm = LLM(path, device="cpu", num_kv_blocks=32)
    torch.testing.assert_close(pdcli_logits(llm, prompts[2]), hf_logits(path, prompts[2]), atol=1e-4, rtol=1e-4)


def test_hf_dir_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json"):
        resolve(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ModelLoadError, match="safetensors"):
        resolve(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="unsupported architecture"):
        resolve(str(tmp_path))


def test_missing_weight_is_reported(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    src = tiny_model_dir("llama-gqa")
    for f in os.listdir(src):
        if f != "model.safetensors":
            (tmp_path / f).write_bytes(open(os.path.join(src, f), "rb").read())
    weights = load_file(os.path.join(src, "model.safetensors"))
    weights.pop("model.layers.1.mlp.down_proj.weight")
    save_file(weights, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="missing"):
        LLM(str(tmp_path), device="cpu", num_kv_blocks=8)


def test_prompt_too_long_and_bad_token_rejected():
    llm = LLM("dummy:tiny-llama", device="cpu", num_kv_blocks=4, block_size=8)  # 32-token cache
    with pytest.raises(ValueError, match="KV cache"):
        llm.generate([list(range(3, 40))])
    with pytest.raises(ValueError, match="vocabulary"):
        llm.generate([[1, 2, 10**6]])
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]])
    assert_pool_full(llm)
