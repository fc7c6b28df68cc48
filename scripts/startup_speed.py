"""How long a user waits at the start: `t2r --help`, and the first decoded token of a second
`t2r generate --compile --weights int4` process, old code (a git worktree at --base) against the
working tree, interleaved in one run.

    python scripts/startup_speed.py --base 88f306f [--model t2r-smollm2-135m] [--help-runs 5] [--runs 3]

Each side runs from its own source tree with the same virtual environment and the same cache
folder ($T2R_CACHE_DIR), so each finds its own compiled step and the working tree its kept decode
weights. A first `generate` per side (not timed) compiles its step and keeps what it keeps; then
the timed runs alternate sides (A B A B ...). The first-token time is the one `t2r generate`
prints on its speed line (seconds from the process's start, psutil's create_time); `--help` is
timed around the whole process. Writes benchmarks/startup.json, benchmarks/startup.png and the
"startup" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from t2r.evaluation.markdown import replace_section  # noqa: E402

OUT = ROOT / "benchmarks"
FIRST_TOKEN = re.compile(r"first decoded token ([0-9.]+) s after the process started")


def command(tree: Path, *args: str) -> tuple[list[str], dict[str, str]]:
    """`python -m t2r ARGS` running the t2r package of `tree` (its folder first on the path)."""
    env = {**os.environ, "PYTHONPATH": str(tree), "TQDM_DISABLE": "1"}
    return [sys.executable, "-m", "t2r", *args], env


def help_seconds(tree: Path) -> float:
    argv, env = command(tree, "--help")
    start = time.perf_counter()
    subprocess.run(argv, env=env, check=True, capture_output=True, cwd=tree)
    return time.perf_counter() - start


def first_token_seconds(tree: Path, model: str) -> float:
    argv, env = command(
        tree, "generate", model, "--prompt", "The history of", "--greedy", "--max-new-tokens", "8",
        "--compile", "--weights", "int4",
    )  # fmt: skip
    result = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=tree)
    if result.returncode != 0:
        raise SystemExit(f"t2r generate failed in {tree}:\n{result.stderr[-3000:]}")
    found = FIRST_TOKEN.search(result.stderr)
    if found is None:
        raise SystemExit(f"no first-token time on the speed line of {tree}:\n{result.stderr[-1000:]}")
    return float(found.group(1))


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def interleaved(trees: dict[str, Path], measure, runs: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {side: [] for side in trees}
    for round_index in range(runs):
        for side, tree in trees.items():
            times[side].append(measure(tree))
            print(f"  round {round_index + 1}: {side} {times[side][-1]:.2f} s", file=sys.stderr, flush=True)
    return times


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for axis, (key, title) in zip(axes, (("help", "`t2r --help`"), ("first_token", "second process: first token")),
                                  strict=True):  # fmt: skip
        sides = ["old", "new"]
        medians = [result[key][side]["median"] for side in sides]
        lows = [m - result[key][side]["min"] for m, side in zip(medians, sides, strict=True)]
        highs = [result[key][side]["max"] - m for m, side in zip(medians, sides, strict=True)]
        axis.bar(sides, medians, yerr=[lows, highs], color=["#999999", "#1f77b4"], capsize=4)
        axis.set_title(title)
        axis.set_ylabel("seconds (median, min-max)")
    figure.suptitle(f"base {result['base']} vs working tree, {result['date']}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def report(result: dict) -> str:
    lines = [
        f"`python scripts/startup_speed.py --base {result['base']}` ({result['date']}, {result['machine']}; "
        f"runs interleaved old/new; `--help` timed around the process, {result['help_runs']} runs a side; "
        f"the first decoded token as `t2r generate` prints it, {result['runs']} runs a side after one "
        "untimed run that compiled each side's step).",
        "",
        "| measure | old (base) median (min-max) | new median (min-max) | new / old |",
        "|---|---|---|---|",
    ]
    for key, name in (("help", "`t2r --help`, s"), ("first_token", f"first decoded token, `{result['command']}`, s")):
        old, new = result[key]["old"], result[key]["new"]
        lines.append(
            f"| {name} | {old['median']:.2f} ({old['min']:.2f}-{old['max']:.2f}) | "
            f"{new['median']:.2f} ({new['min']:.2f}-{new['max']:.2f}) | {new['median'] / old['median']:.2f} |"
        )
    lines += ["", "![startup](benchmarks/startup.png)"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the old code's commit")
    parser.add_argument("--model", default="t2r-smollm2-135m", help="a converted model (alias or folder)")
    parser.add_argument("--help-runs", type=int, default=5)
    parser.add_argument("--runs", type=int, default=3)
    options = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        old_tree = Path(scratch) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", str(old_tree), options.base], cwd=ROOT, check=True,
                       capture_output=True)  # fmt: skip
        try:
            trees = {"old": old_tree, "new": ROOT}
            for side, tree in trees.items():  # compile and keep, untimed
                print(f"warm-up ({side}): compiling the step if it is not kept yet", file=sys.stderr, flush=True)
                first_token_seconds(tree, options.model)
            print("t2r --help", file=sys.stderr, flush=True)
            helps = interleaved(trees, help_seconds, options.help_runs)
            print("second process: first decoded token", file=sys.stderr, flush=True)
            tokens = interleaved(trees, lambda tree: first_token_seconds(tree, options.model), options.runs)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(old_tree)], cwd=ROOT, capture_output=True)

    result = {
        "base": options.base,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{os.cpu_count()} cores, {platform.machine()}",
        "command": f"t2r generate {options.model} --compile --weights int4",
        "help_runs": options.help_runs,
        "runs": options.runs,
        "help": {side: summary(values) for side, values in helps.items()},
        "first_token": {side: summary(values) for side, values in tokens.items()},
    }
    OUT.mkdir(exist_ok=True)
    (OUT / "startup.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, OUT / "startup.png")
    replace_section(ROOT / "BENCHMARKS.md", "startup", report(result), "Second process: start-up and first token")
    print(report(result))


if __name__ == "__main__":
    main()
