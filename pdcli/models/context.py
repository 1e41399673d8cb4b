"""Per-step attention metadata, set by the model runner around each forward pass."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Context:
    slot_mapping: torch.Tensor  # [num_tokens] int64, flat cache slot (block * block_size + offset) per new token
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32, padded with 0
    context_lens: torch.Tensor  # [num_seqs] int32, tokens in the cache after this step
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32, offsets of each sequence's new tokens
    max_query_len: int
    max_context_len: int
    logits_indices: torch.Tensor  # [num_samples] int64, rows of the hidden states to turn into logits
    num_splits: int = 0  # decode split-KV factor; 0 = chosen by the kernel from the grid size
    num_decode_seqs: int = 0  # leading sequences with one new token: attention-wise decode rows
    prefill_query_start_loc: torch.Tensor | None = None  # query_start_loc of the rest, from 0, when both kinds
    # The last layer runs only the rows in logits_indices (each its sequence's last new token) past its
    # K/V store: their attention is a decode row per sequence, with this metadata. None: every row.
    last_layer: Context | None = None
    after_layer: Callable[[int], None] | None = None  # called with i once layer i is queued (KV sends)
    # the balanced split-KV plan of this step's decode rows (kernels/ops.decode_fn), made by the first layer and
    # reused by the rest: in a CUDA graph it is made inside the graph, from that replay's context lengths
    decode_plan: torch.Tensor | None = None
    decode_counters: torch.Tensor | None = None  # [B * Hk] int32 zeros with the plan: the kernel's merge counts

    @property
    def is_decode(self) -> bool:
        return self.max_query_len == 1


_CONTEXT: Context | None = None


def set_context(ctx: Context | None) -> None:
    global _CONTEXT
    _CONTEXT = ctx


def get_context() -> Context:
    assert _CONTEXT is not None, "attention called outside a model-runner step"
    return _CONTEXT
