from __future__ import annotations

import gc
import json
import sys
import time
from typing import Annotated, Optional

import typer

from pdcli.cli import common
from pdcli.cli.common import DEFAULT_MODEL, EXIT_INTERRUPTED, EXIT_RUNTIME, Device, Model, Mps, engine_options, fail


@engine_options
def generate(
    prompts: Annotated[list[str], typer.Argument(help="One or more prompts.", show_default=False)],
    model: Model = DEFAULT_MODEL,
    chat: Annotated[Optional[bool], typer.Option("--chat/--no-chat", help="Apply the chat template (default: if the tokenizer has one).")] = None,
    max_tokens: Annotated[int, typer.Option(help="Tokens to generate per prompt.")] = 256,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option()] = 1.0,
    top_k: Annotated[int, typer.Option(help="-1 = off.")] = -1,
    seed: Annotated[Optional[int], typer.Option(help="Sampling seed (same seed, same output).")] = None,
    ignore_eos: Annotated[bool, typer.Option(help="Keep generating past EOS.")] = False,
    device: Device = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list of {text, token_ids} and nothing else on stdout.")] = False,
    mode: Annotated[Optional[str], typer.Option(help="Run through worker processes: collocated, disaggregated, adaptive or threshold.")] = None,
    collocated: Annotated[str, typer.Option("--collocated", help="Devices of collocated workers, e.g. cuda:0 (with --mode).")] = "",
    prefill: Annotated[str, typer.Option("--prefill", help="Devices of prefill workers, e.g. cuda:1,cuda:3 (with --mode).")] = "",
    decode: Annotated[str, typer.Option("--decode", help="Devices of decode workers, e.g. cuda:2 (with --mode).")] = "",
    mps: Mps = None,
    engine: dict = None,
) -> None:
    """Generate text for PROMPT(s) and stream it to the terminal."""
    try:
        if mode is not None or collocated or prefill or decode:
            from pdcli.cli.generate_workers import generate_with_workers

            return generate_with_workers(prompts, model, chat, max_tokens, temperature, top_p, top_k, seed,
                                         ignore_eos, device, as_json, mode or "collocated", collocated, prefill,
                                         decode, engine, mps)
        if device and "," in device:
            fail(f"generate runs on one device, got {device!r}; for several use --mode with --collocated, --prefill "
                 f"and --decode")
        common.fast_exit = True  # one engine in this process, no workers, nothing written but stdout and stderr
        gc.disable()  # while torch and the model load: each collection would walk every object made so far
        _generate_here(prompts, model, chat, max_tokens, temperature, top_p, top_k, seed, ignore_eos, device, as_json,
                       engine)
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        raise typer.Exit(EXIT_INTERRUPTED) from None


def _generate_here(prompts, model, chat, max_tokens, temperature, top_p, top_k, seed, ignore_eos, device, as_json,
                   engine) -> None:
    """One engine in this process."""
    from rich.console import Console

    from pdcli import LLM, SamplingParams
    from pdcli.inputs import PromptError
    from pdcli.models.loader import ModelLoadError

    err = Console(stderr=True, highlight=False)
    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                seed=seed, ignore_eos=ignore_eos)
        with err.status(f"loading {model}", spinner="dots"):
            llm = LLM(model, device=device, **engine)
        use_chat = bool(llm.tokenizer.chat_template) if chat is None else chat
        start = time.perf_counter()
        stream = llm.stream(prompts, params, chat=use_chat)
        if as_json:
            for _ in stream:
                pass
        else:
            _print_stream(stream, llm, len(prompts))
        outputs = llm._outputs
    except (ValueError, TypeError, ModelLoadError, PromptError) as e:
        fail(str(e))
    except (RuntimeError, OSError) as e:
        fail(str(e), EXIT_RUNTIME)
    elapsed = time.perf_counter() - start
    if as_json:
        json.dump([{"text": o.text, "token_ids": o.token_ids} for o in outputs], sys.stdout)
        sys.stdout.write("\n")
        return
    num_tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    ttft = min(o.metrics["first_token_time"] or float("inf") for o in outputs) - start
    err.print(f"[dim]{num_tokens} tokens in {elapsed:.2f} s · TTFT {ttft * 1e3:.0f} ms · "
              f"{num_tokens / max(elapsed, 1e-9):.1f} tok/s · {llm.engine.device.type} · "
              f"{llm.engine.kernel_path} attention[/dim]")


def _print_stream(stream, llm, num_prompts: int) -> None:
    """Print each prompt's text in order, streaming the one whose turn it is and buffering the rest."""
    buffers = [[] for _ in range(num_prompts)]
    done = [False] * num_prompts
    current, multi = 0, num_prompts > 1

    def header(i):
        if multi:
            sys.stdout.write(f"\n--- [{i}] ---\n" if i else f"--- [{i}] ---\n")

    header(0)
    for d in stream:
        i = llm.request_ids.index(d.request_id)
        if i == current:
            sys.stdout.write(d.text)
            sys.stdout.flush()
        else:
            buffers[i].append(d.text)
        done[i] = d.finished or done[i]
        while current < num_prompts and done[current]:
            current += 1
            if current < num_prompts:
                header(current)
                sys.stdout.write("".join(buffers[current]))
                sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
