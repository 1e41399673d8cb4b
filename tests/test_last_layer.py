"""The last layer runs only the rows that get logits: same logits as running every row (CPU, fp32)."""
import torch

from pdcli import LLM
from pdcli.engine.sequence import Sequence
from pdcli.models.context import set_context
from pdcli.sampling_params import SamplingParams


def test_pruned_last_layer_gives_the_full_logits(tiny_model_dir, prompts):
    llm = LLM(tiny_model_dir("llama-gqa"), device="cpu", dtype="float32", num_kv_blocks=64)
    engine, runner = llm.engine, llm.engine.runner
    a, b = prompts[0][:20], prompts[1][:13]
    seqs = [Sequence(f"s{i}", p, SamplingParams(), seed=0) for i, p in enumerate((a, b))]
    for s in seqs:
        assert engine.block_manager.allocate(s, len(s))
    ids = torch.tensor(a + b)
    positions = torch.cat([torch.arange(len(a)), torch.arange(len(b))])
    logits = {}
    try:
        with torch.inference_mode():
            for pruned in (True, False):
                ctx = runner._context([s.block_table for s in seqs], [0, 0], [len(a), len(b)],
                                      [len(a) - 1, len(a) + len(b) - 1])
                assert ctx.last_layer is not None
                if not pruned:
                    ctx.last_layer = None
                set_context(ctx)
                hidden = runner.model(ids, positions)
                if not pruned:
                    hidden = hidden[ctx.logits_indices]
                assert hidden.shape[0] == 2
                logits[pruned] = runner.model.compute_logits(hidden)
    finally:
        set_context(None)
        for s in seqs:
            engine.block_manager.free_seq(s)
    torch.testing.assert_close(logits[True], logits[False], rtol=1e-5, atol=1e-5)
