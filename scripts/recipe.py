"""The conversion recipe: `t2r train` on the default model, then scored against the teacher.

    python scripts/recipe.py --out runs/recipe

Pure linear attention (no softmax window). Data rule: next-token targets only ever come from the
novels and Shakespeare in ../shared/data; WikiText-2 valid is used only as the teacher's input
(attention transfer, KL to its logits); WikiText-2 test is never trained on. The score: the first
40,000 tokens of wikitext2/test.txt, windows of 512, by `t2r eval` for the teacher and the
converted model. Writes benchmarks/recipe.json and the recipe table of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from t2r.report import replace_section

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
BOOKS = ["pg1342.txt", "pg1661.txt", "pg98.txt"]

TRAIN_FLAGS = [
    "--model",
    "smollm2-135m",
    "--feature-map",
    "hedgehog",
    "--feature-dim",
    "64",
    "--untie-qk",
    "--transfer-steps",
    "350",
    "--finetune-steps",
    "70",
    "--batch-size",
    "4",
    "--seq-len",
    "512",
    "--lr-transfer",
    "1e-2",
    "--lr-finetune",
    "1e-3",
    "--ce-weight",
    "0",
    "--distill-weight",
    "1",
    "--lora-rank",
    "8",
    "--checkpoint-every",
    "50",
]


def t2r(*args: str) -> str:
    command = [sys.executable, "-m", "t2r", *args]
    print("$ t2r " + " ".join(args), file=sys.stderr, flush=True)
    return subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "recipe")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--skip-train", action="store_true", help="only score an existing run")
    args = parser.parse_args()
    data = [str(SHARED / "books" / name) for name in BOOKS] + [str(SHARED / "shakespeare" / "input.txt")]
    args.out.mkdir(parents=True, exist_ok=True)
    train_dir = args.out / "train"
    train_args = [*TRAIN_FLAGS, "--out", str(train_dir)]
    for path in data:
        train_args += ["--data", path]
    train_args += ["--distill-data", str(SHARED / "wikitext2" / "valid.txt")]
    if args.resume:
        train_args.append("--resume")
    if not args.skip_train:
        started = time.time()
        (args.out / "train_process.json").write_text(json.dumps({"started_unix": started}))
        t2r("train", *train_args)
    # Wall time of the whole `t2r train` command (model loading and tokenising included): from its
    # start, recorded above, to the moment its final summary was written.
    started = json.loads((args.out / "train_process.json").read_text())["started_unix"]
    wall_minutes = ((train_dir / "summary.json").stat().st_mtime - started) / 60
    test = str(SHARED / "wikitext2" / "test.txt")
    scoring = ["--data", test, "--max-tokens", "40000", "--seq-len", "512", "--json"]
    teacher = json.loads(t2r("eval", "smollm2-135m", *scoring))
    student = json.loads(t2r("eval", str(train_dir / "model"), *scoring, "--teacher"))
    summary = json.loads((train_dir / "summary.json").read_text())
    result = {
        "command": "t2r train " + " ".join(train_args),
        "teacher": teacher,
        "converted": student,
        "ratio": student["perplexity"] / teacher["perplexity"],
        "train_tokens": summary["tokens"],
        "train_minutes": wall_minutes,
        "train_loop_minutes": summary["minutes"],
    }
    (ROOT / "benchmarks").mkdir(exist_ok=True)
    (ROOT / "benchmarks" / "recipe.json").write_text(json.dumps(result, indent=2))
    write_table(result)
    print(json.dumps({k: result[k] for k in ("ratio", "train_tokens", "train_minutes")}))


def write_table(result: dict) -> None:
    teacher, student = result["teacher"], result["converted"]
    lines = [
        "| model | perplexity | x teacher | KL | top-1 agreement | training tokens | training minutes |",
        "|---|---|---|---|---|---|---|",
        f"| teacher (SmolLM2-135M, softmax) | {teacher['perplexity']:.2f} | 1.00 | - | - | - | - |",
        f"| converted (pure linear, Hedgehog) | {student['perplexity']:.2f} | {result['ratio']:.2f} | "
        f"{student['kl']:.3f} | {student['top1_agreement']:.3f} | {result['train_tokens']:,} | "
        f"{result['train_minutes']:.1f} |",
        "",
        f"Scored: first 40,000 tokens of wikitext2/test.txt, windows of 512 ({student['tokens']:,} tokens scored).",
        f"Command: `python scripts/recipe.py`, which ran `{result['command']}`.",
    ]
    replace_section(ROOT / "BENCHMARKS.md", "recipe", "\n".join(lines), "Conversion recipe: teacher vs converted")


if __name__ == "__main__":
    main()
