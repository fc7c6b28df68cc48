"""`t2r generate`: prefill the prompts, then decode from the constant-size recurrent state."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from t2r.cli.common import Formatter, bounded_float, peak_rss_bytes, positive_int
from t2r.cli.convert import add_global_cache_flag
from t2r.errors import UsageError
from t2r.inference.stopping import eos_ids
from t2r.modeling.config import WEIGHT_FORMATS


def add_decode_flags(parser: argparse.ArgumentParser, fastest_by_default: bool = False) -> None:
    """How the decode step runs: weight format, compilation, a global cache. fastest_by_default
    (serve): no flag means the fastest path this machine supports (`serving.server.fastest_decode`)."""
    add_global_cache_flag(parser, "given to the converted model as it loads (default: its own)")
    parser.add_argument(
        "--weights",
        choices=WEIGHT_FORMATS,
        default=None if fastest_by_default else "fp32",
        help="decode with fp32, bf16, int8 or int4 weight-only projections (the state stays fp32)"
        + (
            " (default: int4 where t2r's int4 kernel runs: Linux, AVX2, a C++ compiler; else fp32)"
            if fastest_by_default
            else ""
        ),
    )
    compile_help = (
        "torch.compile the decode step: the first run compiles and keeps the step in "
        "$T2R_CACHE_DIR/compiled-steps (default ~/.cache/t2r), later runs load it in seconds"
    )
    if fastest_by_default:
        parser.add_argument(
            "--compile",
            action=argparse.BooleanOptionalAction,
            default=None,
            help=compile_help + "; one step for batch 1 and one for larger batches, made or loaded at start "
            "(default: on where a C++ compiler is on PATH)",
        )
    else:
        parser.add_argument("--compile", action="store_true", help=compile_help)


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "generate", help="decode from a converted model, one token at a time", formatter_class=Formatter
    )
    parser.add_argument("model", help="a converted model folder")
    parser.add_argument(
        "--prompt",
        action="append",
        required=True,
        help="repeatable: several prompts decode as one batch (rows leave as they finish)",
    )
    parser.add_argument("--max-new-tokens", type=positive_int, default=128, help="tokens to decode per prompt")
    parser.add_argument("--greedy", action="store_true", help="argmax decoding instead of sampling")
    parser.add_argument("--temperature", type=bounded_float(0.0, 100.0), default=1.0, help="sampling temperature")
    parser.add_argument("--top-p", type=bounded_float(0.0, 1.0), default=1.0, help="nucleus sampling mass")
    parser.add_argument("--seed", type=int, default=0, help="seeds the sampling")
    parser.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    parser.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-text token")
    add_decode_flags(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from t2r.caches import compiled_steps_folder, decode_weights_folder
    from t2r.hub import load_model, model_weights_identity
    from t2r.inference.generate import generate_batch
    from t2r.inference.sampling import Sampling
    from t2r.modeling.decode_weights import decoding_model
    from t2r.modeling.fast_decode import Decoder
    from t2r.modeling.model import T2RForCausalLM

    model, tokenizer = load_model(args.model)
    if isinstance(model, T2RForCausalLM):
        model.with_global_cache(args.global_cache, args.global_select)
    if not isinstance(model, T2RForCausalLM):
        raise UsageError(f"{args.model} is not a converted model; run `t2r convert` first")
    if args.chat and not getattr(tokenizer, "chat_template", None):
        raise UsageError(f"{args.model} has no chat template; drop --chat")
    prompts = [encode(tokenizer, prompt, args.chat) for prompt in args.prompt]
    stop_ids = frozenset() if args.ignore_eos else eos_ids(tokenizer, model)
    sampling = Sampling(greedy=args.greedy, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    # Stacked q/k/v and gate/up (fewer kernels) in the chosen format, kept on disk for the next run.
    model = decoding_model(model, args.weights, decode_weights_folder(), model_weights_identity(args.model))
    decoder = Decoder(compile=args.compile, artifacts=compiled_steps_folder())
    clock = FirstDecodedToken(len(prompts))
    if len(prompts) == 1:  # stream the one completion as it is decoded
        import torch
        from transformers import TextStreamer

        streamer = TextStreamer(tokenizer, skip_special_tokens=True)
        print(args.prompt[0] if not args.chat else "", end="", flush=True)

        def stream(row: int, token: int) -> None:
            clock(row, token)
            streamer.put(torch.tensor([token]))

        results = generate_batch(model, prompts, args.max_new_tokens, sampling, stream, stop_ids, decoder)
        streamer.end()
    else:
        results = generate_batch(model, prompts, args.max_new_tokens, sampling, clock, stop_ids, decoder)
        for prompt, result in zip(args.prompt, results, strict=True):
            text = tokenizer.decode(result.new_tokens, skip_special_tokens=True)
            print(f"--- {prompt!r}\n{prompt if not args.chat else ''}{text}", flush=True)
    print(speed_line(results, args.compile, clock.seconds), file=sys.stderr)


class FirstDecodedToken:
    """An `on_token` callback that notes when the first decoded token came, in seconds since the
    process started (imports, loading, prefill and a compilation included): the first `rows` tokens
    come from the prefill's logits, the next from the first decode step."""

    def __init__(self, rows: int) -> None:
        self.rows, self.tokens, self.seconds = rows, 0, None

    def __call__(self, row: int, token: int) -> None:
        self.tokens += 1
        if self.tokens == self.rows + 1:
            import time

            import psutil

            self.seconds = time.time() - psutil.Process().create_time()


def encode(tokenizer: Any, prompt: str, chat: bool) -> Any:
    """A prompt's token ids [T] (through the chat template with `chat`)."""
    import torch

    if chat:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    ids = torch.tensor(tokenizer(prompt, add_special_tokens=not chat).input_ids, dtype=torch.long)
    if len(ids) == 0:
        raise UsageError("a prompt is empty")
    return ids


def speed_line(results: list[Any], compiled: bool, first_decoded: float | None = None) -> str:
    """The last line on stderr: tokens, prefill, first step, steady speed, state size, peak memory."""
    result = results[0]
    new_tokens = sum(len(r.new_tokens) for r in results)
    # The first token of each row comes from the prefill's logits: decoding made the rest. The
    # speed leaves out the first decode step, where a compiled step compiles (printed apart).
    steady_seconds = result.decode_seconds - result.first_step_seconds
    rate = result.later_step_rows / steady_seconds if result.later_step_rows and steady_seconds > 0 else 0.0
    growth = (
        f" (+{result.bytes_per_token:,} bytes per token: KV cache of the softmax layers)"
        if result.bytes_per_token
        else ", constant"
    )
    more = f" (and {len(results) - 1} more prompts, one batch)" if len(results) > 1 else ""
    return (
        f"[{new_tokens} new tokens after a {result.prompt_tokens}-token prompt{more}; "
        f"prefill {result.prefill_seconds:.2f} s; first step {result.first_step_seconds:.2f} s"
        f"{' (compiling or loading the compiled step)' if compiled else ''}; then {rate:.1f} tokens/s; "
        f"{'' if first_decoded is None else f'first decoded token {first_decoded:.1f} s after the process started; '}"
        f"state {result.state_bytes / 2**20:.2f} MiB{growth}; peak RSS {peak_rss_bytes() / 2**20:.0f} MiB]"
    )
