"""CUDA graphs for decode steps, one per batch-size bucket (padded rows write nothing: slot -1, length 0)."""
from __future__ import annotations

import numpy as np
import torch

from pdcli.models.context import Context, set_context


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    return [b for b in [1, 2, 4, 8, *range(16, 513, 16)] if b <= max_num_seqs] or [1]


class DecodeGraphs:
    def __init__(self, model, device: torch.device, max_num_seqs: int, max_model_len: int, block_size: int):
        self.model = model
        self.sizes = graph_batch_sizes(max_num_seqs)
        self.max_bs = self.sizes[-1]
        width = -(-max_model_len // block_size)
        self.max_model_len = max_model_len
        dev = device
        # static inputs, read by every captured graph
        self.input_ids = torch.zeros(self.max_bs, dtype=torch.long, device=dev)
        self.positions = torch.zeros(self.max_bs, dtype=torch.long, device=dev)
        self.slot_mapping = torch.full((self.max_bs,), -1, dtype=torch.long, device=dev)
        self.context_lens = torch.zeros(self.max_bs, dtype=torch.int32, device=dev)
        self.block_tables = torch.zeros(self.max_bs, width, dtype=torch.int32, device=dev)
        self.query_start_loc = torch.arange(self.max_bs + 1, dtype=torch.int32, device=dev)
        self.logits_indices = torch.arange(self.max_bs, dtype=torch.long, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        # pinned staging, two sets used in turn: a launch may be queued while the step before it still
        # copies from its set, and the engine waits for step i before launching step i + 2
        self.host = [torch.zeros(2, self.max_bs, dtype=torch.long, pin_memory=True) for _ in range(2)]  # pos, slots
        self.host_lens = [torch.zeros(self.max_bs, dtype=torch.int32, pin_memory=True) for _ in range(2)]
        self.host_tables = [torch.zeros(self.max_bs, width, dtype=torch.int32, pin_memory=True) for _ in range(2)]
        self.turn = 0

    def _context(self, bs: int) -> Context:
        return Context(slot_mapping=self.slot_mapping[:bs], block_tables=self.block_tables[:bs],
                       context_lens=self.context_lens[:bs], query_start_loc=self.query_start_loc[:bs + 1],
                       max_query_len=1, max_context_len=self.max_model_len, logits_indices=self.logits_indices[:bs])

    @torch.inference_mode()
    def capture(self) -> None:
        pool = None
        for bs in reversed(self.sizes):  # largest first so smaller graphs reuse its memory
            set_context(self._context(bs))
            try:
                self.model(self.input_ids[:bs], self.positions[:bs])  # warm up outside the graph
                set_context(self._context(bs))  # afresh: what a step makes once (a decode plan) is made in the graph
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.outputs[bs] = self.model(self.input_ids[:bs], self.positions[:bs])
            finally:
                set_context(None)
            pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize()

    def bucket(self, bs: int) -> int | None:
        return next((b for b in self.sizes if b >= bs), None)

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor, positions: np.ndarray, slots: np.ndarray, context_lens: list[int],
            block_tables: list[list[int]]) -> torch.Tensor:
        """Replay the bucket's graph; input_ids [n] on the device. Returns hidden states [n, hidden]."""
        n = input_ids.shape[0]
        bs = self.bucket(n)
        self.turn ^= 1
        h, lens, tables = self.host[self.turn], self.host_lens[self.turn], self.host_tables[self.turn]
        h[:, n:bs] = 0
        h[1, n:bs] = -1  # padded rows: no KV write, no keys
        h[0, :n] = torch.from_numpy(positions)
        h[1, :n] = torch.from_numpy(slots)
        lens[n:bs] = 0
        lens[:n] = torch.as_tensor(context_lens)
        width = max(len(bt) for bt in block_tables)
        rows = np.zeros((n, width), dtype=np.int32)
        for i, bt in enumerate(block_tables):
            rows[i, :len(bt)] = bt
        tables[:n, :width] = torch.from_numpy(rows)
        self.input_ids[:n].copy_(input_ids)
        if n < bs:
            self.input_ids[n:bs] = 0
        self.positions[:bs].copy_(h[0, :bs], non_blocking=True)
        self.slot_mapping[:bs].copy_(h[1, :bs], non_blocking=True)
        self.context_lens[:bs].copy_(lens[:bs], non_blocking=True)
        self.block_tables[:n, :width].copy_(tables[:n, :width], non_blocking=True)
        self.graphs[bs].replay()
        return self.outputs[bs][:n]
