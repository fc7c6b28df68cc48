"""Where a training step's time goes: one step of each stage of the default `t2r train`, under
torch.profiler (CPU), its parts labelled from outside the library.

    python scripts/train_profile.py [--step 1] [--out benchmarks/train_profile.json]

Runs `t2r train` (default model, built-in corpus, 4 x 512 tokens a step) for step+2 steps of each
stage and profiles step `--step` of each (step 0 pays one-time set-up). The parts, each a
`record_function` range wrapped around a library call by this script: data (the step's batch),
teacher forward, student forward + loss (the objective's forward: for fine-tuning it holds the
LM head + KL of each chunk), LM head + KL (each chunk's loss; its gradient is made right after it,
inside the same range), backward (recomputation of checkpointed layers included, where a run
recomputes them), gradient clipping, optimizer. A range's time includes the ranges inside it. Also the
top operators by self time. Writes the JSON and the "train-profile" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

import t2r.training.objectives as objectives  # noqa: E402
import t2r.training.trainer as trainer_module  # noqa: E402
from t2r.cli import main as t2r_main  # noqa: E402
from t2r.evaluation.markdown import replace_section  # noqa: E402

PARTS = (
    "data", "teacher forward", "student forward + loss", "LM head + KL", "backward (recomputation included)",
    "gradient clipping", "optimizer",
)  # fmt: skip
COMPILED = "compiled chunked attention (inductor's kernels)"


def labelled(label: str, function):
    def wrapper(*args, **kwargs):
        with record_function(label):
            return function(*args, **kwargs)

    return wrapper


@contextmanager
def labels(trainer, objective, optimizer):
    """Wrap the library's calls of one step in record_function ranges; undone after."""
    saved = []

    def wrap(owner, name: str, label: str) -> None:
        original = getattr(owner, name)
        saved.append((owner, name, original, name in vars(owner)))
        setattr(owner, name, labelled(label, original))

    wrap(trainer, "batch", "data")
    wrap(trainer.teacher, "forward", "teacher forward")
    wrap(trainer.teacher.base_model, "forward", "teacher forward")
    wrap(objective, "forward", "student forward + loss")
    wrap(trainer.accelerator, "backward", "backward (recomputation included)")
    wrap(trainer.accelerator, "clip_grad_norm_", "gradient clipping")
    wrap(optimizer, "step", "optimizer")
    wrap(objectives.Finetune, "_chunk_losses", "LM head + KL")
    try:
        yield
    finally:
        for owner, name, original, own in reversed(saved):
            if own:
                setattr(owner, name, original)
            else:
                delattr(owner, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--step", type=int, default=1, help="the step of each stage to profile")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "train_profile.json")
    options = parser.parse_args()
    stages: dict[str, dict] = {}
    original = trainer_module.Trainer.train_step

    def profiled(self, stage, step, objective, optimizer):
        if step != options.step:
            return original(self, stage, step, objective, optimizer)
        with labels(self, objective, optimizer), profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            record = original(self, stage, step, objective, optimizer)
            seconds = time.perf_counter() - start
        events = prof.key_averages()
        parts = {e.key: e.cpu_time_total / 1e6 for e in events if e.key in PARTS}
        operators: dict[str, float] = {}
        for event in events:
            if event.key not in PARTS:  # inductor's graphs, one key per hash: one line for all of them
                name = COMPILED if event.key.startswith("## Call CompiledFxGraph") else event.key
                operators[name] = operators.get(name, 0.0) + event.self_cpu_time_total / 1e6
        top = sorted(operators.items(), key=lambda item: item[1], reverse=True)
        stages[stage] = {
            "seconds": seconds,
            "parts_seconds": {name: parts.get(name, 0.0) for name in PARTS},
            "top_operators_self_seconds": dict(top[:12]),
        }
        print(f"{stage} step {step}: {seconds:.2f} s", file=sys.stderr, flush=True)
        return record

    trainer_module.Trainer.train_step = profiled
    steps = str(options.step + 2)
    with tempfile.TemporaryDirectory() as scratch:
        code = t2r_main(["train", "--out", str(Path(scratch) / "run"), "--transfer-steps", steps,
                         "--finetune-steps", steps, "--eval-blocks", "1", "--checkpoint-every", "1000000"])  # fmt: skip
    if code != 0:
        raise SystemExit(code)
    result = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": f"python scripts/train_profile.py --step {options.step}",
        "torch_threads": torch.get_num_threads(),
        "stages": stages,
    }
    options.out.write_text(json.dumps(result, indent=2) + "\n")
    replace_section(ROOT / "BENCHMARKS.md", "train-profile", report(result), "Where a training step's time goes")
    print(report(result))


def report(result: dict) -> str:
    stages = result["stages"]
    lines = [
        f"`{result['command']}` ({result['date']}, {result['torch_threads']} threads): one step of each stage of the "
        "default `t2r train` (4 x 512 tokens), torch.profiler on the CPU. A part's time includes the parts "
        "inside it (fine-tuning's LM head + KL, its gradient included, runs inside the student's forward + "
        "loss; backward recomputes layers only where a run recomputes them).",
        "",
        "| part | " + " | ".join(f"{stage}, s" for stage in stages) + " |",
        "|---|" + "---|" * len(stages),
        "| the whole step | " + " | ".join(f"{entry['seconds']:.2f}" for entry in stages.values()) + " |",
    ]
    for part in PARTS:
        lines.append(f"| {part} | " + " | ".join(f"{e['parts_seconds'][part]:.2f}" for e in stages.values()) + " |")
    for stage, entry in stages.items():
        ops = ", ".join(f"{name} {seconds:.2f}" for name, seconds in entry["top_operators_self_seconds"].items())
        lines += ["", f"Top operators of the {stage} step (self seconds): {ops}."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
