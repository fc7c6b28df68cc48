"""Training speed of `t2r train`, old code (a git worktree at --base) against the working tree,
interleaved in one run: tokens per second of each stage and how far their losses drift apart.

    python scripts/train_speed.py --base 88f306f [--steps 10] [--rounds 2] [--out benchmarks/train_speed.json]

Each round runs `t2r train` on the default model and the built-in corpus (the same seed, so the
same batches) once from each side's source tree (A B, A B, ...; one process at a time), with
`--transfer-steps N --finetune-steps N --eval-blocks 1` and no checkpoint before the end. A step's
time is the difference between consecutive `seconds` of metrics.jsonl, within a stage; each stage's
first step (its set-up) is left out. tokens/s of a side is the median over its timed steps of every
round (min-max beside it); the loss difference is the largest |old - new| over the first N steps
of the first round, per stage. Writes the JSON (the shape issue 30 asks for: {"stages": {"transfer":
{"old": {"tokens_per_s": ...}, "new": {...}, "max_loss_difference": ...}, "finetune": {...}}, ...})
and the "train-speed" section of BENCHMARKS.md; `--report-only` renders that section from the JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from t2r.evaluation.markdown import replace_section  # noqa: E402

STAGES = ("transfer", "finetune")
BATCH, SEQ_LEN = 4, 512  # the default recipe's batch: 4 blocks of 512 tokens a step


def run(tree: Path, out: Path, steps: int) -> list[dict]:
    """One `t2r train` from `tree`'s sources into `out`; its metrics.jsonl records."""
    env = {**os.environ, "PYTHONPATH": str(tree), "TQDM_DISABLE": "1"}
    argv = [
        sys.executable, "-m", "t2r", "train", "--out", str(out), "--transfer-steps", str(steps),
        "--finetune-steps", str(steps), "--eval-blocks", "1", "--checkpoint-every", "1000000",
        "--batch-size", str(BATCH), "--seq-len", str(SEQ_LEN),
    ]  # fmt: skip
    result = subprocess.run(argv, env=env, cwd=tree, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"t2r train failed in {tree}:\n{result.stderr[-3000:]}")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def step_seconds(records: list[dict], stage: str) -> list[float]:
    """Seconds of each step of `stage` after its first."""
    steps = [r for r in records if r.get("stage") == stage and "loss" in r]
    return [later["seconds"] - earlier["seconds"] for earlier, later in itertools.pairwise(steps)]


def losses(records: list[dict], stage: str) -> list[float]:
    return [r["loss"] for r in records if r.get("stage") == stage and "loss" in r]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the old code's commit")
    parser.add_argument("--steps", type=int, default=10, help="steps of each stage in a run")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each side, interleaved")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "train_speed.json")
    parser.add_argument("--report-only", action="store_true", help="render BENCHMARKS.md from --out, run nothing")
    options = parser.parse_args()
    if options.report_only:
        write_report(json.loads(options.out.read_text()))
        return

    seconds: dict[str, dict[str, list[float]]] = {side: {s: [] for s in STAGES} for side in ("old", "new")}
    first_losses: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        old_tree = Path(scratch) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", str(old_tree), options.base], cwd=ROOT, check=True,
                       capture_output=True)  # fmt: skip
        try:
            for round_index in range(options.rounds):
                for side, tree in (("old", old_tree), ("new", ROOT)):
                    records = run(tree, Path(scratch) / f"{side}-{round_index}", options.steps)
                    for stage in STAGES:
                        seconds[side][stage] += step_seconds(records, stage)
                    if round_index == 0:
                        first_losses[side] = {stage: losses(records, stage) for stage in STAGES}
                    rates = {s: BATCH * SEQ_LEN / statistics.median(step_seconds(records, s)) for s in STAGES}
                    shown = ", ".join(f"{s} {r:.0f} tok/s" for s, r in rates.items())
                    print(f"round {round_index + 1} {side}: {shown}", file=sys.stderr, flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(old_tree)], cwd=ROOT, capture_output=True)

    stages = {}
    for stage in STAGES:
        entry = {}
        for side in ("old", "new"):
            rates = [BATCH * SEQ_LEN / s for s in seconds[side][stage]]
            entry[side] = {
                "tokens_per_s": statistics.median(rates), "tokens_per_s_min": min(rates),
                "tokens_per_s_max": max(rates), "step_seconds": seconds[side][stage],
            }  # fmt: skip
        old, new = first_losses["old"][stage], first_losses["new"][stage]
        entry["max_loss_difference"] = max(abs(a - b) for a, b in zip(old, new, strict=True))
        entry["speedup"] = entry["new"]["tokens_per_s"] / entry["old"]["tokens_per_s"]
        entry["losses"] = {"old": old, "new": new}
        stages[stage] = entry
    result = {
        "base": options.base,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{os.cpu_count()} cores, {platform.machine()}",
        "command": f"python scripts/train_speed.py --base {options.base} --steps {options.steps} "
        f"--rounds {options.rounds}",
        "new_commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip(),
        "tokens_per_step": BATCH * SEQ_LEN,
        "stages": stages,
    }
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(json.dumps(result, indent=2) + "\n")
    write_report(result)


def write_report(result: dict) -> None:
    lines = [
        f"`{result['command']}` ({result['date']}, {result['machine']}; working tree at "
        f"{result.get('new_commit', 'its commit')}): `t2r train` of the default model on the built-in corpus, "
        f"{result['tokens_per_step']:,} tokens a step, old code and new alternating; tokens/s are medians over "
        "each side's steps after the first of each stage (min-max).",
        "",
        "| stage | old tokens/s | new tokens/s | new / old | largest loss difference, first steps |",
        "|---|---|---|---|---|",
    ]
    for stage, entry in result["stages"].items():
        old, new = entry["old"], entry["new"]
        lines.append(
            f"| {stage} | {old['tokens_per_s']:.0f} ({old['tokens_per_s_min']:.0f}-{old['tokens_per_s_max']:.0f}) | "
            f"{new['tokens_per_s']:.0f} ({new['tokens_per_s_min']:.0f}-{new['tokens_per_s_max']:.0f}) | "
            f"{entry['speedup']:.2f} | {entry['max_loss_difference']:.2e} |"
        )
    replace_section(ROOT / "BENCHMARKS.md", "train-speed", "\n".join(lines), "Training speed: old code against new")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
