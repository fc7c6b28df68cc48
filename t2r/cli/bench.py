"""`t2r bench`: speed and memory of a converted model against its teacher (eager, and compiled with a
static KV cache, in the same weight formats) and llama.cpp, in interleaved rounds."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

from t2r.cli.common import Formatter, batch_sizes, positive_int, token_counts, weight_formats
from t2r.cli.convert import add_global_cache_flag
from t2r.errors import UsageError

CONTEXTS = (256, 1024, 2048, 4096, 8192, 16384, 32768)


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "bench",
        help="speed and memory against the teacher (and llama.cpp if installed)",
        formatter_class=Formatter,
    )
    parser.add_argument("model", help="a converted model folder")
    parser.add_argument("--teacher", default=None, help="the softmax teacher (default: the model's base model)")
    parser.add_argument("--contexts", type=token_counts, default=CONTEXTS, help="prompt lengths in tokens")
    parser.add_argument("--batches", type=batch_sizes, default=(1, 16), help="decode batch sizes")
    parser.add_argument("--steps", type=positive_int, default=16, help="decode steps per timed block")
    parser.add_argument(
        "--repeats",
        type=positive_int,
        default=3,
        help="rounds per context: each round runs every engine once, in turn (median, min, max)",
    )
    parser.add_argument(
        "--segment",
        type=positive_int,
        default=512,
        help="prefill segment of the converted model, and the length of every engine's warm-up prefill",
    )
    parser.add_argument(
        "--weights",
        type=weight_formats,
        default=("fp32", "int4", "bf16"),
        metavar="F,G,...",
        help="weight formats of the converted rows and of their teacher partners (fp32 among them)",
    )
    parser.add_argument(
        "--no-compile",
        action="store_true",
        help="no compiled rows, the teacher's (static KV cache) nor the converted model's (eager rows in each format)",
    )
    parser.add_argument("--no-reference-step", action="store_true", help="skip the `model.step` row")
    parser.add_argument(
        "--baseline",
        action="store_true",
        help="also the training-free sliding-window baseline (the teacher over the model's sinks + the window "
        "of equal state bytes), in the same weight formats",
    )
    add_global_cache_flag(parser, "given to the converted model as it loads; --baseline counts it", select=False)
    parser.add_argument("--data", type=Path, default=None, help="prompt text (default: the built-in corpus)")
    parser.add_argument("--gguf", type=Path, default=None, help="GGUF of the llama.cpp row (default: the teacher's)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks"), help="folder for bench.json and plots")
    parser.add_argument("--report", type=Path, default=Path("BENCHMARKS.md"), help="Markdown file to update")
    parser.add_argument("--no-report", action="store_true", help="do not touch --report")
    parser.add_argument(
        "--replot", action="store_true", help="measure nothing: redraw plots and report from OUT/bench.json"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from t2r.evaluation.bench.report import write

    if importlib.util.find_spec("matplotlib") is None:
        raise UsageError("t2r bench draws its plots with matplotlib: pip install 't2r[bench]'")
    report = None if args.no_report else args.report
    if args.replot:
        record, command = saved_record(args.out / "bench.json")
    else:
        record = measure(args)
        command = "t2r bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else "t2r bench"
    print_bars(write(record, args.out, report, command))


def saved_record(saved: Path) -> tuple[dict[str, Any], str]:
    """--replot: the record of an earlier run and its command."""
    if not saved.is_file():
        raise UsageError(f"--replot reads {saved}, which does not exist; run the bench first")
    try:
        record = json.loads(saved.read_text())
        return record, record["command"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise UsageError(f"--replot: {saved} is not a bench record ({error})") from None


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from t2r import hub
    from t2r.data.textfile import read_text
    from t2r.evaluation.bench.cases import BenchSettings
    from t2r.evaluation.bench.run import bench_prompt_ids, run_bench
    from t2r.modeling.model import T2RForCausalLM

    text = read_text(args.data) if args.data is not None else None
    model, tokenizer = hub.load_model(args.model)
    if not isinstance(model, T2RForCausalLM):
        raise UsageError(f"{args.model} is not a converted model; run `t2r convert` first")
    spec = args.teacher or model.config.base_model
    if spec is None:
        raise UsageError("--teacher is needed: this model records no base model")
    gguf = str(args.gguf) if args.gguf else None
    if gguf is None and hub.resolve(spec).kind == "gguf":
        gguf = hub.resolve(spec).name
    settings = BenchSettings(
        contexts=tuple(sorted(set(args.contexts))),
        batches=tuple(sorted(set(args.batches))),
        steps=args.steps,
        repeats=args.repeats,
        segment=args.segment,
        weights=args.weights,
        compile=not args.no_compile,
        reference_step=not args.no_reference_step,
        baseline=args.baseline,
        global_cache=args.global_cache,
    )
    prompt_ids = bench_prompt_ids(tokenizer, text, max(settings.contexts))
    teacher_context = model.teacher_context
    del model  # each context loads the model afresh in a child process (see run_bench)
    folder = Path(args.model).expanduser()  # a converted folder: load_model took it as one
    log = lambda line: print(line, file=sys.stderr)  # noqa: E731
    return run_bench(folder, spec, prompt_ids, settings, teacher_context, gguf, log=log)


def print_bars(rows: list[dict]) -> None:
    for row in rows:
        value = "-" if row["value"] is None else f"{row['value']:.2f}"
        met = {True: "met", False: "NOT met", None: "not measured"}[row["met"]]
        sign = "<=" if row["at_most"] else ">="
        print(f"{row['bar']:<42} {value:>7}  ({sign} {row['target']}: {met}) {row['note']}")
