"""`t2r eval`: perplexity on text files in windows, or along one long stream (`--long`); with
`--teacher`, KL(teacher||model) and top-1 agreement on the same tokens."""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from t2r.cli.common import Formatter, positive_int, token_counts
from t2r.cli.convert import add_global_cache_flag
from t2r.cli.eval_tasks import add_task_flags, baseline_settings, check_task_flags, run_chat, run_passkey
from t2r.errors import UsageError
from t2r.modeling.config import WEIGHT_FORMATS
from t2r.ops import FORMS

AUTO_TEACHER = "<base model>"
EQUAL_MEMORY = 0  # --baseline without a value: the window of equal state bytes


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "eval", help="perplexity on a text file, optionally fidelity to the teacher", formatter_class=Formatter
    )
    parser.add_argument("model", help="a converted model folder, or any teacher (alias, .gguf, folder, hub id)")
    parser.add_argument(
        "--data",
        type=Path,
        action="append",
        default=None,
        help="a UTF-8 text file; repeat to score several joined into one document (required but with --passkey, "
        "where it is the prose to hide the key in; default there: the built-in corpus)",
    )
    parser.add_argument("--max-tokens", type=positive_int, default=None, help="score the first N tokens (default: all)")
    parser.add_argument("--seq-len", type=positive_int, default=512, help="window length in tokens")
    parser.add_argument("--stride", type=positive_int, default=None, help="window step (default: --seq-len)")
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help="windows per batch (default: 4; 16 with --mode recurrent, which batches well)",
    )
    parser.add_argument("--mode", choices=FORMS, default="chunked", help="attention form of a converted model")
    add_global_cache_flag(parser, "given to the converted model as it loads; the baseline of equal bytes counts it")
    parser.add_argument(
        "--teacher",
        nargs="?",
        const=AUTO_TEACHER,
        default=None,
        help="also report KL(teacher||model) and top-1 agreement; without a value, the model's base model "
        "(default: no teacher)",
    )
    parser.add_argument(
        "--baseline",
        nargs="?",
        type=positive_int,
        const=EQUAL_MEMORY,
        default=None,
        metavar="W",
        help="also score the training-free sliding-window baseline: the model's teacher over its sinks + the "
        "last W tokens; without W, the W whose KV bytes equal the converted model's state bytes (default: none)",
    )
    parser.add_argument(
        "--long", action="store_true", help="score the text as one stream through the state, per position bucket"
    )
    parser.add_argument(
        "--buckets", type=token_counts, default=(2048, 8192, 16384), help="--long: bucket edges in tokens"
    )
    parser.add_argument("--segment", type=positive_int, default=1024, help="--long: tokens per forward pass")
    parser.add_argument(
        "--weights", choices=WEIGHT_FORMATS, default="fp32", help="score with the projections `generate` decodes with"
    )
    add_task_flags(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    import torch

    from t2r.data.textfile import read_text
    from t2r.hub import load_model
    from t2r.modeling.model import T2RForCausalLM
    from t2r.modeling.quantize import with_weights

    check_task_flags(args)
    stride = args.stride or args.seq_len
    if stride > args.seq_len:
        raise UsageError(f"--stride {stride} is larger than --seq-len {args.seq_len}: tokens would be skipped")
    model, tokenizer = load_model(args.model)
    if args.global_cache is not None or args.global_select is not None:
        if not isinstance(model, T2RForCausalLM):
            raise UsageError(f"--global-cache is a converted model's; {args.model} is a softmax model")
        model.with_global_cache(args.global_cache, args.global_select)
    model = with_weights(model, args.weights)
    if args.long and not isinstance(model, T2RForCausalLM):
        raise UsageError(f"--long scores a converted model; {args.model} is a softmax model (name it in --teacher)")
    # The tasks compare answers with the teacher's: it is the base model unless named.
    teacher_flag = AUTO_TEACHER if (args.passkey or args.chat) and args.teacher is None else args.teacher
    teacher, teacher_spec = load_eval_teacher(teacher_flag, model)
    baseline = load_eval_baseline(args.baseline, model, teacher)
    if baseline is not None:
        baseline = with_weights(baseline, args.weights)  # like for like: the same weight format
    if args.passkey or args.chat:
        args.teacher_spec = teacher_spec
        (run_passkey if args.passkey else run_chat)(args, model, tokenizer, teacher, baseline)
        return
    text = "\n\n".join(read_text(path) for path in args.data)
    data_name = ",".join(str(path) for path in args.data)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long)
    if args.max_tokens is not None:
        ids = ids[: args.max_tokens]
    if len(ids) < 2:
        raise UsageError(f"{data_name}: fewer than 2 tokens, nothing to score")
    scoring = Scoring(model, ids, data_name, teacher, teacher_spec, baseline)
    if args.long:
        report_long(args, scoring)
    else:
        report_windows(args, scoring, stride)


def load_eval_teacher(spec: str | None, model: Any) -> tuple[Any, str | None]:
    """The softmax teacher that `--teacher` names (AUTO_TEACHER: the model's base model), or None."""
    from t2r.hub import load_model
    from t2r.modeling.model import T2RForCausalLM

    if spec is None:
        return None, None
    if spec == AUTO_TEACHER:
        spec = model.config.base_model if isinstance(model, T2RForCausalLM) else None
        if spec is None:
            raise UsageError("--teacher needs a model here (this model records no base model)")
    teacher, _ = load_model(spec)
    if isinstance(teacher, T2RForCausalLM):
        raise UsageError(f"--teacher {spec} is a converted model; name the softmax teacher")
    return teacher, spec


def load_eval_baseline(window: int | None, model: Any, teacher: Any) -> Any:
    """The sliding-window baseline that `--baseline` asks for (its teacher: `teacher`, or the model's
    base model), or None."""
    from t2r.hub import load_baseline
    from t2r.modeling.model import T2RForCausalLM

    if window is None:
        return None
    if not isinstance(model, T2RForCausalLM):
        raise UsageError("--baseline compares a converted model with its teacher's window: give a converted model")
    return load_baseline(model, teacher, None if window == EQUAL_MEMORY else window)


@dataclass(frozen=True)
class Scoring:
    """What a perplexity run scores: the model, the token ids [N] of the data, and what it is
    compared with (the teacher and the baseline, or None)."""

    model: Any
    ids: Any
    data_name: str
    teacher: Any = None
    teacher_spec: str | None = None
    baseline: Any = None


def report_windows(args: argparse.Namespace, scoring: Scoring, stride: int) -> None:
    from t2r.evaluation.perplexity import evaluate_many
    from t2r.hub import record_evaluation
    from t2r.modeling.model import T2RForCausalLM

    model, ids, teacher, baseline = scoring.model, scoring.ids, scoring.teacher, scoring.baseline
    teacher_spec, data_name = scoring.teacher_spec, scoring.data_name
    batch_size = args.batch_size or (16 if args.mode == "recurrent" else 4)
    models = [model] if baseline is None else [model, baseline]  # one teacher pass for both
    result, *others = evaluate_many(models, ids, args.seq_len, stride, args.mode, teacher, batch_size)
    record = {"model": args.model, "weights": args.weights, "data": data_name, **result.to_dict()}
    if teacher is not None:
        record["teacher"] = teacher_spec
    rows = [("model", result)]
    if baseline is not None:
        baseline_result = others[0]
        record["baseline"] = {**baseline_settings(baseline), **baseline_result.to_dict()}
        rows.append((f"baseline (sinks {baseline.config.sinks} + window {baseline.config.window})", baseline_result))
    if isinstance(model, T2RForCausalLM) and record_evaluation(
        args.model, {k: v for k, v in record.items() if k != "baseline"}
    ):
        logging.getLogger(__name__).info("score kept in %s (eval_results.json, README.md)", args.model)
    if args.json:
        print(json.dumps(record))
        return
    for name, scored in rows:
        prefix = f"{name}: " if baseline is not None else ""
        print(
            f"{prefix}perplexity {scored.perplexity:.4f} over {scored.tokens:,} tokens "
            f"({scored.windows} windows of {scored.seq_len}, stride {scored.stride}, {scored.mode}, "
            f"{scored.seconds:.0f} s)"
        )
        if teacher is not None:
            print(f"{prefix}KL(teacher||model) {scored.kl:.4f} nats/token, top-1 agreement {scored.top1_agreement:.4f}")


def report_long(args: argparse.Namespace, scoring: Scoring) -> None:
    from t2r.evaluation.long_context import read_teacher, score_long

    model, ids, teacher, baseline = scoring.model, scoring.ids, scoring.teacher, scoring.baseline
    teacher_spec, data_name = scoring.teacher_spec, scoring.data_name
    teacher = None if teacher is None else read_teacher(teacher, ids)  # one pass, for the baseline too
    result = score_long(model, ids, args.segment, (0, *args.buckets), teacher)
    record = {"model": args.model, "data": data_name, "teacher": teacher_spec, **result.to_dict()}
    if baseline is not None:
        baseline_result = score_long(baseline, ids, args.segment, (0, *args.buckets), teacher)
        record["baseline"] = {**baseline_settings(baseline), **baseline_result.to_dict()}
    if args.json:
        print(json.dumps(record))
        return
    print_long(record, result, teacher)
    if baseline is not None:
        print(f"baseline (sinks {baseline.config.sinks} + window {baseline.config.window}):")
        print_long(record["baseline"], baseline_result, teacher)


def print_long(record: dict[str, Any], result: Any, teacher: Any) -> None:
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
