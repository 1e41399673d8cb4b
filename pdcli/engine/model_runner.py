from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from pdcli.config import CacheConfig, SchedulerConfig
from pdcli.distributed.tp import get_tp
from pdcli.engine.cuda_graph import DecodeGraphs, graph_batch_sizes
from pdcli.engine.logits_processors import PenaltyState, build_processors
from pdcli.engine.sampler import Sampler, SamplingTensors, sample_key
from pdcli.engine.scheduler import SchedulerOutput
from pdcli.engine.sequence import Sequence
from pdcli.engine.step_future import StepFuture
from pdcli.models.context import Context, set_context
from pdcli.kernels import ops, tuning
from pdcli.models.decoder import CausalLM


def zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.zeros; on the CPU from calloc'd memory, whose pages the OS zeroes when first touched (a 0.5 GiB pool
    is not written through at start-up)."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    return torch.from_numpy(np.zeros(nbytes, dtype=np.uint8)).view(dtype).view(shape)


class ModelRunner:
    """Owns the model and its KV pool; turns a scheduled batch into one flat forward pass."""

    def __init__(self, model: CausalLM, cache: CacheConfig, sched: SchedulerConfig, max_model_len: int,
                 enforce_eager: bool = False):
        self.model = model
        self.arch = model.arch
        self.block_size = cache.block_size
        self.max_model_len = max_model_len
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.sampler = Sampler(self.arch.vocab_size, self.device)
        self.penalties = PenaltyState(self.arch.vocab_size, self.device)  # device tensors allocated on first use
        self.eos_token_ids: set[int] = set()  # min_tokens masks them (set by the engine)
        attn = model.kv_layers()[0]
        self.num_heads, self.num_kv_heads = attn.num_heads, attn.num_kv_heads  # this rank's (tensor parallel)
        self.tp = get_tp()
        self.num_blocks = self.tp.min(self._num_kv_blocks(cache, sched))  # the smallest rank's pool
        a = self.arch
        # [layers, k|v, num_blocks, block_size, kv_heads (this rank's), head_dim]; zeroed so masked slots hold no NaN
        self.kv_cache = zeros((a.num_hidden_layers, 2, self.num_blocks, self.block_size, self.num_kv_heads,
                               a.head_dim), self.dtype, self.device)
        for i, attn in enumerate(model.kv_layers()):
            attn.k_cache, attn.v_cache = self.kv_cache[i, 0], self.kv_cache[i, 1]
        self.kernel_path = ops.kernel_path(self.device, self.dtype, a.head_dim, self.num_heads // self.num_kv_heads)
        self._prev_tokens: torch.Tensor | None = None  # device tokens sampled by the last launch
        self._prev_rows: dict[int, int] = {}  # seq_id -> its row in _prev_tokens
        # (seqs, new tokens) of an eager step -> the callback its forward calls after each layer, or None:
        # a worker's layer-wise KV sends of the prompts it prefills for another worker
        self.kv_sender: Callable[[list[Sequence], list[int]], Callable[[int], None] | None] | None = None
        self.tp_followers: list | None = None  # rank 0 of a TP group: pipes to ranks 1.. (distributed/followers.py)
        # per-shape kernel choices timed on this GPU, before any graph is captured (kernels/tuning.py)
        self.gemv_choice = tuning.tune_gemv(self.model) if self.kernel_path == "cuda" else []
        self.blas_choice = tuning.tune_blas(self.model, graph_batch_sizes(sched.max_num_seqs)) \
            if self.kernel_path == "cuda" else []
        self.prefill_choice = tuning.tune_prefill(self.num_heads, self.num_kv_heads, self.arch.head_dim,
                                                  self.block_size, self.dtype, self.device) \
            if self.kernel_path == "cuda" else []
        self.graphs = None
        if self.kernel_path == "cuda" and not enforce_eager:
            self.graphs = DecodeGraphs(model, self.device, sched.max_num_seqs, max_model_len, self.block_size)
            self.graphs.capture()

    @property
    def block_bytes(self) -> int:
        # this rank's part of the KV heads
        per_token = self.arch.kv_bytes_per_token * self.num_kv_heads // self.arch.num_key_value_heads
        return per_token * self.block_size * self.dtype.itemsize

    def _num_kv_blocks(self, cache: CacheConfig, sched: SchedulerConfig) -> int:
        if cache.num_kv_blocks is not None:
            return cache.num_kv_blocks
        if self.device.type != "cuda":
            return max(1, int(cache.cpu_kv_cache_gib * 2**30) // self.block_bytes)
        torch.cuda.empty_cache()  # memory cached by torch but unused counts as free
        free, total = torch.cuda.mem_get_info(self.device)
        weights = sum(t.numel() * t.element_size() for t in (*self.model.parameters(), *self.model.buffers()))
        activations = self._profile_peak_memory(sched)
        # this engine may use gpu_memory_utilization of the card, and never more than is free now
        budget = min(total * cache.gpu_memory_utilization - weights, free - 2**29) - activations
        num = int(budget) // self.block_bytes
        if num < 1:
            raise RuntimeError(f"no GPU memory left for the KV cache: weights {weights / 2**30:.1f} GiB, activations "
                               f"{activations / 2**30:.1f} GiB, free {free / 2**30:.1f} of {total / 2**30:.1f} GiB; "
                               f"raise gpu_memory_utilization or free the GPU")
        return num

    @torch.inference_mode()
    def _profile_peak_memory(self, sched: SchedulerConfig) -> int:
        """Peak bytes of activations for a full prefill step (run with a throwaway cache)."""
        num_tokens = sched.max_num_batched_tokens
        seq_len = min(num_tokens, self.max_model_len)
        lens = [seq_len] * (num_tokens // seq_len) + ([num_tokens % seq_len] if num_tokens % seq_len else [])
        num_blocks = sum(-(-n // self.block_size) for n in lens)
        a = self.arch
        tmp = torch.zeros(a.num_hidden_layers, 2, num_blocks, self.block_size, self.num_kv_heads, a.head_dim,
                          dtype=self.dtype, device=self.device)
        for i, attn in enumerate(self.model.kv_layers()):
            attn.k_cache, attn.v_cache = tmp[i, 0], tmp[i, 1]
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        seqs, first = [], 0
        for n in lens:
            nb = -(-n // self.block_size)
            seqs.append((list(range(first, first + nb)), n))
            first += nb
        input_ids = torch.zeros(num_tokens, dtype=torch.long, device=self.device)
        positions = torch.cat([torch.arange(n, device=self.device) for n in lens])
        set_context(self._context([bt for bt, _ in seqs], [0] * len(lens), lens, [sum(lens) - 1]))
        try:
            self.model.compute_logits(self.model(input_ids, positions)[-1:])
        finally:
            set_context(None)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - base
        del tmp
        torch.cuda.empty_cache()
        return peak

    def _context(self, block_tables: list[list[int]], starts: list[int], lens: list[int],
                 logits_indices: list[int]) -> Context:
        return self._prepare(block_tables, starts, lens, logits_indices)[1]

    def _prepare(self, block_tables: list[list[int]], starts: list[int], lens: list[int],
                 logits_indices: list[int]) -> tuple[np.ndarray, Context]:
        """Positions [num_tokens] and metadata for sequences whose tokens starts[i] .. starts[i] + lens[i] - 1
        are computed this step."""
        bs = self.block_size
        width = max(len(bt) for bt in block_tables)
        tables = np.zeros((len(block_tables), width), dtype=np.int32)
        for i, bt in enumerate(block_tables):
            tables[i, :len(bt)] = bt
        starts_np, lens_np = np.asarray(starts, dtype=np.int64), np.asarray(lens, dtype=np.int64)
        seq_of_token = np.repeat(np.arange(len(lens)), lens_np)
        qsl = np.concatenate([[0], np.cumsum(lens_np)])
        positions = np.arange(qsl[-1]) - qsl[seq_of_token] + starts_np[seq_of_token]
        slots = tables[seq_of_token, positions // bs].astype(np.int64) * bs + positions % bs
        ctx_lens = starts_np + lens_np
        rows = np.asarray(logits_indices, dtype=np.int64)
        last_layer = None
        if 0 < len(rows) < qsl[-1]:  # rows without logits skip the last layer's attention output and MLP
            sel = seq_of_token[rows]
            dev = self.device
            last_layer = Context(
                slot_mapping=torch.empty(0, dtype=torch.long, device=dev),  # unused: K/V are stored already
                block_tables=self._to_device(tables[sel]),
                context_lens=self._to_device(ctx_lens[sel].astype(np.int32)),
                query_start_loc=torch.arange(len(sel) + 1, dtype=torch.int32, device=dev),
                max_query_len=1,
                max_context_len=int(ctx_lens[sel].max()),
                logits_indices=torch.arange(len(sel), dtype=torch.long, device=dev),
            )
        num_decode = int(np.argmax(lens_np != 1)) if (lens_np != 1).any() else len(lens_np)  # leading 1-token rows
        ctx = Context(
            num_decode_seqs=num_decode,
            slot_mapping=self._to_device(slots),
            block_tables=self._to_device(tables),
            context_lens=self._to_device(ctx_lens.astype(np.int32)),
            query_start_loc=self._to_device(qsl.astype(np.int32)),
            prefill_query_start_loc=self._to_device((qsl[num_decode:] - qsl[num_decode]).astype(np.int32))
            if 0 < num_decode < len(lens_np) else None,
            max_query_len=int(lens_np.max()),
            max_context_len=int(ctx_lens.max()),
            logits_indices=self._to_device(rows),
            last_layer=last_layer,
        )
        return positions, ctx

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        if copies:
            src, dst = (self._to_device(np.asarray(x, dtype=np.int64)) for x in zip(*copies))
            self.kv_cache[:, :, dst] = self.kv_cache[:, :, src]

    def _to_device(self, a: np.ndarray) -> torch.Tensor:
        """Host array -> device tensor without waiting for the GPU (pinned, non-blocking copy)."""
        t = torch.from_numpy(a)
        return t.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else t

    def execute(self, out: SchedulerOutput) -> list[list[int]]:
        """Run one step and wait for it; returns the sampled tokens per scheduled seq (empty mid-prefill)."""
        return self.launch(out).result()

    def launch(self, out: SchedulerOutput) -> "StepFuture":
        """Queue one step on the device and return at once. A decode row whose input token was sampled by
        the previous launch (still pending on the host) reads it from that step's device output."""
        return self.sample_step(self.launch_forward(out))

    @torch.inference_mode()
    def launch_forward(self, out: SchedulerOutput, defer_grammar: bool = False) -> tuple:
        """Queue the step's forward pass; its sampling inputs are built now (they depend on the sequences'
        lengths before `Scheduler.advance`), a grammar's bitmask later with defer_grammar. -> sample_step."""
        self.copy_blocks(out.block_copies)
        seqs, lens, starts, logits_indices, rows, ids = self._prepare_inputs(out)
        graph = bool(self.graphs is not None and out.is_decode_only and self.graphs.bucket(len(out.seqs)))
        after_layer = self.kv_sender(seqs, lens) if self.kv_sender is not None and not graph else None
        if self.tp_followers:  # the followers run the same forward pass; pending tokens from the last broadcast
            from pdcli.distributed.followers import TPStep

            self.tp_broadcast(TPStep(out.block_copies, self._host_ids, [s.block_table for s in seqs], starts,
                                     lens, logits_indices, bool(rows), getattr(after_layer, "spec", None), graph,
                                     self._pending, sum(s.num_samples for s in rows)))
        logits = self._run_model(out, seqs, lens, starts, logits_indices, rows, ids, after_layer, graph)
        counts = [s.num_samples for s in rows]
        t = self._sampling_tensors(rows, counts, defer_grammar) if logits is not None else None
        return out, rows, counts, logits, t

    @torch.inference_mode()
    def sample_step(self, launched: tuple) -> "StepFuture":
        """Sample a launch_forward's step (filling a deferred grammar bitmask from the matchers now)."""
        out, rows, counts, logits, t = launched
        if t is not None and t.processors is not None:
            t.processors.fill_deferred()
        return self._sample(out, rows, counts, logits, t)

    def tp_broadcast(self, msg) -> None:
        """To every follower rank, in order (a no-op without tensor parallelism)."""
        for conn in self.tp_followers or ():
            conn.send(msg)

    @torch.inference_mode()
    def follow(self, step, kv=None) -> None:
        """A follower rank's part of rank 0's step (a TPStep): its shard of the same forward pass, with its
        shard of the step's layer-wise KV sends (kv: distributed/tp_kv.FollowerKV)."""
        self.copy_blocks(step.block_copies)
        ids = self._to_device(step.input_ids)
        if step.pending[0]:  # tokens rank 0 sampled last step and had not landed when it sent this one
            self._patch_pending(ids, *step.pending)
        if step.graph:  # the same graph as rank 0's: its NCCL all-reduces are captured in it
            self.model.compute_logits(self._replay(ids, step.block_tables, step.starts))
        else:
            sender = kv.layer_sender(step.layer_sends) if step.layer_sends else None
            self._forward(ids, step.block_tables, step.starts, step.lens, step.logits_indices, step.logits, sender)
            if kv is not None:
                kv.after_forward(sender)
        self._prev_tokens = None
        if step.num_sampled:  # rank 0's tokens, in stream order: the next step's pending inputs
            self._prev_tokens = self.tp.broadcast(torch.empty(step.num_sampled, dtype=torch.long, device=self.device))

    def _prepare_inputs(self, out: SchedulerOutput) -> tuple[list[Sequence], list[int], list[int], list[int],
                                                              list[Sequence], torch.Tensor]:
        """The step's rows in order: (seqs, new token counts, first new positions, logits indices, the seqs that
        sample, input ids [num_tokens] on the device with each pending token patched in)."""
        input_ids, logits_indices, rows, starts, pending_at, pending_src = [], [], [], [], [], []
        offset = 0
        # in a mixed step, rows of one new token (decodes) first: attention sends them to the decode kernel
        batch = list(zip(out.seqs, out.num_new_tokens))
        if not out.is_decode_only:
            batch.sort(key=lambda p: p[1] != 1)
        seqs, lens = [s for s, _ in batch], [n for _, n in batch]
        for seq, n in batch:
            start = seq.num_computed_tokens
            starts.append(start)
            known = len(seq.token_ids)
            if start + n > known:  # the last input token is pending: the previous launch sampled it
                input_ids.extend(seq.token_ids[start:known])
                input_ids.append(0)
                pending_at.append(offset + n - 1)
                pending_src.append(self._prev_rows[seq.seq_id])
            elif n == 1:
                input_ids.append(seq.token_ids[start])
            else:
                input_ids.extend(seq.token_ids[start:start + n])
            offset += n
            if start + n == len(seq):
                logits_indices.append(offset - 1)
                rows.append(seq)
        self._host_ids = np.asarray(input_ids, dtype=np.int64)  # pending tokens as 0, patched on the device
        self._pending = (pending_at, pending_src)
        # (on the CPU the device tensor would share the host array: the followers get it unpatched either way)
        ids = self._to_device(self._host_ids.copy() if self.tp_followers else self._host_ids)
        if pending_at:
            self._patch_pending(ids, pending_at, pending_src)
        return seqs, lens, starts, logits_indices, rows, ids

    def _patch_pending(self, ids: torch.Tensor, pending_at: list[int], pending_src: list[int]) -> None:
        """ids[pending_at] = the previous launch's tokens[pending_src], on the device."""
        # [2, P]: row in ids, row in the previous launch's tokens; one copy
        at, src = self._to_device(np.asarray([pending_at, pending_src], dtype=np.int64))
        ids[at] = self._prev_tokens[src]

    def _run_model(self, out: SchedulerOutput, seqs: list[Sequence], lens: list[int], starts: list[int],
                   logits_indices: list[int], rows: list[Sequence], ids: torch.Tensor,
                   after_layer=None, graph: bool = False) -> torch.Tensor | None:
        """The step's logits (None when no seq samples): a decode-only batch replays the CUDA graph of its size
        when there is one (graph), else the model runs eagerly, calling the KV sender's hook after each layer."""
        if graph:
            return self.model.compute_logits(self._replay(ids, [s.block_table for s in seqs], starts))
        return self._forward(ids, [s.block_table for s in seqs], starts, lens, logits_indices, bool(rows), after_layer)

    def _replay(self, ids: torch.Tensor, block_tables: list[list[int]], starts: list[int]) -> torch.Tensor:
        """A decode-only batch through its captured graph: hidden states [n, hidden]."""
        bs = self.block_size
        pos = np.asarray(starts, dtype=np.int64)
        slots = np.fromiter((bt[p // bs] * bs + p % bs for bt, p in zip(block_tables, starts)), dtype=np.int64,
                            count=len(starts))
        return self.graphs.run(ids, pos, slots, [p + 1 for p in starts], block_tables)

    def _forward(self, ids: torch.Tensor, block_tables: list[list[int]], starts: list[int], lens: list[int],
                 logits_indices: list[int], logits: bool, after_layer=None) -> torch.Tensor | None:
        """The eager forward pass of a flat batch: logits [len(logits_indices), vocab], or None."""
        positions, ctx = self._prepare(block_tables, starts, lens, logits_indices)
        ctx.after_layer = after_layer
        set_context(ctx)
        try:
            hidden = self.model(ids, self._to_device(positions))
            if ctx.last_layer is None:
                hidden = hidden[ctx.logits_indices]
            return self.model.compute_logits(hidden) if logits else None
        finally:
            set_context(None)

    def _sample(self, out: SchedulerOutput, rows: list[Sequence], counts: list[int], logits: torch.Tensor | None,
                t: SamplingTensors | None) -> "StepFuture":
        """Sample each row's num_samples tokens; kept on the device (_prev_tokens, _prev_rows) as the next
        launch's pending inputs."""
        if logits is None:
            self._prev_tokens, self._prev_rows = None, {}
            return StepFuture(out, rows, counts, None, self.device)  # the device: when it has run the step
        if any(c > 1 for c in counts):
            logits = logits.repeat_interleave(self._to_device(np.asarray(counts, dtype=np.int64)), dim=0)
        sampled = self.sampler.forward(logits, t)
        tokens = sampled.sampled_token_ids
        if self.tp_followers:  # only rank 0 samples; every rank feeds its tokens back in (async scheduling)
            self.tp.broadcast(tokens)
        self._prev_tokens = tokens
        self._prev_rows, r = {}, 0
        for seq, c in zip(rows, counts):
            self._prev_rows[seq.seq_id] = r
            r += c
        has_grammar = t is not None and t.processors is not None and t.processors.has_grammar
        return StepFuture(out, rows, counts, tokens, self.device, sampled.logprobs, has_grammar)

    def _sampling_tensors(self, rows: list[Sequence], counts: list[int],
                          defer_grammar: bool = False) -> SamplingTensors | None:
        extra = any(s.needs_processing for s in rows)
        if not extra and all(s.params.temperature == 0 for s in rows):
            return None  # greedy: argmax only
        temps, top_k, top_p, min_p, keys = [], [], [], [], []
        vocab = self.arch.vocab_size
        for seq, c in zip(rows, counts):
            p = seq.params
            for k in range(c):
                temps.append(p.temperature)
                top_k.append(vocab if p.top_k < 0 else min(p.top_k, vocab))
                top_p.append(p.top_p)
                min_p.append(p.min_p)
                keys.append(sample_key(seq.seed, seq.index if c == 1 else k, len(seq)))
        dev = self._to_device
        st = SamplingTensors(
            temperatures=dev(np.asarray(temps, dtype=np.float32)),
            top_k=dev(np.asarray(top_k, dtype=np.int64)),
            top_p=dev(np.asarray(top_p, dtype=np.float32)),
            min_p=dev(np.asarray(min_p, dtype=np.float32)),
            keys=dev(np.asarray(keys, dtype=np.int64)),
            all_greedy=all(t == 0 for t in temps),
            any_top_k=any(k < vocab for k in top_k),
            any_top_p=any(p < 1 for p in top_p),
            any_min_p=any(p > 0 for p in min_p),
        )
        if extra:
            st.processors = build_processors(rows, counts, vocab, self.eos_token_ids, self.penalties, dev, defer_grammar)
            st.num_logprobs = max((s.params.logprobs for s in rows if s.params.logprobs is not None), default=-1)
        return st
