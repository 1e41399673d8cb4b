from __future__ import annotations

import numpy as np
import torch

from pdcli.config import CacheConfig, SchedulerConfig
from pdcli.engine.cuda_graph import DecodeGraphs
from pdcli.engine.sampler import Sampler, SamplingTensors, sample_key
from pdcli.engine.scheduler import SchedulerOutput
from pdcli.engine.sequence import Sequence
from pdcli.models.context import Context, set_context
from pdcli.kernels import ops
from pdcli.models.decoder import CausalLM


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
        self.num_blocks = self._num_kv_blocks(cache, sched)
        a = self.arch
        # [layers, k|v, num_blocks, block_size, kv_heads, head_dim]; zeroed so masked slots hold no NaN
        self.kv_cache = torch.zeros(a.num_hidden_layers, 2, self.num_blocks, self.block_size, a.num_key_value_heads,
                                    a.head_dim, dtype=self.dtype, device=self.device)
        for i, attn in enumerate(model.kv_layers()):
            attn.k_cache, attn.v_cache = self.kv_cache[i, 0], self.kv_cache[i, 1]
        self.kernel_path = ops.kernel_path(self.device, self.dtype, a.head_dim,
                                           a.num_attention_heads // a.num_key_value_heads)
        self.graphs = None
        if self.kernel_path == "cuda" and not enforce_eager:
            self.graphs = DecodeGraphs(model, self.device, sched.max_num_seqs, max_model_len, self.block_size)
            self.graphs.capture()

    @property
    def block_bytes(self) -> int:
        return self.arch.kv_bytes_per_token * self.block_size * self.dtype.itemsize

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
        tmp = torch.zeros(a.num_hidden_layers, 2, num_blocks, self.block_size, a.num_key_value_heads, a.head_dim,
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
        dev = self.device
        ctx_lens = starts_np + lens_np
        ctx = Context(
            slot_mapping=torch.from_numpy(slots).to(dev, non_blocking=True),
            block_tables=torch.from_numpy(tables).to(dev, non_blocking=True),
            context_lens=torch.from_numpy(ctx_lens.astype(np.int32)).to(dev, non_blocking=True),
            query_start_loc=torch.from_numpy(qsl.astype(np.int32)).to(dev, non_blocking=True),
            max_query_len=int(lens_np.max()),
            max_context_len=int(ctx_lens.max()),
            logits_indices=torch.tensor(logits_indices, dtype=torch.long, device=dev),
        )
        return positions, ctx

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        if copies:
            src, dst = (torch.tensor(x, device=self.device) for x in zip(*copies))
            self.kv_cache[:, :, dst] = self.kv_cache[:, :, src]

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> list[list[int]]:
        """Run one step; returns the sampled tokens per scheduled seq (empty mid-prefill)."""
        self.copy_blocks(out.block_copies)
        input_ids, logits_indices, rows, starts = [], [], [], []
        offset = 0
        for seq, n in zip(out.seqs, out.num_new_tokens):
            start = seq.num_computed_tokens
            starts.append(start)
            if n == 1:
                input_ids.append(seq.token_ids[start])
            else:
                input_ids.extend(seq.token_ids[start:start + n])
            offset += n
            if start + n == len(seq):
                logits_indices.append(offset - 1)
                rows.append(seq)
        if self.graphs is not None and out.is_decode_only and self.graphs.bucket(len(out.seqs)):
            bs = self.block_size
            pos = np.asarray(starts, dtype=np.int64)
            slots = np.fromiter((s.block_table[p // bs] * bs + p % bs for s, p in zip(out.seqs, starts)),
                                dtype=np.int64, count=len(starts))
            hidden = self.graphs.run(input_ids, pos, slots, [p + 1 for p in starts], [s.block_table for s in out.seqs])
            logits = self.model.compute_logits(hidden)
        else:
            positions, ctx = self._prepare([s.block_table for s in out.seqs], starts, out.num_new_tokens,
                                           logits_indices)
            set_context(ctx)
            try:
                hidden = self.model(torch.tensor(input_ids, dtype=torch.long, device=self.device),
                                    torch.from_numpy(positions).to(self.device, non_blocking=True))
                if not rows:
                    return [[] for _ in out.seqs]
                logits = self.model.compute_logits(hidden[ctx.logits_indices])
            finally:
                set_context(None)
        counts = [s.num_samples for s in rows]
        if any(c > 1 for c in counts):
            logits = logits.repeat_interleave(torch.tensor(counts, device=self.device), dim=0)
        tokens = self.sampler(logits, self._sampling_tensors(rows, counts)).tolist()
        result, it = {}, iter(tokens)
        for seq, c in zip(rows, counts):
            result[seq.seq_id] = [next(it) for _ in range(c)]
        return [result.get(s.seq_id, []) for s in out.seqs]

    def _sampling_tensors(self, rows: list[Sequence], counts: list[int]) -> SamplingTensors | None:
        if all(s.params.temperature == 0 for s in rows):
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
        dev = self.device
        return SamplingTensors(
            temperatures=torch.tensor(temps, dtype=torch.float32, device=dev),
            top_k=torch.tensor(top_k, dtype=torch.int64, device=dev),
            top_p=torch.tensor(top_p, dtype=torch.float32, device=dev),
            min_p=torch.tensor(min_p, dtype=torch.float32, device=dev),
            keys=torch.tensor(keys, dtype=torch.int64, device=dev),
            all_greedy=all(t == 0 for t in temps),
            any_top_k=any(k < vocab for k in top_k),
            any_top_p=any(p < 1 for p in top_p),
            any_min_p=any(p > 0 for p in min_p),
        )
