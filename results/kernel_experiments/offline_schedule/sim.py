"""Issue 26's offline run (dummy:qwen3-8b, 512 x (1,024 -> 1,024), max_num_seqs 256, chunked prefill of 8,192 tokens a
step, a KV pool of 401,408 tokens as on an H100) simulated step by step under admission policies, each step timed
by the per-op roofline at an H100's measured rates (the committed engine file's): what scheduling alone could buy.
  waves:   the engine's (admission_reserve 1.0): admit while the free pool also covers every running sequence's
           remaining max_tokens; equal requests then run in waves that end together.
  peak:    admit while the pool's peak over the future (every running sequence growing to its max, the finished
           ones gone) stays within it: exact for known lengths, no preemption ever; at most `rate` sequences a
           step on average (pacing staggers them).
  greedy:  admit while the prompt fits (vLLM); when a decode needs a block and none is free, the youngest running
           sequence is preempted and recomputed later.
  park:    greedy admission too, but out of blocks the oldest running sequences' K/V are parked in host memory
           (and brought back, youngest first, before anything new is admitted, once they fit with `headroom` tokens
           to grow): the short contexts keep the batch large; the copies run on the copy engines beside the steps
           at PCIE bytes/s (both ways counted), a step lasting at least as long as its copies. (Parking the
           youngest and bringing back the oldest first gave 8,074 tok/s.)
One JSON line per policy; from the repo root: PYTHONPATH=$PWD python results/kernel_experiments/offline_schedule/sim.py
(`--pools`: waves, greedy and park at larger pools and max_num_seqs, h100_pools.jsonl)."""
import json

from pdcli.benchmarks.roofline import decode_step_ops
from pdcli.models.arch import ModelArch
from pdcli.models.presets import PRESETS

ARCH = ModelArch.from_hf_config(PRESETS["qwen3-8b"])
ENGINE = json.load(open("results/engine_nvidia-h100-80gb-hbm3.json"))
BW, MM = ENGINE["copy_bw_bytes_s"], ENGINE["matmul_bf16_flop_s"]
N, PROMPT, OUT, MAX_SEQS, CHUNK, BLOCK, POOL = 512, 1024, 1024, 256, 8192, 64, 6272 * 64
PCIE = 25e9  # bytes/s host <-> device, both directions together (H100 SXM: PCIe Gen5 x16)
KV_TOKEN = 2 * ARCH.num_key_value_heads * ARCH.head_dim * 2 * ARCH.num_hidden_layers  # bytes, K and V
LINEARS = [o for o in decode_step_ops(ARCH, 1, 0) if o["flops"] > 0 and o["name"] != "lm_head"]
HEAD = next(o for o in decode_step_ops(ARCH, 1, 0) if o["name"] == "lm_head")
ATTN_FLOP = 4 * ARCH.num_attention_heads * ARCH.head_dim * ARCH.num_hidden_layers  # per (query, key) pair


def step_s(rows: int, sampled: int, decode_keys: int, prefill_pairs: int) -> float:
    """One step's time at the per-op roofline: every linear at max(weights / bandwidth, FLOPs / matmul rate)."""
    t = sum(max(o["bytes"] / BW, o["flops"] * rows / MM) for o in LINEARS)
    t += max(HEAD["bytes"] / BW, HEAD["flops"] * sampled / MM)
    return t + decode_keys * KV_TOKEN / BW + prefill_pairs * ATTN_FLOP / MM


def blocks(tokens: int) -> int:
    return -(-tokens // BLOCK)


def unpark(parked: list, running: list, used: int, headroom: int) -> tuple[int, int]:
    """Parked sequences back on the GPU, oldest first, while they fit with headroom: (blocks used, bytes copied)."""
    moved = 0
    parked.sort(key=lambda s: s["gen"])
    while parked and len(running) < MAX_SEQS and used + blocks(parked[0]["ctx"] + headroom) <= POOL // BLOCK:
        s = parked.pop(0)
        running.append(s)
        used += blocks(s["ctx"])
        moved += s["ctx"] * KV_TOKEN
    return used, moved


def simulate(policy: str, rate: float = MAX_SEQS, headroom: int = 64) -> dict:
    waiting = [[PROMPT, 0] for _ in range(N)]  # [tokens to (re)compute, tokens generated]
    running, parked = [], []  # dicts: ctx (tokens with K/V), todo (prompt tokens left to prefill), gen
    t = steps = preempted = 0
    done = 0
    while done < N:
        used = sum(blocks(s["ctx"] + s["todo"]) for s in running)
        used, copied = unpark(parked, running, used, headroom) if parked else (used, 0)
        admitted_now = 0
        while waiting and not parked and len(running) < MAX_SEQS and admitted_now < int((steps + 1) * rate) - int(steps * rate):
            need, gen = waiting[0]
            if policy == "waves":
                future = sum(blocks(PROMPT + OUT) - blocks(s["ctx"] + s["todo"]) for s in running)
                ok = used + future + blocks(PROMPT + OUT) <= POOL // BLOCK
            elif policy == "peak":
                rest = sorted(OUT - s["gen"] for s in running) + [OUT - gen]
                ok = all(sum(blocks(PROMPT + OUT - r + a) for r in rest if r > a) <= POOL // BLOCK
                         for a in {0, *rest})
            else:
                ok = used + blocks(need) <= POOL // BLOCK
            if not ok:
                break
            waiting.pop(0)
            running.append(dict(ctx=0, todo=need, gen=gen))
            used += blocks(need)
            admitted_now += 1
        decode = [s for s in running if s["todo"] == 0]
        budget = CHUNK - len(decode)
        pairs = rows_prefill = sampled = 0
        for s in running:
            if s["todo"] and budget > 0:
                c = min(s["todo"], budget)
                pairs += c * s["ctx"] + c * (c + 1) // 2
                s["ctx"] += c
                s["todo"] -= c
                budget -= c
                rows_prefill += c
                if s["todo"] == 0 and s["gen"] == 0:
                    s["gen"] = 1  # the first token comes with the prefill
                    sampled += 1
        keys = sum(s["ctx"] for s in decode)
        t_step = step_s(len(decode) + rows_prefill, len(decode) + sampled, keys, pairs)
        steps += 1
        for s in decode:
            s["ctx"] += 1
            s["gen"] += 1
        while policy in ("greedy", "park") and sum(blocks(s["ctx"] + s["todo"]) for s in running) > POOL // BLOCK:
            if policy == "park":  # out of blocks: the oldest decoding sequence
                victim = max((s for s in running if s["todo"] == 0), key=lambda s: s["gen"])
            else:  # the youngest
                victim = min(running, key=lambda s: s["gen"])
            running.remove(victim)
            preempted += 1
            if policy == "park":
                parked.append(victim)
                copied += victim["ctx"] * KV_TOKEN
            else:  # back to the queue, to be recomputed
                waiting.insert(0, [PROMPT + victim["gen"] - 1, victim["gen"]] if victim["gen"] else [PROMPT, 0])
        t += max(t_step, copied / PCIE)
        finished = [s for s in running if s["gen"] >= OUT]
        done += len(finished)
        running = [s for s in running if s["gen"] < OUT]
    return dict(policy=policy, rate=rate, headroom=headroom, seconds=round(t, 2), out_tok_s=round(N * OUT / t), steps=steps,
                mean_decode_batch=round(N * (OUT - 1) / steps, 1), preemptions=preempted)


def pool_sweep() -> None:
    """Larger pools (gpu_memory_utilization 0.9 gives 401,408 tokens on an H100; 0.95 about 430,000) and max_num_seqs."""
    global POOL, MAX_SEQS
    for POOL in (401408, 430080, 458752):
        for MAX_SEQS in (256, 384, 512):
            for row in (simulate("waves"), simulate("greedy"), simulate("park")):
                print(json.dumps(dict(row, pool_tokens=POOL, max_num_seqs=MAX_SEQS)), flush=True)


if __name__ == "__main__" and "--pools" in __import__("sys").argv:
    pool_sweep()
elif __name__ == "__main__":
    print(json.dumps(dict(copy_bw_gb_s=round(BW / 1e9), matmul_tflop_s=round(MM / 1e12), pool_tokens=POOL)))
    print(json.dumps(simulate("waves")), flush=True)
    print(json.dumps(simulate("greedy")), flush=True)
    for headroom in (0, 64, 128, 512):
        print(json.dumps(simulate("park", headroom=headroom)), flush=True)
    for rate in (256, 8, 2, 1, 0.5, 0.35, 0.25):
        print(json.dumps(simulate("peak", rate)), flush=True)
