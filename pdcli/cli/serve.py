from __future__ import annotations

import logging
from typing import Annotated, Optional

import typer

from pdcli.cli.common import DEFAULT_MODEL, EXIT_INTERRUPTED, EXIT_RUNTIME, Device, Model, Mps, engine_options, fail

GRACEFUL_S = 10  # s that open requests get after Ctrl-C (uvicorn's timeout_graceful_shutdown)
DRAIN_TIMEOUT_S = 30.0  # s that requests in flight get after SIGTERM


@engine_options
def serve(
    model: Model = DEFAULT_MODEL,
    mode: Annotated[str, typer.Option(help="collocated, disaggregated, adaptive or threshold.")] = "collocated",
    collocated: Annotated[str, typer.Option(help="Devices of collocated workers (default: --device).")] = "",
    prefill: Annotated[str, typer.Option(help="Devices of prefill workers.")] = "",
    decode: Annotated[str, typer.Option(help="Devices of decode workers.")] = "",
    host: Annotated[str, typer.Option(help="Address to bind (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8000,
    api_key: Annotated[Optional[str], typer.Option(help="Require 'Authorization: Bearer KEY' on /v1 routes.")] = None,
    served_model_name: Annotated[Optional[str], typer.Option(help="Model id clients use (default: --model).")] = None,
    params_dir: Annotated[Optional[str], typer.Option(help="Fitted cost model folder: routes --mode adaptive; "
                                                      "prices every mode's decisions.")] = None,
    max_waiting: Annotated[Optional[int], typer.Option(
        min=1, help="Requests that may wait for a first token; more get 429 with Retry-After (default: no limit).")] = None,
    drain_timeout: Annotated[float, typer.Option(
        min=0, help="On SIGTERM: new requests get 503, those in flight get this many s, then exit 0.")] = DRAIN_TIMEOUT_S,
    dist_init_addr: Annotated[Optional[str], typer.Option(
        help="HOST:PORT where nodes (`pdcli node`) join this head (its store and listener bind HOST only).")] = None,
    nnodes: Annotated[int, typer.Option(min=1, help="Nodes in the cluster, this head included: wait for the others.")] = 1,
    node_timeout: Annotated[float, typer.Option(min=0, help="s to wait for the other nodes at start-up.")] = 600.0,
    net_gbps: Annotated[Optional[float], typer.Option(
        min=0, help="Gbit/s between nodes: the router's price of a handoff across nodes when the profile has "
        "no measured cross-node pair.")] = None,
    device: Device = None,
    mps: Mps = None,
    engine: dict = None,
) -> None:
    """OpenAI-compatible HTTP server (completions, chat, models, health, metrics) over the chosen mode; with
    --dist-init-addr, the head of a cluster whose nodes join with `pdcli node` (PDCLI_CLUSTER_TOKEN: its secret,
    required unless the address is loopback)."""
    import torch
    from rich.console import Console

    from pdcli.coordinator.central import CentralScheduler
    from pdcli.coordinator.policy import make_policy
    from pdcli.models.loader import ModelLoadError
    from pdcli.server.app import create_app
    from pdcli.server.drain import DrainingServer
    from pdcli.workers.layout import parse_layout, pd_on_collocated

    err = Console(stderr=True, highlight=False)
    kw = engine
    cluster = None
    try:
        make_policy(mode)
        if not (collocated or prefill or decode):
            collocated = device or ("cuda:0" if torch.cuda.is_available() else "cpu")
        layout = parse_layout(collocated, prefill, decode, whole=not dist_init_addr, tp=kw["tensor_parallel_size"])
        addr, key = _cluster_address(dist_init_addr, nnodes)
        with err.status(f"starting {len(layout)} worker(s) for {model}"):
            cs = CentralScheduler(model, layout, mode=mode, params_dir=params_dir, host=addr[0] if addr else "127.0.0.1",
                                  pd_on_collocated=pd_on_collocated(layout, mode), mps=mps, **kw)
        if addr:
            cluster = _start_cluster(cs, model, kw, addr, key, nnodes, node_timeout, err)
            if cs.router is not None:
                assumed = cs.router.cm.assume_net(net_gbps)
                err.print(f"assumed: {assumed}" if assumed else "handoffs across nodes priced as profiled (net)"
                          if "net" in cs.router.cm.transfer else "handoffs across nodes priced as the profile's "
                          f"{next(iter(cs.router.cm.transfer))} transfers (pass --net-gbps)")
    except (ValueError, ModelLoadError) as e:
        fail(str(e))
    except (RuntimeError, OSError, TimeoutError) as e:
        fail(str(e), EXIT_RUNTIME)
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_INTERRUPTED) from None
    cs.max_waiting = max_waiting
    app = create_app(cs, model, served_model_name or model, cs.max_model_len, api_key)
    err.print(f"pdcli serving {served_model_name or model} ({mode}, {len(cs.pool.live())} worker(s)) on "
              f"http://{host}:{port}/v1")
    _run_server(DrainingServer, app, cs, host, port, drain_timeout, cluster)


def _cluster_address(dist_init_addr: str | None, nnodes: int):
    """(host, port) and the secret of the cluster's address, or (None, None) for a single host."""
    from pdcli.cluster.transport import authkey, parse_addr

    if not dist_init_addr:
        if nnodes > 1:
            raise ValueError("--nnodes > 1 needs --dist-init-addr HOST:PORT")
        return None, None
    addr = parse_addr(dist_init_addr)
    return addr, authkey(addr[0])


def _start_cluster(cs, model: str, kw: dict, addr, key: bytes, nnodes: int, node_timeout: float, err):
    """Listen for nodes on addr, wait for nodes 1 .. nnodes - 1, check the whole layout; the head."""
    from pdcli.cluster.fingerprint import model_fingerprint
    from pdcli.cluster.head import ClusterHead
    from pdcli.workers.layout import check_layout

    try:
        head = ClusterHead(cs, addr, key, model_fingerprint(model, kw))
        with err.status(f"waiting for {nnodes - 1} node(s) on {addr[0]}:{addr[1]}"):
            head.wait_for(nnodes, node_timeout)
        check_layout([w.spec for w in cs.pool.live()])
        cs.pool.wait_pairs()
    except BaseException:
        if "head" in locals():
            head.close()
        cs.shutdown()
        raise
    return head


def _run_server(server_cls, app, cs, host: str, port: int, drain_timeout: float, cluster=None) -> None:
    """uvicorn.run's steps with our server: Ctrl-C: uvicorn stops taking requests and gives the open ones
    GRACEFUL_S; SIGTERM: a drain (server/drain.py); then the workers stop."""
    import uvicorn

    from pdcli.logger import current_level

    config = uvicorn.Config(app, host=host, port=port, log_level=logging.getLevelName(current_level()).lower(),
                            timeout_graceful_shutdown=GRACEFUL_S)
    config.load_app()
    server = server_cls(config, app.state.server, cs, drain_timeout)
    try:
        try:
            server.run()
        except KeyboardInterrupt:
            pass
        if not server.started:
            raise typer.Exit(EXIT_RUNTIME)
    finally:
        if cluster is not None:
            cluster.close()
        try:
            cs.shutdown()
        except KeyboardInterrupt:  # a second Ctrl-C: the workers were killed; exit as uvicorn does
            pass
