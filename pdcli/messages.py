"""Every message between the coordinator and its workers: one frozen dataclass per kind, named fields, the
same over a local pipe or a TCP connection to a worker on another node (pdcli/cluster/). KV data never travels here (workers/kv_transfer.py).

A P/D handoff, message by message (docs/structure.md has the whole life of a request):
  coordinator -> decode   Reserve            blocks for the prompt's KV, reserved at once
  coordinator -> prefill  Submit(handoff)    prefill only
  decode -> coordinator   Reserved           -> prefill: SendKV (where the KV goes)
  prefill -> coordinator  SendsAnnounced     -> decode: PostReceives (in the prefill worker's send order)
  prefill -> coordinator  Prefilled          -> decode: FirstToken
  prefill -> coordinator  KVSent             (an IPC copy -> decode: IpcCopyDone)
  decode -> coordinator   KVReceived         the sequence joined the decode batch; its tokens come as StepTokens
"""
from __future__ import annotations

from dataclasses import dataclass

from pdcli.sampling_params import SamplingParams


# ---- coordinator -> worker ----
@dataclass(frozen=True, slots=True)
class Submit:
    """Run a request; with handoff, prefill only: after its first token the KV goes to a decode worker."""
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    handoff: bool = False


@dataclass(frozen=True, slots=True)
class Reserve:
    """Decode worker: reserve blocks for the prompt's KV now (it is prefilled elsewhere)."""
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    ipc_copy: bool  # the prefill worker shares this GPU and copies straight into the blocks (CUDA IPC)


@dataclass(frozen=True, slots=True)
class SendKV:
    """Prefill worker: where the request's KV goes."""
    request_id: str
    dst_rank: int
    tag: int
    dst_blocks: list[int] | None  # the decode worker's reserved blocks, for an IPC copy; None: send over dist
    layerwise: bool  # send in groups of layers during the last prefill chunk where possible


@dataclass(frozen=True, slots=True)
class TransferItem:
    request_id: str
    num_blocks: int
    tag: int


@dataclass(frozen=True, slots=True)
class PostReceives:
    """Decode worker: post the receives of a group of sends that worker src_rank announced, in its order
    (NCCL pairs a send with a receive by order, not by tag)."""
    src_rank: int
    items: list[TransferItem]
    layerwise: bool


@dataclass(frozen=True, slots=True)
class FirstToken:
    """Decode worker: the first token, sampled by the prefill worker."""
    request_id: str
    token_id: int


@dataclass(frozen=True, slots=True)
class IpcCopyDone:
    """Decode worker: the prefill worker's copy into the reserved blocks has finished."""
    request_id: str
    nbytes: int


@dataclass(frozen=True, slots=True)
class IpcCopyCancelled:
    """Decode worker: no copy will come into the reserved blocks (the request ended first): free them."""
    request_id: str


@dataclass(frozen=True, slots=True)
class PeerPools:
    """Prefill worker: the CUDA IPC handles of the KV pools of the decode workers on its GPU."""
    handles: dict[int, tuple]  # decode rank -> handle


@dataclass(frozen=True, slots=True)
class PairSpec:
    """A (prefill, decode) pair that hands KV over through a process group of its own: src is its rank 0."""
    src: int
    dst: int
    prefix: str  # its keys on the coordinator's store; never reused


@dataclass(frozen=True, slots=True)
class ConnectPeers:
    """Join these pairs' process groups, in this order (every worker gets the pairs in one global order, so no
    two wait for each other); answered by PeersConnected."""
    pairs: list[PairSpec]


@dataclass(frozen=True, slots=True)
class DropKV:
    """Prefill worker: nobody will take this request's KV: free its blocks."""
    request_id: str


@dataclass(frozen=True, slots=True)
class Abort:
    request_id: str
    wait_for_ipc_copy: bool = False  # decode worker: a copy may still write into its blocks: free them once done


@dataclass(frozen=True, slots=True)
class StatsRequest:
    pass


@dataclass(frozen=True, slots=True)
class Shutdown:
    pass


# ---- worker -> coordinator ----
@dataclass(frozen=True, slots=True)
class Ready:
    rank: int
    role: str
    device: str
    num_blocks: int
    kernel_path: str
    max_model_len: int
    kv_ipc: tuple | None = None  # a decode or collocated worker on a GPU: the CUDA IPC handle of its KV pool


@dataclass(frozen=True, slots=True)
class WorkerFailed:
    """The worker raised (at start-up or later) and exits."""
    traceback: str


@dataclass(frozen=True, slots=True)
class StepTokens:
    """What one engine step produced, one entry per touched sequence; sent after every step that produced tokens
    or finished part of a prompt on the device, since it marks when the worker's step landed (the router's start
    wait)."""
    request_ids: list[str]
    indices: list[int]  # completion index (n > 1)
    token_ids: list[list[int]]
    finish_reasons: list[str | None]
    logprobs: list[list | None] | None = None  # per entry: a SampleLogprob per token (None: not asked); None: nobody asked
    prefilled: list[tuple[str, int]] | None = None  # (request id, prompt tokens computed) of prompts left partly
    # prefilled by the steps that landed (chunked prefill): the router counts only what they have left
    received: list[tuple[str, float, float | None, float | None]] | None = None  # (request id, perf_counter s when
    # this worker took its Submit, when the launch of a step with its first prompt tokens began, when the step with
    # its first token landed) of the requests whose first tokens are here: where a first token's time went (one
    # host's clock)


@dataclass(frozen=True, slots=True)
class Prefilled:
    """Prefill worker: the request's first token landed; its KV waits in num_blocks blocks."""
    request_id: str
    first_token: int
    num_blocks: int


@dataclass(frozen=True, slots=True)
class Reserved:
    request_id: str
    blocks: list[int] | None  # for an IPC copy into them; None: receives are posted when announced


@dataclass(frozen=True, slots=True)
class SendsAnnounced:
    """Prefill worker: these sends to dst_rank are (about to be) posted, in this order."""
    dst_rank: int
    items: list[TransferItem]
    layerwise: bool


@dataclass(frozen=True, slots=True)
class KVSent:
    """Prefill worker: a request's KV has left (the blocks are free here)."""
    request_id: str
    dst_rank: int
    nbytes: int
    seconds: float  # device time of the send (or what the prefill left exposed of it)
    kind: str  # whole | layers | ipc


@dataclass(frozen=True, slots=True)
class IpcCopyDropped:
    """Prefill worker: the IPC copy into dst_rank's reserved blocks will never be posted."""
    request_id: str
    dst_rank: int


@dataclass(frozen=True, slots=True)
class KVReceived:
    """Decode worker: the KV and the first token are in; the sequence joined the decode batch."""
    request_id: str
    nbytes: int


@dataclass(frozen=True, slots=True)
class PeersConnected:
    """The pairs of a ConnectPeers this worker joined, and those it could not (pair -> error)."""
    rank: int
    connected: list[PairSpec]
    failed: dict  # PairSpec -> str


@dataclass(frozen=True, slots=True)
class RequestFailed:
    request_id: str
    message: str


@dataclass(frozen=True, slots=True)
class WorkerStats:
    rank: int
    role: str
    num_blocks: int
    num_free_blocks: int
    running: int
    waiting: int
    handoff: int  # sequences holding blocks for a handoff (prefilled here or reserved here)
    queued_prefill_tokens: int


class UnknownMessage(TypeError):
    pass


def dispatch(handlers: dict[type, object], msg, where: str, *context):
    """handler(*context, msg) of the handler registered for msg's type; an unregistered type is an error
    that names it."""
    handler = handlers.get(type(msg))
    if handler is None:
        raise UnknownMessage(f"{where} got a message it does not handle: {type(msg).__name__}")
    return handler(*context, msg)


TO_WORKER = (Submit, Reserve, SendKV, PostReceives, FirstToken, IpcCopyDone, IpcCopyCancelled, PeerPools,
             ConnectPeers, DropKV, Abort, StatsRequest, Shutdown)
TO_COORDINATOR = (Ready, WorkerFailed, StepTokens, Prefilled, Reserved, SendsAnnounced, KVSent, IpcCopyDropped,
                  KVReceived, PeersConnected, RequestFailed, WorkerStats)
