"""Issue 33's search for the pure-linear recipe's hour: which distillation, and how much of the hour it gets.

    python scripts/linear_search.py                 every row not yet in benchmarks/linear_search.json
    python scripts/linear_search.py --rows 1        one more row, then stop

One attention transfer with the linear recipe's flags (scripts/recipe.py) for --transfer-steps, validated
every 50 steps: the transfer's curve of top-1 agreement. Then, from that model, each variant's
distillation of --distill-steps, validated halfway (its curve), and scored against the teacher on
the first --tokens of the first half of Dorian Gray (pg174): text no recipe trains on, and not the text
any figure is reported on (WikiText-2 test and the recipe's two held-out novels are never looked at here).
The two curves give each stage's gain in agreement per second of the hour; the scores choose the variant.
Each row is written to benchmarks/linear_search.json as it finishes: a cut run resumes at the next row.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from compare_maps import held_out_halves, score, t2r
from recipe import COMMON_FLAGS, RECIPES, SHARED

from t2r.evaluation.markdown import replace_section

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "linear_search.json"
# Distillation variants, each from the same transferred model with the same steps and data. LoRA rank 8 at
# 1e-3 is the earlier recipe's; rank 32 gives the adapters four times the room; --full trains every weight (at a
# tenth of the rate: 1e-3 on all 135M weights would walk far from the teacher in a few steps).
VARIANTS = {
    "lora8 lr1e-3 (the earlier recipe's)": ["--lora-rank", "8", "--lr-finetune", "1e-3"],
    "full lr1e-4": ["--full", "--lr-finetune", "1e-4"],
    "lora32 lr1e-3": ["--lora-rank", "32", "--lr-finetune", "1e-3"],
}
# Flags of the linear recipe that make the conversion (dropped when training an already converted model),
# and those that set the steps or the distillation, which this search varies (always dropped): how many
# values each takes.
CONVERSION = {"--feature-map": 1, "--feature-dim": 1, "--untie-qk": 0, "--window": 1}
VARIED = {"--transfer-steps": 1, "--finetune-steps": 1, "--lr-finetune": 1, "--lora-rank": 1, "--full": 0,
          "--checkpoint-every": 1}  # fmt: skip


def recipe_flags(drop_conversion: bool) -> list[str]:
    """The linear recipe's flags without those VARIED here (and without its conversion flags if asked)."""
    flags, out, skip = [*COMMON_FLAGS, *RECIPES["linear"]["flags"]], [], 0
    dropped = {**VARIED, **(CONVERSION if drop_conversion else {})}
    for flag in flags:
        if skip:
            skip -= 1
            continue
        if flag in dropped:
            skip = dropped[flag]
            continue
        out.append(flag)
    data = [item for name in RECIPES["linear"]["books"] for item in ("--data", str(SHARED / "books" / name))]
    data += ["--data", str(SHARED / "shakespeare" / "input.txt")]
    data += ["--distill-data", str(SHARED / "wikitext2" / "valid.txt")]
    return [*out, *data]


def train(out: Path, flags: list[str]) -> float:
    """`t2r train` into `out` (resumed from its checkpoints if it has any); seconds of its training loop."""
    if not (out / "summary.json").is_file():
        resume = ["--resume"] if (out / "manifest.json").is_file() else []
        if out.exists() and not resume:
            shutil.rmtree(out)  # died before its first checkpoint: start again
        t2r("train", "--out", str(out), "--checkpoint-every", "25", *flags, *resume)
    return json.loads((out / "summary.json").read_text())["minutes"] * 60


def curve(run: Path) -> list[dict]:
    """The run's validations: stage, steps done, top-1 agreement and KL to the teacher."""
    points = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "validation" in record:
            points[(record["stage"], record["step"])] = {
                "stage": record["stage"], "steps": record["step"] + 1,
                "top1": record["validation"]["top1_agreement"], "kl": record["validation"]["kl"],
            }  # fmt: skip
    return sorted(points.values(), key=lambda point: point["steps"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "linear-search")
    parser.add_argument("--transfer-steps", type=int, default=200)
    parser.add_argument("--distill-steps", type=int, default=50)
    parser.add_argument("--tokens", type=int, default=8192, help="tokens of the first half of Dorian Gray scored")
    parser.add_argument("--rows", type=int, default=None, help="stop after this many new rows")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    choose_text, _ = held_out_halves(args.out)
    result = json.loads(RESULT.read_text()) if RESULT.exists() else {"rows": {}}
    result.update(transfer_steps=args.transfer_steps, distill_steps=args.distill_steps, tokens=args.tokens,
                  text="first half of Dorian Gray (pg174)")  # fmt: skip
    done = 0
    if "teacher" not in result:
        result["teacher"] = score("smollm2-135m", choose_text, args.tokens, teacher=False)
        RESULT.write_text(json.dumps(result, indent=1))
    transfer = args.out / "transfer"
    if "transfer" not in result:
        steps = ["--transfer-steps", str(args.transfer_steps), "--finetune-steps", "0", "--eval-every", "50"]
        seconds = train(transfer, [*recipe_flags(False), "--lora-rank", "8", *steps])
        result["transfer"] = {"seconds": seconds, "curve": curve(transfer),
                              "held_out": score(str(transfer / "model"), choose_text, args.tokens)}  # fmt: skip
        RESULT.write_text(json.dumps(result, indent=1))
        done += 1
    for name, flags in VARIANTS.items():
        if name in result["rows"] or (args.rows is not None and done >= args.rows):
            continue
        run = args.out / ("distill-" + "-".join(flag.strip("-") for flag in flags))
        steps = ["--transfer-steps", "0", "--finetune-steps", str(args.distill_steps), "--eval-every", "25"]
        started = time.time()
        seconds = train(run, ["--model", str(transfer / "model"), *recipe_flags(True), *flags, *steps])
        result["rows"][name] = {"flags": flags, "seconds": seconds, "curve": curve(run),
                                "held_out": score(str(run / "model"), choose_text, args.tokens),
                                "wall_seconds": time.time() - started}  # fmt: skip
        RESULT.write_text(json.dumps(result, indent=1))
        shutil.rmtree(run)  # hundreds of MB; its figures are kept
        done += 1
    report(result)


def report(result: dict) -> None:
    """The search's table in BENCHMARKS.md: each row's held-out score beside the teacher's, minutes, curves."""
    teacher = result["teacher"]["perplexity"]
    lines = [
        f"| stage from the same transfer | minutes | {result['text']}: x teacher | top-1 | KL | "
        "validation top-1 by step |",
        "|---|---|---|---|---|---|",
    ]
    rows = {}
    if "transfer" in result:
        rows[f"transfer only, {result['transfer_steps']} steps"] = result["transfer"]
    rows.update(
        {f"+ distillation {result['distill_steps']} steps, {name}": row for name, row in result["rows"].items()}
    )
    for name, row in rows.items():
        held_out = row["held_out"]
        curve = ", ".join(f"{point['steps']}: {point['top1']:.3f}" for point in row["curve"])
        lines.append(f"| {name} | {row['seconds'] / 60:.1f} | {held_out['perplexity'] / teacher:.3f} | "
                     f"{held_out['top1_agreement']:.3f} | {held_out['kl']:.3f} | {curve} |")  # fmt: skip
    lines += [
        "",
        f"Held out: the first {result['tokens']:,} tokens of the {result['text']}, windows of 512; teacher "
        f"perplexity {teacher:.2f}. Validation: the run's held-out blocks of its training mix. Minutes: the "
        "stage's `t2r train` loop, validations included. Command: `python scripts/linear_search.py`.",
    ]
    replace_section(ROOT / "BENCHMARKS.md", "linear-search", "\n".join(lines), "Searching the pure-linear hour")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
