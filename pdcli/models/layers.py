"""The model's layers, split over the tensor-parallel group set for the process (distributed/tp.py) when it is
built: column-parallel packed projections (q|k|v, gate|up: each rank computes its heads / its slice of the
intermediate size), row-parallel output projections (partial sums all-reduced), a vocabulary-parallel
embedding and LM head (logits gathered). With one rank every layer is the plain one. A layer loads its shard
of each full checkpoint tensor (`shard`, `load_shard`)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pdcli.distributed.tp import get_tp
from pdcli.kernels import ops


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x), or with a residual (norm(x + residual), x + residual)."""
        if residual is None:
            return ops.rms_norm(x, self.weight, self.eps)
        return ops.fused_add_rms_norm(x, residual, self.weight, self.eps)


def _vocab_rows(num_embeddings: int) -> tuple[int, int]:
    """This rank's rows of a vocabulary split in equal parts (the last padded): (start, rows per rank)."""
    tp = get_tp()
    per = -(-num_embeddings // tp.size)
    return tp.rank * per, per


def _rows(full: torch.Tensor, start: int, n: int) -> torch.Tensor:
    """full[start:start + n], zero-padded past its end."""
    part = full[start:start + n]
    if part.shape[0] < n:
        part = torch.cat([part, part.new_zeros(n - part.shape[0], *part.shape[1:])])
    return part


class Embedding(nn.Module):
    """Vocabulary-parallel: each rank embeds the ids in its rows, zeros the rest; the sum over ranks."""

    def __init__(self, num_embeddings: int, dim: int):
        super().__init__()
        self.tp = get_tp()
        self.start, self.per = _vocab_rows(num_embeddings)
        self.weight = nn.Parameter(torch.empty(self.per, dim))

    def shard(self, name: str, full: torch.Tensor) -> torch.Tensor:
        return _rows(full, self.start, self.per)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.per)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.tp.all_reduce(out.masked_fill_(outside[:, None], 0.0))


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self.weight, self.bias)


class RowLinear(Linear):
    """Row-parallel: each rank holds a slice of the input features; partial outputs all-reduced, bias after."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        self.tp = get_tp()
        super().__init__(in_features // self.tp.size, out_features, bias=bias)
        self.start = self.tp.rank * self.in_features

    def shard(self, name: str, full: torch.Tensor) -> torch.Tensor:
        return full if name == "bias" else full[:, self.start:self.start + self.in_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return ops.linear(x, self.weight, self.bias)
        y = self.tp.all_reduce(ops.linear(x, self.weight, None))
        return y if self.bias is None else y + self.bias


class LMHead(Linear):
    """Vocabulary-parallel logits: each rank's rows of the vocabulary, gathered [T, vocab]."""

    def __init__(self, hidden: int, vocab: int):
        self.tp = get_tp()
        self.vocab = vocab
        self.start, per = _vocab_rows(vocab)
        super().__init__(hidden, per, bias=False)

    def shard(self, name: str, full: torch.Tensor) -> torch.Tensor:
        return _rows(full, self.start, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = ops.linear(x, self.weight, None)
        return logits if self.tp.size == 1 else self.tp.all_gather(logits)[:, :self.vocab]


class PackedLinear(Linear):
    """Several HF projections stacked along the output dim (q|k|v, gate|up): one matmul. Column-parallel: each
    shard keeps rows [lo, hi) of its full projection."""

    def __init__(self, in_features: int, shard_rows: dict[str, tuple[int, int]], bias: bool):
        super().__init__(in_features, sum(hi - lo for lo, hi in shard_rows.values()), bias=bias)
        self.shards, start = {}, 0
        for name, (lo, hi) in shard_rows.items():
            self.shards[name] = (start, hi - lo, lo)
            start += hi - lo

    def load_shard(self, param_name: str, shard: str, tensor: torch.Tensor) -> None:
        start, size, lo = self.shards[shard]
        getattr(self, param_name).data[start:start + size].copy_(tensor[lo:lo + size])


class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x [T, 2 intermediate] = [gate | up]
        return ops.silu_and_mul(x)
