"""The task modes of `t2r eval`: pass-key retrieval (`--passkey`) and chat fidelity (`--chat`).

Both put the same prompts to the converted model, its teacher (the reference) and, with
`--baseline`, the training-free sliding window of equal state bytes, and report per model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from t2r.cli.common import bounded_float, positive_int, token_counts
from t2r.errors import UsageError


def add_task_flags(parser: argparse.ArgumentParser) -> None:
    tasks = parser.add_argument_group("tasks (instead of perplexity)")
    tasks.add_argument(
        "--passkey",
        action="store_true",
        help="pass-key retrieval: a 5-digit key hidden in prose (--data, default: the built-in corpus), asked "
        "for at the end; greedy exact match and the key's rank among 100 candidates",
    )
    tasks.add_argument(
        "--lengths", type=token_counts, default=(256, 1000, 2000, 4000, 8000), help="--passkey: prompt lengths"
    )
    tasks.add_argument(
        "--depths",
        type=lambda text: tuple(bounded_float(0.0, 1.0, include_low=True)(part) for part in text.split(",")),
        default=(0.1, 0.5, 0.9),
        help="--passkey: where the key sits, as shares of the prose",
    )
    tasks.add_argument("--trials", type=positive_int, default=3, help="--passkey: keys per length and depth")
    tasks.add_argument(
        "--plot", type=Path, default=None, help="--passkey: write the heat maps to this PNG (default: no plot)"
    )
    tasks.add_argument(
        "--chat",
        action="store_true",
        help="chat fidelity: greedy answers to the committed instructions through the chat template, "
        "token by token against the teacher's",
    )
    tasks.add_argument(
        "--limit", type=positive_int, default=None, help="--chat: the first N instructions (default: all)"
    )
    tasks.add_argument("--max-new-tokens", type=positive_int, default=128, help="--chat: tokens per answer")


def named_models(model: Any, teacher: Any, baseline: Any) -> dict[str, Any]:
    """teacher (the reference), the model, and the baseline when asked for."""
    models = {"teacher": teacher, "model": model}
    if baseline is not None:
        models["baseline"] = baseline
    return models


def run_passkey(args: argparse.Namespace, model: Any, tokenizer: Any, teacher: Any, baseline: Any) -> None:
    from t2r.data.textfile import read_text
    from t2r.evaluation.passkey import context_limit, default_filler, plot_passkey, run_passkey

    filler = "\n\n".join(read_text(path) for path in args.data) if args.data else default_filler()
    models = named_models(model, teacher, baseline)
    result = run_passkey(
        models,
        tokenizer,
        filler,
        lengths=args.lengths,
        depths=args.depths,
        trials=args.trials,
        context_limits={name: context_limit(each) for name, each in models.items()},
    )
    record = {"model": args.model, "teacher": args.teacher_spec, **result.to_dict()}
    if hasattr(model, "init_state"):  # a converted model: what its state holds
        record["model_state_bytes"] = model.init_state(1).nbytes()
        record["global_cache"] = model.config.global_cache
    if baseline is not None:
        record["baseline"] = baseline_settings(baseline)
    if args.plot is not None:
        plot_passkey(record, args.plot)
    if args.json:
        print(json.dumps(record))
        return
    print(f"{'model':<10}{'length':>8}{'depth':>7}{'exact':>7}{'rank-1':>8}{'mean rank':>11}")
    for case in result.cases:
        summary = case.summary()
        if case.skipped is not None:
            print(f"{case.model:<10}{case.length:>8}{case.depth:>7.0%}  skipped: {case.skipped}")
            continue
        print(
            f"{case.model:<10}{case.length:>8}{case.depth:>7.0%}{summary['exact']:>7.2f}{summary['rank1']:>8.2f}"
            f"{summary['mean_rank']:>11.1f}"
        )


def run_chat(args: argparse.Namespace, model: Any, tokenizer: Any, teacher: Any, baseline: Any) -> None:
    from t2r.evaluation.chat import chat_fidelity, scores_markdown

    result = chat_fidelity(
        named_models(model, teacher, baseline), tokenizer, max_new_tokens=args.max_new_tokens, limit=args.limit
    )
    record = {"model": args.model, "teacher": args.teacher_spec, **result.to_dict()}
    if baseline is not None:
        record["baseline"] = baseline_settings(baseline)
    if args.json:
        print(json.dumps(record))
        return
    print(scores_markdown(result))


def baseline_settings(baseline: Any) -> dict[str, Any]:
    """What the baseline is: its window, sinks and state bytes per sequence."""
    return {
        "window": baseline.config.window,
        "sinks": baseline.config.sinks,
        "state_bytes": baseline.init_state(1).nbytes(),
    }


def check_task_flags(args: argparse.Namespace) -> None:
    """One task at a time, and the data the windows need."""
    chosen = [flag for flag, on in (("--passkey", args.passkey), ("--chat", args.chat), ("--long", args.long)) if on]
    if len(chosen) > 1:
        raise UsageError(f"{' and '.join(chosen)}: choose one task per run")
    if not (args.passkey or args.chat) and not args.data:
        raise UsageError("--data is required to score perplexity (name a text file)")
