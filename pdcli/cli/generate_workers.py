"""`pdcli generate --mode ...`: the same command through the coordinator and worker processes."""
from __future__ import annotations

import json
import sys
import time

from pdcli.cli.common import EXIT_RUNTIME, fail


def start_coordinator(prompts, model, chat, sampling, device, mode, collocated, prefill, decode, engine_kwargs, mps):
    """(coordinator, the prompts' token ids, sampling params); bad input exits with one line."""
    from rich.console import Console

    from pdcli import SamplingParams
    from pdcli.coordinator.central import CentralScheduler
    from pdcli.coordinator.policy import make_policy
    from pdcli.models.loader import ModelLoadError, resolve
    from pdcli.workers.layout import parse_layout, pd_on_collocated

    engine_kwargs = {k: v for k, v in engine_kwargs.items() if k != "device"}
    try:
        make_policy(mode)
        params = SamplingParams(**sampling)
        if not (collocated or prefill or decode):
            dev = device or "cpu"
            collocated, prefill, decode = dev, dev, dev  # one of each role on the device
        layout = parse_layout(collocated, prefill, decode, tp=engine_kwargs.get("tensor_parallel_size") or 1)
        tok = resolve(model).tokenizer
        use_chat = bool(tok.chat_template) if chat is None else chat
        ids = [tok.apply_chat_template([{"role": "user", "content": p}]) if use_chat else tok.encode(p) for p in prompts]
        with Console(stderr=True).status(f"starting {len(layout)} workers for {model}", spinner="dots"):
            cs = CentralScheduler(model, layout, mode=mode, pd_on_collocated=pd_on_collocated(layout, mode),
                                  mps=mps, **engine_kwargs)
    except (ValueError, TypeError, ModelLoadError) as e:
        fail(str(e))
    except (RuntimeError, OSError, TimeoutError) as e:
        fail(str(e), EXIT_RUNTIME)
    return cs, ids, params


def stream_text(cs, t) -> None:
    """Write one request's text to stdout as its tokens arrive."""
    from pdcli.coordinator.output import TextStream

    stream = TextStream(cs.tokenizer, t.params.stop)
    while True:
        _, _, reason = t.events.get()
        visible = cs.outputs.visible(t, 0, reason)
        sys.stdout.write(stream.update(visible, None if reason is None else cs.outputs.text(t, visible)))
        sys.stdout.flush()
        if reason is not None:
            return


def generate_with_workers(prompts, model, chat, max_tokens, temperature, top_p, top_k, seed, ignore_eos, device,
                          as_json, mode, collocated, prefill, decode, engine_kwargs, mps=None) -> None:
    from rich.console import Console

    sampling = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                    ignore_eos=ignore_eos)
    cs, ids, params = start_coordinator(prompts, model, chat, sampling, device, mode, collocated, prefill, decode,
                                        engine_kwargs, mps)
    try:
        start = time.perf_counter()
        tracked = [cs.submit(p, params) for p in ids]
        for i, t in enumerate(tracked):
            if not as_json:
                if len(tracked) > 1:
                    sys.stdout.write(f"{chr(10) if i else ''}--- [{i}] ---\n")
                stream_text(cs, t)
            t.done.wait()
        outs = [cs.output(t) for t in tracked]
    finally:
        cs.shutdown()
    if as_json:
        json.dump([{"text": o.text, "token_ids": o.token_ids, "path": o.metrics["path"]} for o in outs], sys.stdout)
        sys.stdout.write("\n")
    else:
        sys.stdout.write("\n")
        n = sum(len(o.token_ids) for o in outs)
        elapsed = time.perf_counter() - start
        paths = ", ".join(sorted({o.metrics["path"] for o in outs}))
        Console(stderr=True, highlight=False).print(
            f"[dim]{n} tokens in {elapsed:.2f} s · {n / max(elapsed, 1e-9):.1f} tok/s · mode {mode} ({paths})[/dim]")
    failed = [o.error for o in outs if o.error]
    if failed:
        fail(failed[0], EXIT_RUNTIME)
