"""Peak memory of `t2r train` on the default recipe: before (the code at --before, a commit
before the memory work: whole [batch, seq, vocab] logits in the loss and in validation, the student
with its own copy of every weight), after (this checkout's defaults: chunked losses, shared frozen
tensors, each layer recomputed in backward, validation one block at a time), this checkout with the
old loss and no sharing, and this checkout keeping every layer's activations (no recomputation).

    python scripts/train_memory.py [--model smollm2-135m] [--before c6be34b] [--steps 3] [--rounds 1]
    python scripts/train_memory.py --model qwen2.5-coder-0.5b --before-model PATH.gguf \\
        --setting before --setting after

(the commit before knows no alias of the extra teachers: --before-model gives it the same GGUF file
by path).
Each setting runs `t2r train` in a child process of its own (peak RSS = the child's ru_maxrss) on
the default recipe's shape (batch 4 x 512 tokens, the window-64 hybrid, LoRA-8), --steps steps of
each stage, the settings alternating for --rounds rounds; "before" runs from a git worktree of
--before with this checkout's virtual environment. Writes benchmarks/train_memory.json and the
BENCHMARKS.md section "train-memory" (another model: train_memory_MODEL.json, "train-memory-MODEL").
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from t2r.evaluation.markdown import replace_section  # noqa: E402

SETTINGS = {
    "before": [],  # run from the --before worktree
    "after": [],
    "after, old loss, no sharing": ["--loss-chunk", "0", "--no-share-weights"],
    "after, layers kept for backward": ["--no-checkpoint-layers"],
    # Every memory feature of this checkout off: the old setting, reachable without the old commit.
    "after, every memory feature off": ["--loss-chunk", "0", "--no-share-weights", "--no-checkpoint-layers"],
}
CHILD = (
    "import json, resource, sys, time, t2r; from t2r.cli import main; started = time.perf_counter(); "
    "code = main(sys.argv[1:]); "
    "print('T2R_PEAK ' + json.dumps({'exit': code, 'peak_bytes': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss"
    " * 1024, 'seconds': time.perf_counter() - started, 't2r': t2r.__file__}))"
)


def run(setting: str, args: argparse.Namespace, folder: Path, code: Path) -> dict:
    out = folder / f"run-{len(list(folder.iterdir()))}"
    model = args.before_model if setting == "before" and args.before_model else args.model
    command = [sys.executable, "-c", CHILD, "train", "--model", model, "--out", str(out),
               "--transfer-steps", str(args.steps), "--finetune-steps", str(args.steps), "--eval-blocks", "2",
               *(["--teacher", args.teacher] if args.teacher else []), *SETTINGS[setting]]  # fmt: skip
    environment = {**os.environ, "PYTHONPATH": str(code)}
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        # The child volunteers first for the kernel's out-of-memory killer (a setting that needs more
        # than the machine has is killed, not whatever else runs here); os.wait4 gives the child's own
        # peak RSS even when it was killed, which subprocess.run would lose.
        child = subprocess.Popen(command, stdout=stdout, stderr=stderr, text=True, cwd=code, env=environment,
                                 preexec_fn=volunteer_for_oom_killer)  # fmt: skip
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        stdout.seek(0), stderr.seek(0)
        output, errors = stdout.read(), stderr.read()
    if child.returncode == -signal.SIGKILL:  # what the kernel's out-of-memory killer sends
        signal_name = signal.Signals.SIGKILL.name
        result = {"exit": None, "killed": signal_name, "peak_bytes": usage.ru_maxrss * 1024, "finetune_losses": []}
        print(setting, json.dumps(result), errors[-600:], file=sys.stderr, flush=True)
        return result
    lines = [line for line in output.splitlines() if line.startswith("T2R_PEAK ")]
    if child.returncode or not lines:
        raise SystemExit(f"{setting}: t2r train failed:\n{errors[-3000:]}")
    result = json.loads(lines[-1].removeprefix("T2R_PEAK "))
    if result["exit"] != 0:
        raise SystemExit(f"{setting}: t2r train exited with {result['exit']}:\n{errors[-3000:]}")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    result["finetune_losses"] = [m["loss"] for m in metrics if m.get("stage") == "finetune" and "loss" in m]
    print(setting, json.dumps(result), file=sys.stderr, flush=True)
    return result


def total_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def volunteer_for_oom_killer() -> None:
    """In the child before exec: the highest out-of-memory score (any process may raise its own)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/oom_score_adj").write_text("1000")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--teacher")
    parser.add_argument("--before", default="c6be34b", help="the commit whose t2r train is 'before'")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--before-model", help="the model as the --before commit names it (default: --model)")
    parser.add_argument(
        "--setting", action="append", dest="settings", help="repeatable (default: all), of: " + "; ".join(SETTINGS)
    )
    parser.add_argument("--out", type=Path, help="default: benchmarks/train_memory[_MODEL].json")
    args = parser.parse_args()
    settings = args.settings or list(SETTINGS)
    if unknown := [name for name in settings if name not in SETTINGS] or not {"before", "after"} <= set(settings):
        parser.error(f"--setting: {unknown or 'before and after are needed'}; known: {'; '.join(SETTINGS)}")
    default_model = args.model == "smollm2-135m"
    args.out = args.out or ROOT / "benchmarks" / f"train_memory{'' if default_model else '_' + args.model}.json"
    results: dict[str, list[dict]] = {name: [] for name in settings}
    with tempfile.TemporaryDirectory() as folder:
        before = Path(folder) / "before-code"
        subprocess.run(["git", "worktree", "add", "--detach", str(before), args.before], cwd=ROOT, check=True)
        runs = Path(folder) / "runs"
        runs.mkdir()
        try:
            for _ in range(args.rounds):
                for setting in settings:
                    results[setting].append(run(setting, args, runs, before if setting == "before" else ROOT))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(before)], cwd=ROOT, check=False)
    peak = {name: max(r["peak_bytes"] for r in rows) for name, rows in results.items()}
    # A setting killed for memory peaked at more than its RSS when killed: its figure is a floor.
    killed = {name for name, rows in results.items() if any(r.get("killed") for r in rows)}
    record = {"model": args.model, "before_model": args.before_model or args.model, "before": args.before,
              "settings": settings, "steps": args.steps, "rounds": args.rounds,
              "runs": results, "peak_bytes": peak, "killed": sorted(killed),
              "ratio": peak["after"] / peak["before"], "ratio_is_upper_bound": "before" in killed}  # fmt: skip
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    losses = {name: rows[0]["finetune_losses"] for name, rows in results.items()}
    memory = total_memory_bytes()

    def peak_cell(name: str) -> str:
        if name not in killed:
            return f"{peak[name] / 2**30:.2f} GiB"
        why = f"killed by {results[name][0]['killed']}: out of {memory / 2**30:.0f} GiB"
        return f"> {peak[name] / 2**30:.2f} GiB ({why})"

    ratio = f"{'< ' if record['ratio_is_upper_bound'] else ''}{record['ratio']:.2f}"
    body = "\n".join([
        f"`python scripts/train_memory.py --model {args.model} --steps {args.steps} --rounds {args.rounds}"
        f"{' --before-model ' + args.before_model if args.before_model else ''}"
        f"{'' if settings == list(SETTINGS) else ''.join(f' --setting {name!r}' for name in settings)}` — "
        "`t2r train` on the default recipe's shape (batch 4 x 512, window-64 hybrid, LoRA-8), "
        f"{args.steps} steps of each stage, each setting in its own child process; peak RSS (the child's "
        f"ru_maxrss, from os.wait4); this machine has {memory / 2**30:.1f} GiB.",
        "",
        "| setting | peak RSS | fine-tuning losses |",
        "|---|---:|---|",
        *(f"| {name} (`{' '.join(SETTINGS[name]) or ('commit ' + args.before if name == 'before' else 'defaults')}`) "
          f"| {peak_cell(name)} | "
          f"{', '.join(f'{x:.4f}' for x in losses[name]) or '-'} |" for name in settings),
        "",
        f"- **after / before: {ratio}** (bar <= 0.60: {'met' if record['ratio'] <= 0.6 else 'not met'}).",
    ])  # fmt: skip
    if default_model:
        replace_section(ROOT / "BENCHMARKS.md", "train-memory", body, "Training memory: chunked losses, shared weights")
    else:
        replace_section(ROOT / "BENCHMARKS.md", f"train-memory-{args.model}", body, f"Training memory: {args.model}")
    print(json.dumps(record["peak_bytes"]), record["ratio"])


if __name__ == "__main__":
    main()
