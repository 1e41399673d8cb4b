from __future__ import annotations

from typing import Annotated

import typer

from pdcli.cli.common import DEFAULT_MODEL, EXIT_RUNTIME, Model, Mps, engine_options, fail


@engine_options
def node(
    model: Model = DEFAULT_MODEL,
    dist_init_addr: Annotated[str, typer.Option(help="HOST:PORT of the head (`pdcli serve --dist-init-addr`).")] = "",
    node_rank: Annotated[int, typer.Option(min=1, help="This node's rank, 1 .. --nnodes - 1 (0 is the head).")] = 1,
    collocated: Annotated[str, typer.Option(help="Devices of collocated workers on this node.")] = "",
    prefill: Annotated[str, typer.Option(help="Devices of prefill workers on this node.")] = "",
    decode: Annotated[str, typer.Option(help="Devices of decode workers on this node.")] = "",
    mps: Mps = None,
    engine: dict = None,
) -> None:
    """Join a head's cluster: this host's workers serve its requests. PDCLI_CLUSTER_TOKEN: the cluster's
    secret (required unless the head's address is loopback). Ctrl-C leaves (requests here finish first)."""
    from pdcli.cluster.node import Node
    from pdcli.cluster.transport import ClusterError, parse_addr
    from pdcli.models.loader import ModelLoadError
    from pdcli.workers.layout import parse_layout

    try:
        if not dist_init_addr:
            raise ValueError("--dist-init-addr HOST:PORT (the head's) is required")
        addr = parse_addr(dist_init_addr)
        if not (collocated or prefill or decode):
            raise ValueError("give this node's workers: --collocated, --prefill and/or --decode DEVICES")
        n = Node(model, addr, node_rank, parse_layout(collocated, prefill, decode, whole=False,
                                                          tp=engine["tensor_parallel_size"]), engine, mps)
        accepted = n.join()
    except (ValueError, ModelLoadError) as e:
        fail(str(e))
    except ClusterError as e:
        fail(str(e), EXIT_RUNTIME)
    n.start(accepted)
    print(f"pdcli node {node_rank}: {len(accepted.ranks)} worker(s) joined the head at {dist_init_addr}", flush=True)
    raise typer.Exit(n.run())
