"""The rendezvous store that process groups meet on, hosted by the process that outlives them."""
from __future__ import annotations

import socket


def bound_listener(host: str = "127.0.0.1", port: int = 0) -> int:
    """A listening socket on `host` only for the store (TCPStore alone binds every interface, unauthenticated);
    its descriptor is handed over, the store owns it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    return sock.detach()


def host_store(host: str = "127.0.0.1"):
    """A TCPStore served from this process, listening on `host` only."""
    import torch.distributed as dist

    return dist.TCPStore(host, 0, is_master=True, wait_for_workers=False, master_listen_fd=bound_listener(host))
