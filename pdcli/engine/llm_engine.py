from __future__ import annotations

import gc
import itertools
import random
import time
from dataclasses import dataclass, field
from datetime import timedelta

import torch

from pdcli.config import EngineConfig
from pdcli.engine.block_manager import BlockManager
from pdcli.engine.detokenizer import DetokenizeWindow, ends_on_stop_token, stop_string_end, visible_token_ids
from pdcli.engine.model_runner import ModelRunner, StepFuture
from pdcli.engine.prefill_progress import PrefillProgress
from pdcli.engine.scheduler import Scheduler
from pdcli.engine.sequence import Sequence, SequenceStatus
from pdcli.inputs import PromptError, check_prompt  # noqa: F401 (PromptError: part of this module's API)
from pdcli.models.arch import ModelArch
from pdcli.models.loader import build_model, resolve
from pdcli.models.tokenizer import eos_token_ids
from pdcli.outputs import CompletionOutput, RequestOutput, StepDelta
from pdcli.sampling_params import SamplingParams

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "float32": torch.float32, "fp32": torch.float32, "float": torch.float32}


def resolve_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available here; use --device cpu")
    return dev


def resolve_dtype(dtype: str, device: torch.device, arch: ModelArch) -> torch.dtype:
    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.float16 if arch.torch_dtype in ("float16", "fp16") else torch.bfloat16
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use auto, bfloat16, float16 or float32")
    return DTYPES[dtype]


def build_runner(config: EngineConfig, rank: int, device: str, store_port: int | None = None, store=None,
                 source=None) -> ModelRunner:
    """This rank's model and runner; with tensor_parallel_size > 1 inside the TP group, whose ranks meet on the
    store rank 0 hosts (`store` there, `store_port` elsewhere)."""
    import torch.distributed as dist

    from pdcli.distributed.tp import TPGroup, tp_group, using_tp

    dev = resolve_device(device)
    source = source or resolve(config.model)
    arch = ModelArch.from_hf_config(source.hf_config)
    max_len = config.scheduler.max_model_len or arch.max_position_embeddings
    tp = TPGroup()
    if config.tensor_parallel_size > 1:
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        if store is None:
            store = dist.TCPStore("127.0.0.1", store_port, is_master=False, timeout=timedelta(seconds=60))
        tp = tp_group(store, "pdcli/tp/", rank, config.tensor_parallel_size, dev)
    with using_tp(tp):
        torch.manual_seed(config.seed)
        model = build_model(source, dev, resolve_dtype(config.dtype, dev, arch), max_len, config.seed)
        return ModelRunner(model, config.cache, config.scheduler, max_len, config.enforce_eager)


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    stream: bool = False  # detokenize every step (else once, when a completion finishes)
    seqs: list[Sequence] = field(default_factory=list)
    finished_time: float | None = None

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)

    def output(self) -> RequestOutput:
        seqs = sorted(self.seqs, key=lambda s: s.index)
        first = [s.first_token_time for s in seqs if s.first_token_time is not None]
        return RequestOutput(
            request_id=self.request_id, prompt=self.prompt, prompt_token_ids=self.prompt_token_ids,
            outputs=[CompletionOutput(s.index, s.text, s.output_token_ids, s.finish_reason, s.logprobs) for s in seqs],
            finished=self.finished, num_cached_tokens=seqs[0].num_cached_tokens,
            metrics={"arrival_time": seqs[0].arrival_time, "first_token_time": min(first) if first else None,
                     "finished_time": self.finished_time})


class LLMEngine:
    """schedule -> execute -> update, one step at a time."""

    def __init__(self, config: EngineConfig):
        self.config = config
        self.device = resolve_device(config.device)
        source = resolve(config.model)
        arch = ModelArch.from_hf_config(source.hf_config)
        self.arch = arch
        self.dtype = resolve_dtype(config.dtype, self.device, arch)
        self.tokenizer = source.tokenizer
        max_len = config.scheduler.max_model_len or arch.max_position_embeddings
        self.followers = []  # tensor parallelism's ranks 1.. (distributed/followers.py): (process, pipe)
        self.runner = self._start_runner(config, source)
        self.block_manager = BlockManager(self.runner.num_blocks, config.cache.block_size,
                                          config.cache.enable_prefix_caching)
        self.cache_capacity = self.runner.num_blocks * config.cache.block_size  # tokens
        self.max_model_len = min(max_len, self.cache_capacity)
        self.eos_token_ids = eos_token_ids(arch, self.tokenizer)
        self.runner.eos_token_ids = self.eos_token_ids
        self.structured = None  # StructuredOutputs, made for the first request with response_format
        self.scheduler = Scheduler(config.scheduler, self.block_manager, self.max_model_len, self.eos_token_ids)
        self.requests: dict[str, Request] = {}
        self.report_prefill_progress = False  # a worker sets it and takes the reports after each step
        self._prefill_progress = PrefillProgress()  # reported once the device has run the steps that made it
        self.handoff: dict[str, Sequence] = {}  # request id -> sequence whose KV is being handed over
        self._ids = itertools.count()
        self._rng = random.Random(config.seed)
        self.detokenize = True  # workers leave text to the coordinator (stop strings still need it here)
        self.async_scheduling = config.async_scheduling if config.async_scheduling is not None else \
            self.device.type == "cuda"
        self._inflight: StepFuture | None = None  # launched step whose tokens have not landed
        gc.freeze()  # what start-up made (torch, the model) lives on: later collections skip it (as vLLM does)
        gc.enable()  # (a caller may have turned collection off while loading)

    def _start_runner(self, config: EngineConfig, source) -> ModelRunner:
        size = config.tensor_parallel_size
        if size == 1:
            return build_runner(config, 0, str(self.device), source=source)
        from pdcli.distributed.followers import start_followers, tp_devices
        from pdcli.distributed.store import host_store
        from pdcli.distributed.tp import check_tp
        from pdcli.logger import current_level

        check_tp(self.arch.num_attention_heads, self.arch.num_key_value_heads, size)
        devices = tp_devices(str(self.device), size, config.tp_devices)
        store = host_store()
        self.followers = start_followers(config, devices, store.port, current_level())
        runner = build_runner(config, 0, devices[0], store=store, source=source)
        runner.tp_followers = [conn for _, conn in self.followers]
        return runner

    def close(self) -> None:
        """Stop the tensor-parallel followers (if any)."""
        from pdcli.distributed.followers import TPStop

        for proc, conn in self.followers:
            try:
                conn.send(TPStop())
            except (BrokenPipeError, OSError):
                pass
            proc.join(10)
            if proc.is_alive():
                proc.kill()
        self.followers = []

    # ---- requests ----
    def encode(self, prompt: str | list[int], chat: bool = False) -> list[int]:
        if isinstance(prompt, str):
            if chat:
                return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, chat: bool = False, stream: bool = False,
                    seed: int | None = None, handoff: bool = False) -> str:
        """handoff: prefill only; after its first token the sequence waits for `detach_prefilled`."""
        params = params or SamplingParams()
        ids = self.encode(prompt, chat)
        self.validate_prompt(ids)
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self.requests:
            raise PromptError(f"request id {request_id!r} is already in use")
        if seed is None:
            seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        seq = Sequence(request_id, ids, params, seed)
        seq.grammar = self._grammar(params)
        seq.handoff_after_prefill = handoff
        self.requests[request_id] = Request(request_id, prompt if isinstance(prompt, str) else None, ids, params,
                                            stream, [seq])
        self.scheduler.add(seq)
        return request_id

    def _grammar(self, params: SamplingParams):
        """The matcher of params' response_format, or None; ValueError for a schema that does not compile."""
        if params.structured_outputs is None:
            return None
        if self.structured is None:
            from pdcli.engine.structured_output import StructuredOutputs

            self.structured = StructuredOutputs(self.tokenizer, self.arch.vocab_size, self.eos_token_ids)
        return self.structured.grammar(params.structured_outputs)

    def validate_prompt(self, ids: list[int]) -> None:
        limit = "the KV cache" if self.max_model_len == self.cache_capacity else "max_model_len"
        check_prompt(ids, self.arch.vocab_size, self.max_model_len, limit)

    def abort_request(self, request_id: str) -> None:
        self.scheduler.abort(request_id)
        req = self.requests.pop(request_id, None)
        if req is not None and req.finished_time is None:
            req.finished_time = time.perf_counter()

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or self._inflight is not None

    # ---- the loop ----
    def step(self) -> list[StepDelta]:
        """Schedule and launch one step, then land the tokens of the step before it (async scheduling) or
        of this one. With async scheduling the host schedules and prepares step i + 1 while the device
        runs step i; a sequence that finishes in step i has a wasted row in step i + 1."""
        out = self.scheduler.schedule()
        if out.seqs and self.async_scheduling and any(s.grammar is not None for s in out.seqs):
            return self._step_with_grammar(out)
        launched = None
        if out.seqs:
            launched = self.runner.launch(out)
            self.scheduler.advance(out)
            if self.report_prefill_progress:
                launched.prefill_progress = out.partial_prompts()
        prev, self._inflight = self._inflight, None
        deltas = self._land(prev) if prev is not None else []
        if launched is not None:
            if self.async_scheduling and not launched.has_forks and not launched.has_grammar:
                self._inflight = launched
            else:
                deltas += self._land(launched)
        return deltas

    def _step_with_grammar(self, out) -> list[StepDelta]:
        """Async scheduling with grammar rows: the forward pass first, then the step before lands (its tokens
        advance the matchers), then this step's bitmask is filled and its tokens sampled; the host's grammar work
        overlaps the forward pass instead of waiting for a whole step."""
        fwd = self.runner.launch_forward(out, defer_grammar=True)
        self.scheduler.advance(out)
        progress = out.partial_prompts() if self.report_prefill_progress else []
        prev, self._inflight = self._inflight, None
        deltas = self._land(prev) if prev is not None else []
        launched = self.runner.sample_step(fwd)
        launched.prefill_progress = progress
        if launched.has_forks:  # forks are made when their first tokens land
            deltas += self._land(launched)
        else:
            self._inflight = launched
        return deltas

    def take_prefill_progress(self) -> list[tuple[str, int]]:
        """The partial prompts' progress of the steps the device has finished since the last call, oldest first."""
        return self._prefill_progress.take()

    def _land(self, fut: StepFuture) -> list[StepDelta]:
        self._prefill_progress.add(fut)  # empty unless report_prefill_progress
        touched = self.scheduler.update(fut.out, fut.result(), fut.logprobs())
        if fut.landed():  # it sampled (result() waited for it), or ran on the host
            self._prefill_progress.device_ran_all()
        now = time.perf_counter()
        deltas = []
        for seq in touched:
            req = self.requests[seq.request_id]
            if seq.index and seq not in req.seqs:  # a fork
                req.seqs.append(seq)
            if seq.first_token_time is None:
                seq.first_token_time = now
            if req.stream or seq.params.stop:
                delta = self._detokenize(seq)
            else:
                delta = ""
                if seq.is_finished and self.detokenize:
                    seq.text = self.tokenizer.decode(self._visible_output(seq))
            deltas.append(StepDelta(seq.request_id, seq.index, [seq.token_ids[-1]], delta, seq.is_finished,
                                    seq.finish_reason, None if seq.logprobs is None else seq.logprobs[-1:]))
        for d in deltas:
            req = self.requests.get(d.request_id) if d.finished else None
            if req is not None and req.finished and req.finished_time is None:
                req.finished_time = now
        return deltas

    def _visible_output(self, seq: Sequence) -> list[int]:
        return visible_token_ids(seq.output_token_ids, seq.finish_reason, self.eos_token_ids, seq.params.stop_token_ids)

    def _detokenize(self, seq: Sequence) -> str:
        if seq.detok is None:
            seq.detok = DetokenizeWindow(max(seq.num_prompt_tokens - 5, 0), seq.num_prompt_tokens)
        delta = seq.detok.step(self.tokenizer, seq.token_ids)
        if ends_on_stop_token(seq.token_ids, seq.finish_reason, self.eos_token_ids, seq.params.stop_token_ids):
            delta = ""  # the stop token itself is not shown
        seq.text += delta
        stops = seq.params.stop
        if stops and delta and len(seq.token_ids) - seq.num_prompt_tokens >= seq.params.min_tokens:
            end = stop_string_end(seq.text, delta, stops, seq.params.include_stop_str_in_output)
            if end >= 0:
                delta = delta[:max(0, len(delta) - (len(seq.text) - end))]
                seq.text = seq.text[:end]
                self.scheduler.finish(seq, "stop")
        return delta

    # ---- P/D handoff: a prefill engine keeps a sequence's blocks after its first token; a decode engine
    # ---- reserves blocks, receives the KV into them, then admits the sequence into its batch.
    def detach_prefilled(self) -> list[Sequence]:
        """Running handoff sequences whose first token has landed (and that are not finished) leave the
        batch, keeping their blocks until release()."""
        ready = [s for s in self.scheduler.running
                 if s.handoff_after_prefill and len(s.output_token_ids) >= 1 and not s.is_finished]
        for seq in ready:
            self.scheduler.running.remove(seq)
            seq.status = SequenceStatus.HANDOFF
            self.handoff[seq.request_id] = seq
        return ready

    def release(self, request_id: str) -> None:
        """Free the blocks of a handed-off (or reserved) sequence and forget the request."""
        seq = self.handoff.pop(request_id, None)
        if seq is not None:
            self.block_manager.free_seq(seq)
            seq.status = SequenceStatus.FINISHED
            seq.finish_reason = seq.finish_reason or "handoff"
        self.requests.pop(request_id, None)

    def reserve(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                seed: int) -> list[int] | None:
        """Blocks for a sequence's prompt KV (prefilled elsewhere, possibly not yet), or None while the
        pool is too full."""
        seq = Sequence(request_id, prompt_ids, params, seed)
        seq.grammar = self._grammar(params)
        if not self.block_manager.allocate(seq, len(prompt_ids)):
            return None
        seq.status = SequenceStatus.HANDOFF
        self.handoff[request_id] = seq
        self.requests[request_id] = Request(request_id, None, list(prompt_ids), params, False, [seq])
        return seq.block_table

    def admit(self, request_id: str, first_token: int) -> None:
        """The reserved blocks hold the prompt's KV: the sequence, with the first token the prefill
        worker sampled, joins the decode batch."""
        seq = self.handoff.pop(request_id)
        seq.append_token(first_token)
        seq.num_computed_tokens = seq.num_prompt_tokens
        seq.first_token_time = time.perf_counter()
        self.block_manager.cache_full_blocks(seq)
        seq.status = SequenceStatus.RUNNING
        self.scheduler.running.append(seq)

    def in_handoff(self, request_id: str) -> bool:
        """Its blocks are held for a handoff: prefilled here and detached, or reserved here."""
        return request_id in self.handoff

    def handoff_blocks(self, request_id: str) -> list[int]:
        return self.handoff[request_id].block_table

    @property
    def kv_cache(self) -> torch.Tensor:
        """The KV pool, [layers, k|v, num_blocks, block_size, kv_heads, head_dim]: what KV transfers read and write."""
        return self.runner.kv_cache

    def set_kv_sender(self, kv_sender) -> None:
        """(seqs, new tokens) of an eager step -> a callback its forward calls after each layer, or None."""
        self.runner.kv_sender = kv_sender

    # ---- bookkeeping ----
    def has_request(self, request_id: str) -> bool:
        return request_id in self.requests

    def pop_if_finished(self, request_id: str) -> bool:
        """Forget a request whose every sequence has finished; False if it is unknown or still running."""
        req = self.requests.get(request_id)
        if req is None or not req.finished:
            return False
        self.requests.pop(request_id)
        return True

    def pop_finished(self, request_id: str) -> RequestOutput:
        return self.requests.pop(request_id).output()

    def num_free_blocks(self) -> int:
        return self.block_manager.num_free_blocks

    @property
    def num_blocks(self) -> int:
        return self.runner.num_blocks

    @property
    def kernel_path(self) -> str:
        """Which attention ran: cuda (pdcli's kernels) or reference (pure torch)."""
        return self.runner.kernel_path

    def stats(self) -> dict:
        """Pool and queue state (a worker's pool must be full again when it is idle)."""
        waiting = self.scheduler.waiting
        return dict(num_blocks=self.num_blocks, num_free_blocks=self.num_free_blocks(),
                    running=len(self.scheduler.running), waiting=len(waiting), handoff=len(self.handoff),
                    queued_prefill_tokens=sum(len(s) - s.num_computed_tokens for s in waiting))
