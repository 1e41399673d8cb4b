"""What must match for a node to join a head: the model (architecture and shapes, the config's hash), the
dtype option, the block size and the KV layout; with pdcli's version and the protocol's (cluster/messages.py)."""
from __future__ import annotations

import hashlib
import json

from pdcli.cluster.messages import PROTOCOL_VERSION, JoinRequest

KV_LAYOUT = "[layers, 2 (K|V), blocks, block_size, kv_heads, head_dim]"  # the pool's shape (engine/model_runner)


def model_fingerprint(model: str, engine_kwargs: dict) -> dict:
    from pdcli.config import CacheConfig, EngineConfig
    from pdcli.models.arch import ModelArch
    from pdcli.models.loader import resolve

    cfg = resolve(model).hf_config
    arch = ModelArch.from_hf_config(cfg)
    engine = EngineConfig.from_kwargs(model, **{k: v for k, v in engine_kwargs.items() if v is not None})
    config_hash = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return dict(family=arch.family, vocab_size=arch.vocab_size, hidden_size=arch.hidden_size,
                num_hidden_layers=arch.num_hidden_layers, num_attention_heads=arch.num_attention_heads,
                num_key_value_heads=arch.num_key_value_heads, head_dim=arch.head_dim, config=config_hash,
                dtype=engine.dtype, block_size=engine.cache.block_size or CacheConfig.block_size, kv_layout=KV_LAYOUT)


def join_mismatch(req: JoinRequest, version: str, fingerprint: dict) -> str | None:
    """Why a node cannot join (one line), or None."""
    if req.pdcli_version != version:
        return f"pdcli {req.pdcli_version} on the node, {version} on the head"
    if req.protocol_version != PROTOCOL_VERSION:
        return f"message protocol {req.protocol_version} on the node, {PROTOCOL_VERSION} on the head"
    diff = [f"{k} {req.fingerprint.get(k)!r} on the node, {v!r} on the head" for k, v in fingerprint.items()
            if req.fingerprint.get(k) != v]
    return "a different model or engine: " + "; ".join(diff) if diff else None
