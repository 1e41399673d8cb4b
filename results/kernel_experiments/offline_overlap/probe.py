"""Issue 26's offline target needs the prefill's GEMMs running beside the decode's K/V reads on one GPU
(docs/perf-notes.md, session 29). This probe runs the real model's two halves of the offline run at once: decode
steps of dummy:qwen3-8b (the engine's CUDA graph, batch B at 1,536-token contexts, lm_head included) and prefill
passes (eager, 8 prompts of 1,024 tokens a pass), in rounds of 48 decode steps to one prefill pass (about the
offline run's ratio of decode time to prefill time). Each half alone on the whole GPU, the two one after the other,
together on two plain streams, and together with the SMs split by CUDA green contexts (decode on S SMs, prefill on
the rest), each half alone in its partition too. On one H100 (session 29) the engine's graph, captured outside
the partitions, ran as fast on every partition as on the whole GPU: rows with "captured_in_partition" replay a
decode graph captured on the partition's own stream instead (written after that run; not yet run). Timing only:
the KV pool's contents are whatever it holds; the decode sequences' blocks and the prefill's are disjoint. JSON
lines; from the repo root:
    PYTHONPATH=$PWD python results/kernel_experiments/offline_overlap/probe.py [B] [--carveout-only | --captured-only]
(session 30: the carve-out rows; --captured-only: the baseline and the rows captured in their partition alone)."""
import json
import sys

import torch

from pdcli import LLM, SamplingParams
from pdcli.engine.sequence import Sequence
from pdcli.models.context import set_context

sys.path.insert(0, "results/kernel_experiments/overlap_probe")
from green import ms_per_rep, on_streams  # noqa: E402

B = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 128
CTX, PROMPT, PREFILL_SEQS, DECODES_PER_PREFILL, REPS = 1536, 1024, 8, 48, 3
llm = LLM("dummy:qwen3-8b", device="cuda", max_model_len=2048 + 16)
eng, runner = llm.engine, llm.engine.runner


def allocated(n: int, length: int, tag: str) -> list[Sequence]:
    seqs = []
    for i in range(n):  # distinct tokens: no block shared through the prefix cache
        s = Sequence(f"{tag}{i}", [1000 + (i * 131 + j * 7) % 20000 for j in range(length)], SamplingParams(), seed=0)
        assert eng.block_manager.allocate(s, length), "the KV pool is full"
        seqs.append(s)
    return seqs


dec, pre = allocated(B, CTX + 1, "d"), allocated(PREFILL_SEQS, PROMPT, "p")
d_ids = torch.full((B,), 1000, dtype=torch.long, device="cuda")
d_tables, d_starts = [s.block_table for s in dec], [CTX] * B
p_ids = torch.randint(1000, 20000, (PREFILL_SEQS * PROMPT,), device="cuda")
p_tables = [s.block_table for s in pre]


@torch.inference_mode()
def decode_round():
    for _ in range(DECODES_PER_PREFILL):
        runner.model.compute_logits(runner._replay(d_ids, d_tables, d_starts))


@torch.inference_mode()
def prefill_pass():
    runner._forward(p_ids, p_tables, [0] * PREFILL_SEQS, [PROMPT] * PREFILL_SEQS,
                    [PROMPT * (i + 1) - 1 for i in range(PREFILL_SEQS)], True)


def timed(jobs) -> float:
    return round(ms_per_rep(on_streams(jobs), REPS), 2)


nop = lambda: None  # noqa: E731
sms = torch.cuda.get_device_properties(0).multi_processor_count
s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
d_full, p_full = timed([(s1, decode_round, nop, nop)]), timed([(s2, prefill_pass, nop, nop)])
both = timed([(s1, decode_round, nop, nop), (s2, prefill_pass, nop, nop)])
print(json.dumps(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, sms=sms, batch=B, ctx=CTX,
                      decodes_per_round=DECODES_PER_PREFILL, decode_round_ms=d_full, prefill_pass_ms=p_full,
                      in_turn_ms=round(d_full + p_full, 2), streams_both_ms=both,
                      streams_vs_in_turn=round(both / (d_full + p_full), 3))), flush=True)
try:
    from torch.cuda.green_contexts import GreenContext
except ImportError:
    GreenContext = None


def green_rows(decode_sms_list, make_decode, **tags) -> None:
    """Per split: the decode (make_decode(its green context) -> a round) on decode_sms SMs, prefill on the rest."""
    for decode_sms in decode_sms_list if GreenContext is not None else ():
        row = dict(decode_sms=decode_sms, **tags)
        try:
            gd, gp = GreenContext.create(num_sms=decode_sms), GreenContext.create(num_sms=sms - decode_sms)
            jd = (gd.Stream(), make_decode(gd), gd.set_context, gd.pop_context)
            jp = (gp.Stream(), prefill_pass, gp.set_context, gp.pop_context)
            row.update(decode_ms=timed([jd]), prefill_ms=timed([jp]), both_ms=timed([jd, jp]))
            row["both_vs_in_turn"] = round(row["both_ms"] / (d_full + p_full), 3)
        except Exception as e:  # noqa: BLE001
            row["error"] = repr(e)[:300]
        print(json.dumps(row), flush=True)


if "--carveout-only" not in sys.argv and "--captured-only" not in sys.argv:
    green_rows((66, 80, 96, 112), lambda g: decode_round)


def decode_round_captured_in(green):
    """A decode round replaying a graph of the step captured on the partition's own stream (warmed up there
    first: cuBLAS makes its handles and workspace outside the capture); lm_head after it, eagerly, as the engine."""
    graphs = runner.graphs
    bs = graphs.bucket(B)
    stream = green.Stream()
    graph = torch.cuda.CUDAGraph()
    green.set_context()
    try:
        with torch.inference_mode(), torch.cuda.stream(stream):
            set_context(graphs._context(bs))
            graphs.model(graphs.input_ids[:bs], graphs.positions[:bs])
            set_context(graphs._context(bs))
            with torch.cuda.graph(graph, stream=stream):
                hidden = graphs.model(graphs.input_ids[:bs], graphs.positions[:bs])
        stream.synchronize()
    finally:
        set_context(None)
        green.pop_context()

    @torch.inference_mode()
    def rounds():
        for _ in range(DECODES_PER_PREFILL):
            graph.replay()
            runner.model.compute_logits(hidden[:B])
    return rounds


if "--carveout-only" not in sys.argv:
    green_rows((66, 80, 96), decode_round_captured_in, captured_in_partition=True)


def carveout_rows(carveouts) -> None:
    """Plain streams, the prefill's cuBLAS GEMMs leaving `carveout` SMs free (torch's experimental SM carve-out) so
    the decode graph's kernels can run beside them; the prefill alone with the carve-out too."""
    for carveout in carveouts:
        row = dict(carveout_sms=carveout)
        try:
            torch._C._set_sm_carveout_experimental(carveout)
            row.update(prefill_ms=timed([(s2, prefill_pass, nop, nop)]),
                       both_ms=timed([(s1, decode_round, nop, nop), (s2, prefill_pass, nop, nop)]))
            row["both_vs_in_turn"] = round(row["both_ms"] / (d_full + p_full), 3)
        except Exception as e:  # noqa: BLE001
            row["error"] = repr(e)[:300]
        finally:
            torch._C._set_sm_carveout_experimental(None)
        print(json.dumps(row), flush=True)


if "--captured-only" not in sys.argv:
    carveout_rows((16, 32, 48, 66))
