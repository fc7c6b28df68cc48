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

from t2r.config import DEFAULT_HALF_LIFE, DEFAULT_SINKS, FEATURE_MAPS, FORMS, WEIGHT_FORMATS
from t2r.errors import T2RError, UsageError
from t2r.train_config import Interrupted, TrainConfig

AUTO_TEACHER = "<base model>"


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (exit 2) instead of the usage block."""

    def error(self, message: str) -> NoReturn:
        print(f"t2r: error: {message}", file=sys.stderr)
        sys.exit(2)


def int_at_least(minimum: int):
    """An argparse type: an integer >= minimum."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}")
        return value

    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


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


def layer_indices(text: str) -> tuple[int, ...]:
    """'0,5,29' -> (0, 5, 29)."""
    try:
        indices = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices, got {text!r}") from None
    if not indices or min(indices) < 0:
        raise argparse.ArgumentTypeError(f"expected layer indices >= 0, got {text!r}")
    return indices


def add_attention_flags(parser: argparse.ArgumentParser) -> None:
    """The flags that shape the new attention, shared by convert and train."""
    parser.add_argument(
        "--window",
        type=non_negative_int,
        default=None,
        help="exact softmax over the last W tokens + linear attention before them (default: 64; 0 = pure linear)",
    )
    parser.add_argument(
        "--rotary-features",
        action="store_true",
        help="feature maps see q/k after rotary positions (default with a window: before, position-free)",
    )
    parser.add_argument(
        "--softmax-layers",
        type=layer_indices,
        metavar="I,J,...",
        default=None,
        help="comma-separated layer indices kept as exact softmax attention (their KV cache grows)",
    )
    parser.add_argument(
        "--half-life",
        type=non_negative_int,
        default=None,
        metavar="N",
        help=f"with a window, a key's linear weight halves every N tokens after it leaves the window "
        f"(default: {DEFAULT_HALF_LIFE}; 0 = never forget)",
    )
    parser.add_argument(
        "--sinks",
        type=non_negative_int,
        default=None,
        metavar="N",
        help=f"with a window, the first N tokens stay in the softmax part for good (attention sinks; "
        f"default: {DEFAULT_SINKS})",
    )


def add_decode_flags(parser: argparse.ArgumentParser) -> None:
    """How the decode step runs: weight format and compilation (shared by generate and bench)."""
    parser.add_argument(
        "--weights",
        choices=WEIGHT_FORMATS,
        default="fp32",
        help="decode with fp32, bf16, int8 or int4 weight-only projections (the state stays fp32)",
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the decode step (compiles once, ~1 min)")


def attention_settings(args: argparse.Namespace) -> dict:
    """T2RConfig fields from the attention flags (the config's defaults where a flag is absent)."""
    window = 64 if args.window is None else args.window
    return {
        "half_life": args.half_life,  # None: the config's default for the window
        "sinks": args.sinks,  # the same
        "window": window,
        # Without a window the linear part is the only attention and needs the positions.
        "rotary_features": args.rotary_features or window == 0,
        "softmax_layers": args.softmax_layers or (),
    }


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
    add_attention_flags(convert)
    convert.add_argument("--chunk-size", type=positive_int, default=64)
    convert.add_argument("--seed", type=int, default=0)
    convert.add_argument("--out", type=Path, required=True, help="folder to write the converted model to")
    convert.add_argument("--overwrite", action="store_true", help="replace --out if it exists")

    generate = commands.add_parser("generate", help="decode from a converted model, one token at a time")
    generate.add_argument("model", help="a converted model folder")
    generate.add_argument(
        "--prompt",
        action="append",
        required=True,
        help="repeatable: several prompts decode as one batch (rows leave as they finish)",
    )
    generate.add_argument("--max-new-tokens", type=positive_int, default=128)
    generate.add_argument("--greedy", action="store_true", help="argmax decoding (default: sampling)")
    generate.add_argument("--temperature", type=bounded_float(0.0, 100.0), default=1.0)
    generate.add_argument("--top-p", type=bounded_float(0.0, 1.0), default=1.0)
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    generate.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-text token")
    add_decode_flags(generate)

    train = commands.add_parser("train", help="attention transfer, then fine-tuning (runs under accelerate)")
    train.add_argument(
        "--model",
        default="smollm2-135m",
        help="teacher to convert (alias, .gguf, folder, hub id) or a converted folder to keep training",
    )
    train.add_argument("--teacher", default=None, help="the softmax teacher (default: --model, or its base model)")
    train.add_argument("--out", type=Path, required=True, help="run folder: checkpoints, metrics, final model")
    train.add_argument(
        "--data",
        action="append",
        default=[],
        help="training text, repeatable: file, folder, glob, hub dataset (default: built-in corpus)",
    )
    train.add_argument(
        "--distill-data",
        action="append",
        default=[],
        help="text used only as the teacher's input (transfer, KL), never as CE targets",
    )
    train.add_argument("--feature-map", choices=FEATURE_MAPS, default=None, help="for a new conversion")
    train.add_argument("--feature-dim", type=positive_int, default=None)
    train.add_argument("--untie-qk", action="store_true", help="separate q/k maps (the default for hedgehog)")
    add_attention_flags(train)
    defaults = TrainConfig()
    train.add_argument("--transfer-steps", type=non_negative_int, default=defaults.transfer_steps)
    train.add_argument("--finetune-steps", type=non_negative_int, default=defaults.finetune_steps)
    train.add_argument("--batch-size", type=positive_int, default=defaults.batch_size, help="blocks per step")
    train.add_argument("--grad-accum", type=positive_int, default=defaults.grad_accum)
    train.add_argument("--seq-len", type=positive_int, default=defaults.seq_len)
    train.add_argument("--lr-transfer", type=bounded_float(0.0, 10.0), default=defaults.lr_transfer)
    train.add_argument("--lr-finetune", type=bounded_float(0.0, 10.0), default=defaults.lr_finetune)
    train.add_argument("--ce-weight", type=bounded_float(0.0, 100.0, include_low=True), default=defaults.ce_weight)
    train.add_argument(
        "--distill-weight", type=bounded_float(0.0, 100.0, include_low=True), default=defaults.distill_weight
    )
    train.add_argument("--temperature", type=bounded_float(0.0, 100.0), default=defaults.temperature)
    train.add_argument("--lora-rank", type=non_negative_int, default=defaults.lora_rank)
    train.add_argument("--full", action="store_true", help="fine-tune all parameters instead of LoRA")
    train.add_argument("--checkpoint-every", type=positive_int, default=defaults.checkpoint_every)
    train.add_argument("--keep", type=positive_int, default=defaults.keep, help="checkpoints to keep")
    train.add_argument("--eval-blocks", type=positive_int, default=defaults.eval_blocks)
    train.add_argument("--seed", type=int, default=defaults.seed)
    train.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint")
    train.add_argument(
        "--from-scratch",
        action="store_true",
        help="baseline: same architecture, random weights, all trained (implies --full)",
    )

    evaluate = commands.add_parser("eval", help="perplexity on a text file, optionally fidelity to the teacher")
    evaluate.add_argument("model", help="a converted model folder, or any teacher (alias, .gguf, folder, hub id)")
    evaluate.add_argument(
        "--data",
        type=Path,
        action="append",
        required=True,
        help="a UTF-8 text file; repeat to score several joined into one document",
    )
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
    evaluate.add_argument(
        "--long",
        action="store_true",
        help="score the text as one stream through the recurrent state; perplexity per position bucket",
    )
    evaluate.add_argument(
        "--buckets",
        type=layer_indices,
        default=(2048, 8192, 16384),
        help="--long: bucket edges in tokens (default: 2048,8192,16384; the last bucket runs to the end)",
    )
    evaluate.add_argument("--segment", type=positive_int, default=1024, help="--long: tokens per forward pass")
    evaluate.add_argument(
        "--weights",
        choices=WEIGHT_FORMATS,
        default="fp32",
        help="score the model with these projections (what `generate --weights` decodes with)",
    )
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")

    bench = commands.add_parser("bench", help="speed and memory against the teacher (and llama.cpp if installed)")
    bench.add_argument("model", help="a converted model folder")
    bench.add_argument("--teacher", default=None, help="the softmax teacher (default: the model's base model)")
    bench.add_argument(
        "--contexts", type=layer_indices, default=(256, 1024, 2048, 4096, 8192, 16384, 32768), help="prompt lengths"
    )
    bench.add_argument("--batches", type=layer_indices, default=(1, 16), help="decode batch sizes")
    bench.add_argument("--steps", type=positive_int, default=16, help="decode steps per timed block")
    bench.add_argument("--repeats", type=positive_int, default=3, help="timed blocks per case (median)")
    bench.add_argument("--segment", type=positive_int, default=512, help="prefill segment of the converted model")
    bench.add_argument(
        "--weights",
        type=lambda text: tuple(text.split(",")),
        default=("fp32", "int4", "bf16"),
        metavar="F,G,...",
        help=f"weight formats of the converted rows, from {', '.join(WEIGHT_FORMATS)} (default: fp32,int4,bf16)",
    )
    bench.add_argument("--no-compile", action="store_true", help="no compiled rows (eager fast step only)")
    bench.add_argument("--no-reference-step", action="store_true", help="skip the `model.step` row")
    bench.add_argument("--data", type=Path, default=None, help="prompt text (default: the built-in corpus)")
    bench.add_argument("--gguf", type=Path, default=None, help="GGUF for the llama.cpp row (default: the teacher's)")
    bench.add_argument("--out", type=Path, default=Path("benchmarks"), help="folder for bench.json and plots")
    bench.add_argument("--report", type=Path, default=Path("BENCHMARKS.md"), help="Markdown file to update")
    bench.add_argument("--no-report", action="store_true", help="do not touch --report")
    bench.add_argument(
        "--replot",
        action="store_true",
        help="measure nothing: redraw the plots and the report section from OUT/bench.json",
    )
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
        **attention_settings(args),
    )
    check_output_folder(args.out, args.overwrite)
    teacher, tokenizer = load_teacher(args.model)
    model = convert(teacher, config)
    save_converted(model, tokenizer, args.out, overwrite=args.overwrite)
    trained = sum(
        p.numel()
        for a in model.attentions
        for n, p in a.named_parameters()
        if "feature_map" in n or "window_logit" in n
    )
    window = f"window {config.window} + " if config.window else ""
    state = model.init_state(1)
    kept = ""
    if config.softmax_layers:
        kept = (
            f", {len(config.softmax_layers)} kept softmax: their KV cache grows by "
            f"{state.bytes_per_token():,} bytes per token"
        )
    print(
        f"converted {args.model} ({teacher.config.model_type}, {len(model.attentions)} layers{kept}) "
        f"to {window}linear attention with {args.feature_map} feature maps ({trained:,} new parameters) "
        f"-> {args.out}; state {state.nbytes() / 2**20:.2f} MiB per sequence",
        file=sys.stderr,
    )


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_generate(args: argparse.Namespace) -> None:
    import torch
    from transformers import TextStreamer

    from t2r.convert import load_model
    from t2r.fast_decode import Decoder
    from t2r.generate import Sampling, generate_batch
    from t2r.model import T2RForCausalLM
    from t2r.quantize import with_weights

    model, tokenizer = load_model(args.model)
    if not isinstance(model, T2RForCausalLM):
        raise UsageError(f"{args.model} is not a converted model; run `t2r convert` first")
    if args.chat and not getattr(tokenizer, "chat_template", None):
        raise UsageError(f"{args.model} has no chat template; drop --chat")
    prompts = []
    for prompt in args.prompt:
        if args.chat:
            prompt = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
        ids = torch.tensor(tokenizer(prompt, add_special_tokens=not args.chat).input_ids, dtype=torch.long)
        if len(ids) == 0:
            raise UsageError("a prompt is empty")
        prompts.append(ids)
    stop_ids = frozenset() if args.ignore_eos else _eos_ids(tokenizer, model)
    sampling = Sampling(greedy=args.greedy, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    model = with_weights(model, args.weights)
    decoder = Decoder(compile=args.compile)
    if len(prompts) == 1:  # stream the one completion as it is decoded
        streamer = TextStreamer(tokenizer, skip_special_tokens=True)
        print(args.prompt[0] if not args.chat else "", end="", flush=True)
        on_token = lambda row, token: streamer.put(torch.tensor([token]))  # noqa: E731
    else:
        on_token = lambda row, token: None  # noqa: E731
    results = generate_batch(model, prompts, args.max_new_tokens, sampling, on_token, stop_ids, decoder)
    if len(prompts) == 1:
        streamer.end()
    else:
        for prompt, result in zip(args.prompt, results, strict=True):
            text = tokenizer.decode(result.new_tokens, skip_special_tokens=True)
            print(f"--- {prompt!r}\n{prompt if not args.chat else ''}{text}", flush=True)
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
    print(
        f"[{new_tokens} new tokens after a {result.prompt_tokens}-token prompt"
        f"{f' (and {len(results) - 1} more prompts, one batch)' if len(results) > 1 else ''}; "
        f"prefill {result.prefill_seconds:.2f} s; first step {result.first_step_seconds:.2f} s"
        f"{' (compiling)' if args.compile else ''}; then {rate:.1f} tokens/s; "
        f"state {result.state_bytes / 2**20:.2f} MiB{growth}; peak RSS {peak_rss_bytes() / 2**20:.0f} MiB]",
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
    from t2r.quantize import with_weights
    from t2r.textfile import read_text

    stride = args.stride or args.seq_len
    if stride > args.seq_len:
        raise UsageError(f"--stride {stride} is larger than --seq-len {args.seq_len}: tokens would be skipped")
    text = "\n\n".join(read_text(path) for path in args.data)
    data_name = ",".join(str(path) for path in args.data)
    model, tokenizer = load_model(args.model)
    model = with_weights(model, args.weights)
    if args.long and not isinstance(model, T2RForCausalLM):
        raise UsageError(f"--long scores a converted model; {args.model} is a softmax model (name it in --teacher)")
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
        raise UsageError(f"{data_name}: fewer than 2 tokens, nothing to score")
    if args.long:
        report_long(args, model, ids, teacher, data_name)
        return
    batch_size = args.batch_size or (16 if args.mode == "recurrent" else 4)
    result = evaluate(model, ids, args.seq_len, stride, args.mode, teacher, batch_size)
    record = {"model": args.model, "weights": args.weights, "data": data_name, **result.to_dict()}
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


def report_long(args: argparse.Namespace, model: Any, ids: Any, teacher: Any, data_name: str) -> None:
    from t2r.long_context import score_long

    result = score_long(model, ids, args.segment, (0, *args.buckets), teacher)
    record = {"model": args.model, "data": data_name, "teacher": args.teacher, **result.to_dict()}
    if args.json:
        print(json.dumps(record))
        return
    rows = [f"{'positions':<16}{'tokens':>8}{'perplexity':>12}{'teacher':>10}{'KL':>8}{'top-1':>8}"]
    for bucket in record["buckets"]:
        teacher_ppl = bucket.get("teacher_perplexity")
        rows.append(
            f"{bucket['begin']:>6}-{bucket['end']:<9}{bucket['tokens']:>8}{bucket['perplexity']:>12.3f}"
            + (f"{teacher_ppl:>10.3f}" if teacher_ppl is not None else f"{'-':>10}")
            + (f"{bucket['kl']:>8.3f}{bucket['top1_agreement']:>8.3f}" if "kl" in bucket else f"{'-':>8}{'-':>8}")
        )
    print("\n".join(rows))
    beyond = f"; the teacher ran on the first {result.teacher_context:,} tokens (its context)" if teacher else ""
    print(
        f"{result.tokens:,} tokens as one stream in segments of {result.segment}; state "
        f"{result.state_bytes[0]:,} bytes after the first segment, {result.state_bytes[-1]:,} after the last"
        f"{beyond}; {result.seconds:.0f} s"
    )


def run_train(args: argparse.Namespace) -> None:
    import torch

    from t2r.config import T2RConfig
    from t2r.convert import convert, load_model
    from t2r.data import resolve_sources
    from t2r.hub import empty_model, load_teacher
    from t2r.model import T2RForCausalLM
    from t2r.train import Trainer, training_data

    config = TrainConfig(
        transfer_steps=args.transfer_steps,
        finetune_steps=args.finetune_steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        seq_len=args.seq_len,
        lr_transfer=args.lr_transfer,
        lr_finetune=args.lr_finetune,
        ce_weight=args.ce_weight,
        distill_weight=args.distill_weight,
        temperature=args.temperature,
        lora_rank=args.lora_rank,
        full=args.full or args.from_scratch,
        checkpoint_every=args.checkpoint_every,
        keep=args.keep,
        eval_blocks=args.eval_blocks,
        seed=args.seed,
    )
    if args.out.exists() and not args.resume and any(args.out.iterdir()):
        raise UsageError(f"{args.out} already holds a run; pass --resume to continue it, or choose a new --out")
    if args.resume and not (args.out / "manifest.json").is_file():
        raise UsageError(f"{args.out}: no run to resume (no manifest.json)")
    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"{args.out}: exists and is not a folder")
    resolve_sources([*args.data, *args.distill_data])  # a missing path fails before a model loads
    student, tokenizer = load_model(args.model)
    if isinstance(student, T2RForCausalLM):
        conversion_flags = (
            args.feature_map,
            args.feature_dim,
            args.untie_qk,
            args.from_scratch,
            args.window,
            args.half_life,
            args.sinks,
        )
        if any(flag not in (None, False) for flag in conversion_flags) or args.rotary_features or args.softmax_layers:
            raise UsageError(f"{args.model} is already converted; drop the conversion flags")
        teacher_spec = args.teacher or student.config.base_model
        if teacher_spec is None:
            raise UsageError("--teacher is needed: this model records no base model")
    else:
        teacher_spec = args.teacher or args.model
        feature_map = args.feature_map or "hedgehog"
        if args.from_scratch:  # the paper's baseline: an RNN of the same shape that was never pretrained
            torch.manual_seed(args.seed)
            student = empty_model(student.config)
        student = convert(
            student,
            T2RConfig(
                feature_map=feature_map,
                feature_dim=args.feature_dim,
                # Hedgehog learns separate maps for queries and keys; T2R shares one (the paper),
                # and random features must be shared to estimate the softmax kernel at all.
                tie_qk=feature_map != "hedgehog" and not args.untie_qk,
                seed=args.seed,
                base_model=teacher_spec,
                **attention_settings(args),
            ),
        )
    teacher, _ = load_teacher(teacher_spec)
    data = training_data(args.data, args.distill_data, tokenizer, config.seq_len, config.seed)
    settings = {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()}
    trainer = Trainer(student, teacher, data, config, args.out, settings)
    evaluations = trainer.run(resume=args.resume)
    summary = trainer.finish(tokenizer, evaluations)
    if trainer.accelerator.is_main_process:
        print(summary_table(summary, teacher_spec, args.out / "model"))


def summary_table(summary: dict[str, Any], teacher: str, model: Path) -> str:
    rows = [f"{'':<22}{'perplexity':>12}{'KL':>10}{'top-1 agree':>13}"]
    for stage, result in summary["validation"].items():
        rows.append(
            f"{'after ' + stage:<22}{result['perplexity']:>12.3f}{result['kl']:>10.4f}{result['top1_agreement']:>13.4f}"
        )
    rows.append(f"validation: held-out blocks of the training data, teacher {teacher}")
    rows.append(f"tokens {summary['tokens']:,}, wall time {summary['minutes']:.1f} min; model saved to {model}")
    return "\n".join(rows)


def run_bench(args: argparse.Namespace) -> None:
    from t2r import hub
    from t2r.bench import BenchSettings, bench_prompt_ids, run_bench
    from t2r.bench_report import write
    from t2r.convert import load_model
    from t2r.model import T2RForCausalLM
    from t2r.textfile import read_text

    if 0 in args.contexts or 0 in args.batches:
        raise UsageError("--contexts and --batches must be positive")
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise UsageError("t2r bench draws its plots with matplotlib: pip install 't2r[bench]'")
    report = None if args.no_report else args.report
    if args.replot:
        saved = args.out / "bench.json"
        if not saved.is_file():
            raise UsageError(f"--replot reads {saved}, which does not exist; run the bench first")
        try:
            record = json.loads(saved.read_text())
            command = record["command"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise UsageError(f"--replot: {saved} is not a bench record ({error})") from None
        print_bars(write(record, args.out, report, command))
        return
    text = read_text(args.data) if args.data is not None else None
    model, tokenizer = load_model(args.model)
    if not isinstance(model, T2RForCausalLM):
        raise UsageError(f"{args.model} is not a converted model; run `t2r convert` first")
    spec = args.teacher or model.config.base_model
    if spec is None:
        raise UsageError("--teacher is needed: this model records no base model")
    unknown = [w for w in args.weights if w not in WEIGHT_FORMATS]
    if unknown or "fp32" not in args.weights:
        raise UsageError(
            f"--weights takes {', '.join(WEIGHT_FORMATS)} and must include fp32; got {unknown or args.weights}"
        )
    gguf = str(args.gguf) if args.gguf else None
    if gguf is None and hub.resolve(spec).kind == "gguf":
        gguf = hub.resolve(spec).name
    settings = BenchSettings(
        contexts=tuple(sorted(args.contexts)),
        batches=tuple(sorted(args.batches)),
        steps=args.steps,
        repeats=args.repeats,
        segment=args.segment,
        weights=tuple(dict.fromkeys(args.weights)),
        compile=not args.no_compile,
        reference_step=not args.no_reference_step,
    )
    prompt_ids = bench_prompt_ids(tokenizer, text, max(settings.contexts))
    teacher_context = getattr(model.base.config, "max_position_embeddings", None)
    del model  # each context loads the model afresh in a child process (see t2r.bench.run_bench)
    folder = Path(args.model).expanduser()  # a converted folder: load_model took it as one
    record = run_bench(
        folder, spec, prompt_ids, settings, teacher_context, gguf, log=lambda line: print(line, file=sys.stderr)
    )
    command = "t2r bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else "t2r bench"
    print_bars(write(record, args.out, report, command))


def print_bars(rows: list[dict]) -> None:
    for row in rows:
        value = "-" if row["value"] is None else f"{row['value']:.2f}"
        met = {True: "met", False: "NOT met", None: "not measured"}[row["met"]]
        sign = "<=" if row["at_most"] else ">="
        print(f"{row['bar']:<42} {value:>7}  ({sign} {row['target']}: {met}) {row['note']}")


COMMANDS = {
    "convert": run_convert,
    "train": run_train,
    "generate": run_generate,
    "eval": run_eval,
    "bench": run_bench,
}


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
    except Interrupted as stop:
        print(f"t2r: {stop}; checkpoint saved, continue with --resume", file=sys.stderr)
        return 130
    return 0
