"""`t2r convert | generate | eval`: the command line. Only this module knows there is one.

Every failure a user can cause ends as one line on stderr: exit 2 for a usage error (bad flag
value, missing path, empty data, unsupported architecture), exit 1 for the rest.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
from pathlib import Path
from typing import Any, NoReturn

from t2r.config import FEATURE_MAPS, FORMS
from t2r.errors import T2RError, UsageError

AUTO_TEACHER = "<base model>"


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (exit 2) instead of the usage block."""

    def error(self, message: str) -> NoReturn:
        print(f"t2r: error: {message}", file=sys.stderr)
        sys.exit(2)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def bounded_float(low: float, high: float, include_low: bool = False):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not ((low <= value if include_low else low < value) and value <= high):
            raise argparse.ArgumentTypeError(f"expected a number in ({low}, {high}], got {text!r}")
        return value

    return parse


def build_parser() -> Parser:
    parser = Parser(prog="t2r", description="Turn a pretrained transformer LM into a linear-attention RNN.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    convert = commands.add_parser("convert", help="swap softmax attention for linear attention and save")
    convert.add_argument(
        "--model",
        default="smollm2-135m",
        help="alias (smollm2-135m), .gguf file, local HF folder or hub id (default: %(default)s)",
    )
    convert.add_argument("--feature-map", choices=FEATURE_MAPS, default="t2r")
    convert.add_argument(
        "--feature-dim",
        type=positive_int,
        default=None,
        help="feature size (default: 32 for t2r, 64 for rfa, head_dim for hedgehog)",
    )
    convert.add_argument("--untie-qk", action="store_true", help="separate feature maps for queries and keys")
    convert.add_argument("--chunk-size", type=positive_int, default=64)
    convert.add_argument("--seed", type=int, default=0)
    convert.add_argument("--out", type=Path, required=True, help="folder to write the converted model to")
    convert.add_argument("--overwrite", action="store_true", help="replace --out if it exists")

    generate = commands.add_parser("generate", help="decode from a converted model, one token at a time")
    generate.add_argument("model", help="a converted model folder")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--max-new-tokens", type=positive_int, default=128)
    generate.add_argument("--greedy", action="store_true", help="argmax decoding (default: sampling)")
    generate.add_argument("--temperature", type=bounded_float(0.0, 100.0), default=1.0)
    generate.add_argument("--top-p", type=bounded_float(0.0, 1.0), default=1.0)
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    generate.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-text token")

    evaluate = commands.add_parser("eval", help="perplexity on a text file, optionally fidelity to the teacher")
    evaluate.add_argument("model", help="a converted model folder, or any teacher (alias, .gguf, folder, hub id)")
    evaluate.add_argument("--data", type=Path, required=True, help="a UTF-8 text file")
    evaluate.add_argument("--max-tokens", type=positive_int, default=None, help="score the first N tokens only")
    evaluate.add_argument("--seq-len", type=positive_int, default=512)
    evaluate.add_argument("--stride", type=positive_int, default=None, help="window step (default: --seq-len)")
    evaluate.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help="windows per batch (default: 4; 16 with --mode recurrent, which batches well)",
    )
    evaluate.add_argument("--mode", choices=FORMS, default="chunked", help="attention form of a converted model")
    evaluate.add_argument(
        "--teacher",
        nargs="?",
        const=AUTO_TEACHER,
        default=None,
        help="also report KL(teacher||model) and top-1 agreement (default teacher: the base model)",
    )
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def set_up_logging() -> None:
    """t2r's notices go to stderr as `t2r: ...`; transformers keeps to errors, without its bars."""
    import logging

    from transformers.utils import logging as transformers_logging

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("t2r: %(message)s"))
    package_logger = logging.getLogger("t2r")
    package_logger.handlers[:] = [handler]
    package_logger.setLevel(logging.INFO)
    package_logger.propagate = False
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


def run_convert(args: argparse.Namespace) -> None:
    from t2r.config import T2RConfig
    from t2r.convert import check_output_folder, convert, save_converted
    from t2r.hub import load_teacher

    config = T2RConfig(
        feature_map=args.feature_map,
        feature_dim=args.feature_dim,
        tie_qk=not args.untie_qk,
        chunk_size=args.chunk_size,
        seed=args.seed,
        base_model=args.model,
    )
    check_output_folder(args.out, args.overwrite)
    teacher, tokenizer = load_teacher(args.model)
    model = convert(teacher, config)
    save_converted(model, tokenizer, args.out, overwrite=args.overwrite)
    trained = sum(p.numel() for a in model.attentions for n, p in a.named_parameters() if "feature_map" in n)
    print(
        f"converted {args.model} ({teacher.config.model_type}, {len(model.attentions)} layers) "
        f"with {args.feature_map} feature maps ({trained:,} new parameters) -> {args.out}",
        file=sys.stderr,
    )


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_generate(args: argparse.Namespace) -> None:
    import torch
    from transformers import TextStreamer

    from t2r.convert import load_model
    from t2r.generate import Sampling, generate
    from t2r.model import T2RForCausalLM

    model, tokenizer = load_model(args.model)
    if not isinstance(model, T2RForCausalLM):
        raise UsageError(f"{args.model} is not a converted model; run `t2r convert` first")
    prompt = args.prompt
    if args.chat:
        if not getattr(tokenizer, "chat_template", None):
            raise UsageError(f"{args.model} has no chat template; drop --chat")
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    prompt_ids = torch.tensor(tokenizer(prompt, add_special_tokens=not args.chat).input_ids, dtype=torch.long)
    if len(prompt_ids) == 0:
        raise UsageError("the prompt is empty")
    stop_ids = frozenset() if args.ignore_eos else _eos_ids(tokenizer, model)
    streamer = TextStreamer(tokenizer, skip_special_tokens=True)
    sampling = Sampling(greedy=args.greedy, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    print(args.prompt if not args.chat else "", end="", flush=True)
    result = generate(
        model,
        prompt_ids,
        args.max_new_tokens,
        sampling,
        on_token=lambda token: streamer.put(torch.tensor([token])),
        stop_ids=stop_ids,
    )
    streamer.end()
    rate = (len(result.new_tokens) - 1) / result.decode_seconds if len(result.new_tokens) > 1 else 0.0
    print(
        f"[{len(result.new_tokens)} new tokens after a {result.prompt_tokens}-token prompt; "
        f"prefill {result.prefill_seconds:.2f} s; decode {rate:.1f} tokens/s; "
        f"state {result.state_bytes / 2**20:.2f} MiB; peak RSS {peak_rss_bytes() / 2**20:.0f} MiB]",
        file=sys.stderr,
    )


def _eos_ids(tokenizer: Any, model: Any) -> frozenset[int]:
    ids = {tokenizer.eos_token_id, getattr(model.base.config, "eos_token_id", None)}
    flat: set[int] = set()
    for value in ids:
        if isinstance(value, int):
            flat.add(value)
        elif isinstance(value, list):
            flat.update(v for v in value if isinstance(v, int))
    return frozenset(flat)


def run_eval(args: argparse.Namespace) -> None:
    import torch

    from t2r.convert import load_model
    from t2r.evaluate import evaluate
    from t2r.model import T2RForCausalLM
    from t2r.textfile import read_text

    stride = args.stride or args.seq_len
    if stride > args.seq_len:
        raise UsageError(f"--stride {stride} is larger than --seq-len {args.seq_len}: tokens would be skipped")
    text = read_text(args.data)
    model, tokenizer = load_model(args.model)
    teacher = None
    if args.teacher is not None:
        spec = args.teacher
        if spec == AUTO_TEACHER:
            spec = model.config.base_model if isinstance(model, T2RForCausalLM) else None
            if spec is None:
                raise UsageError("--teacher needs a model here (this model records no base model)")
        teacher, _ = load_model(spec)
        if isinstance(teacher, T2RForCausalLM):
            raise UsageError(f"--teacher {spec} is a converted model; name the softmax teacher")
    ids = torch.tensor(tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long)
    if args.max_tokens is not None:
        ids = ids[: args.max_tokens]
    if len(ids) < 2:
        raise UsageError(f"{args.data}: fewer than 2 tokens, nothing to score")
    batch_size = args.batch_size or (16 if args.mode == "recurrent" else 4)
    result = evaluate(model, ids, args.seq_len, stride, args.mode, teacher, batch_size)
    record = {"model": args.model, "data": str(args.data), **result.to_dict()}
    if teacher is not None:
        record["teacher"] = spec
    if args.json:
        print(json.dumps(record))
        return
    print(
        f"perplexity {result.perplexity:.4f} over {result.tokens:,} tokens "
        f"({result.windows} windows of {result.seq_len}, stride {result.stride}, {result.mode}, "
        f"{result.seconds:.0f} s)"
    )
    if teacher is not None:
        print(f"KL(teacher||model) {result.kl:.4f} nats/token, top-1 agreement {result.top1_agreement:.4f}")


COMMANDS = {"convert": run_convert, "generate": run_generate, "eval": run_eval}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        set_up_logging()
        COMMANDS[args.command](args)
    except T2RError as error:
        print(f"t2r: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("t2r: interrupted", file=sys.stderr)
        return 130
    return 0
