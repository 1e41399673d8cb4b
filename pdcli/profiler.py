"""`pdcli profile`: measure the real engine on this hardware for the cost model.

Prefill steps (chunk n after c cached tokens), decode steps (batch B, total context S), mixed steps
(a decode batch carrying a prefill chunk), all through ModelRunner.execute (CUDA graphs included); KV
transfer through the real worker paths (CentralScheduler with a prefill and a decode worker).
"""
from __future__ import annotations

import platform
import random
import re
import time

import torch

from pdcli import __version__
from pdcli.engine.llm_engine import LLMEngine
from pdcli.engine.scheduler import SchedulerOutput
from pdcli.engine.sequence import Sequence
from pdcli.router.fit import SCHEMA_VERSION
from pdcli.sampling_params import SamplingParams


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "x"


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")


class StepTimer:
    def __init__(self, engine: LLMEngine, seed: int = 0):
        self.engine, self.rng = engine, random.Random(seed)
        self.vocab = engine.arch.vocab_size

    def _seq(self, length: int) -> Sequence:
        return Sequence("profile", [self.rng.randrange(self.vocab) for _ in range(length)],
                        SamplingParams(temperature=0), 0)

    def time_step(self, batch: list[tuple[Sequence, int]], reps: int) -> float:
        """Median ms of runner.execute over a batch of (sequence, new tokens); KV content is irrelevant."""
        e = self.engine
        out = SchedulerOutput([s for s, _ in batch], [n for _, n in batch])
        sync = torch.cuda.synchronize if e.device.type == "cuda" else (lambda: None)
        times = []
        for _ in range(reps + 1):
            sync()
            t = time.perf_counter()
            e.runner.execute(out)
            sync()
            times.append((time.perf_counter() - t) * 1e3)
        return sorted(times[1:])[len(times[1:]) // 2]

    def prepared(self, total: int, computed: int) -> Sequence | None:
        seq = self._seq(total)
        if not self.engine.block_manager.allocate(seq, total):
            return None
        seq.num_computed_tokens = computed
        return seq

    def free(self, seqs) -> None:
        for s in seqs:
            self.engine.block_manager.free_seq(s)


def profile_engine(engine: LLMEngine, progress=None, max_seconds: float = 300.0, reps: int = 3) -> dict:
    t = StepTimer(engine)
    budget_tokens = engine.config.scheduler.max_num_batched_tokens
    cap = engine.max_model_len
    chunks = [n for n in (16, 64, 256, 1024, 2048, 4096, 8192) if n <= budget_tokens] or [budget_tokens]
    ctxs = [c for c in (0, 1024, 4096, 16384) if c + chunks[-1] <= cap] or [0]
    batches = [b for b in (1, 4, 16, 64, 128, 256) if b <= engine.config.scheduler.max_num_seqs]
    per_seq = [c for c in (128, 1024, 4096) if c < cap]
    plan = [("prefill", n, c) for c in ctxs for n in chunks] + [("decode", b, s) for s in per_seq for b in batches] + \
           [("mixed", b, n) for b in batches[1::2] for n in chunks[1::2]]
    data = dict(prefill=dict(n=[], c=[], ms=[]), decode=dict(batch=[], ctx=[], ms=[]),
                mixed=dict(batch=[], ctx=[], n=[], c=[], ms=[]))
    start = time.monotonic()
    task = progress.add_task("profiling steps", total=len(plan)) if progress else None
    for kind, a, b in plan:
        if time.monotonic() - start > max_seconds:
            break
        if kind == "prefill":
            seq = t.prepared(b + a, b)
            if seq:
                data["prefill"]["n"].append(a), data["prefill"]["c"].append(b)
                data["prefill"]["ms"].append(t.time_step([(seq, a)], reps))
                t.free([seq])
        else:
            ctx = b if kind == "decode" else 512
            seqs = [t.prepared(ctx, ctx - 1) for _ in range(a)]
            extra = t.prepared(b, 0) if kind == "mixed" else None
            if all(seqs) and (kind == "decode" or extra):
                batch = [(s, 1) for s in seqs] + ([(extra, b)] if extra else [])
                ms = t.time_step(batch, reps)
                if kind == "decode":
                    data["decode"]["batch"].append(a), data["decode"]["ctx"].append(a * ctx), data["decode"]["ms"].append(ms)
                else:
                    for key, v in (("batch", a), ("ctx", a * ctx), ("n", b), ("c", 0), ("ms", ms)):
                        data["mixed"][key].append(v)
            t.free([s for s in seqs if s] + ([extra] if extra else []))
        if progress:
            progress.advance(task)
    return data


def profile_transfer(model: str, device: str, engine_kwargs: dict, progress=None) -> dict:
    """KV transfer time vs tokens through real prefill -> decode worker pairs: gloo on CPU; on a GPU, the
    same-GPU CUDA IPC pair, and GPU to GPU over NCCL when there is a second GPU."""
    from pdcli.coordinator.central import CentralScheduler
    from pdcli.workers.layout import parse_layout, transfer_pair

    if device == "cpu":
        pairs = [("cpu", "cpu")]
    else:
        pairs = [(device, device)]
        if torch.cuda.device_count() > 1:
            idx = int(device.split(":")[1]) if ":" in device else 0
            pairs.append((device, f"cuda:{(idx + 1) % torch.cuda.device_count()}"))
    lens = (16, 64, 256, 1024, 2048)
    result = {}
    for pre, dec in pairs:
        layout = parse_layout("", pre, dec)
        kind = transfer_pair(*layout)
        out = dict(tokens=[], bytes=[], ms=[])
        task = progress.add_task(f"profiling KV transfer ({kind})", total=len(lens) * 3) if progress else None
        with CentralScheduler(model, layout, mode="disaggregated", **engine_kwargs) as cs:
            rng = random.Random(0)
            sp = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
            cs.generate([[rng.randrange(3, 256) for _ in range(lens[0])]], sp, timeout=300)  # warm-up: the first
            # transfer sets the path up (20 ms against 0.8 on the H100's same-GPU pair) and is not timed
            for n in lens:
                for _ in range(3):
                    t = cs.submit([rng.randrange(3, 256) for _ in range(n)], sp)
                    cs.wait_transfer(t, 300)
                    if t.error is None and t.transfer_bytes and t.transfer_kind:
                        out["tokens"].append(n), out["bytes"].append(t.transfer_bytes)
                        out["ms"].append(t.transfer_s * 1e3)
                    if progress:
                        progress.advance(task)
        result[kind] = out
    return result


def provenance(engine: LLMEngine, model: str, command: str) -> dict:
    return dict(pdcli=__version__, torch=str(torch.__version__), cuda=str(torch.version.cuda), device=device_name(engine.device),
                model=model, dtype=str(engine.dtype), kernel_path=engine.runner.kernel_path, command=command,
                date=time.strftime("%Y-%m-%dT%H:%M:%S"))


def build_profile(engine: LLMEngine, model: str, steps: dict, transfer: dict, command: str) -> dict:
    return dict(schema_version=SCHEMA_VERSION, model=model, device=device_name(engine.device),
                max_num_batched_tokens=engine.config.scheduler.max_num_batched_tokens,
                kv_bytes_per_token=engine.arch.kv_bytes_per_token * engine.dtype.itemsize,
                provenance=provenance(engine, model, command), transfer=transfer, **steps)
