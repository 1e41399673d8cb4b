"""`pdcli generate --mode ...`: the same command through the coordinator and worker processes."""
from __future__ import annotations

import json
import sys
import time

from pdcli.cli.common import EXIT_RUNTIME, fail


def generate_with_workers(prompts, model, chat, max_tokens, temperature, top_p, top_k, seed, ignore_eos, device,
                          as_json, mode, collocated, prefill, decode, engine_kwargs, mps=None) -> None:
    from rich.console import Console

    from pdcli import SamplingParams
    from pdcli.coordinator.central import CentralScheduler
    from pdcli.coordinator.policy import make_policy
    from pdcli.models.loader import ModelLoadError, resolve
    from pdcli.workers.layout import collocated_only, parse_layout

    err = Console(stderr=True, highlight=False)
    engine_kwargs = {k: v for k, v in engine_kwargs.items() if k != "device"}
    try:
        make_policy(mode)
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                                ignore_eos=ignore_eos)
        if not (collocated or prefill or decode):
            dev = device or "cpu"
            collocated, prefill, decode = dev, dev, dev  # one of each role on the device
        layout = parse_layout(collocated, prefill, decode)
        tok = resolve(model).tokenizer
        use_chat = bool(tok.chat_template) if chat is None else chat
        ids = [tok.apply_chat_template([{"role": "user", "content": p}]) if use_chat else tok.encode(p) for p in prompts]
        with err.status(f"starting {len(layout)} workers for {model}", spinner="dots"):
            cs = CentralScheduler(model, layout, mode=mode, pd_on_collocated=collocated_only(layout, mode),
                                  mps=mps, **engine_kwargs)
    except (ValueError, TypeError, ModelLoadError) as e:
        fail(str(e))
    except (RuntimeError, OSError, TimeoutError) as e:
        fail(str(e), EXIT_RUNTIME)
    try:
        start = time.perf_counter()
        tracked = [cs.submit(p, params) for p in ids]
        for i, t in enumerate(tracked):
            if not as_json:
                if len(tracked) > 1:
                    sys.stdout.write(f"{chr(10) if i else ''}--- [{i}] ---\n")
                shown, tokens = "", []
                while True:
                    _, new, reason = t.events.get()
                    tokens.extend(new)
                    text = cs.output(t).outputs[0].text if reason else tok.decode(tokens)
                    if text.startswith(shown) and not text.endswith("\ufffd"):
                        sys.stdout.write(text[len(shown):])
                        sys.stdout.flush()
                        shown = text
                    if reason is not None:
                        break
            t.done.wait()
        outs = [cs.output(t) for t in tracked]
    finally:
        cs.shutdown()
    failed = [o.error for o in outs if o.error]
    if as_json:
        json.dump([{"text": o.text, "token_ids": o.token_ids, "path": o.metrics["path"]} for o in outs], sys.stdout)
        sys.stdout.write("\n")
    else:
        sys.stdout.write("\n")
        n = sum(len(o.token_ids) for o in outs)
        elapsed = time.perf_counter() - start
        paths = ", ".join(sorted({o.metrics["path"] for o in outs}))
        err.print(f"[dim]{n} tokens in {elapsed:.2f} s · {n / max(elapsed, 1e-9):.1f} tok/s · mode {mode} ({paths})[/dim]")
    if failed:
        fail(failed[0], EXIT_RUNTIME)
