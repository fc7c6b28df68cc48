"""The T2R paper's comparison at one equal token budget: feature maps, with and without attention
transfer, and an RNN of the same shape trained from random weights.

    python scripts/compare_maps.py --out runs/compare

Rows (all pure linear attention, the default model SmolLM2-135M as teacher):
  (a) swap + fine-tune: swap the attention, then fine-tune (feature maps + LoRA-8) for the whole budget;
  (b) transfer + fine-tune: half the budget of attention transfer, then half of fine-tuning
      (for ELU+1 and RFA, whose maps have no parameters, transfer trains the attention projections,
      at learning rate 1e-4);
  (c) T2R from scratch: same architecture, random weights, all parameters trained for the budget.
Fine-tuning is next-token cross-entropy on three novels and Shakespeare (../shared/data); every row
sees the same number of tokens. Scored by `t2r eval` on the first 40,000 tokens of WikiText-2 test,
windows of 512, teacher first. Writes benchmarks/compare_maps.{json,png} and a BENCHMARKS.md table.

Resumable row by row, across sessions: each finished row's score is kept in
benchmarks/compare_maps/<steps>/row<i>.json (committed), and a run trains only the rows that have
none; `--rows N` stops after N new rows (a row of 100 steps takes 20-40 minutes here). The table
lists the rows done so far and names the ones still pending.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from t2r.evaluation.markdown import replace_section

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"

BOOKS = ["pg1342.txt", "pg1661.txt", "pg98.txt"]
MAPS = ["elu", "rfa", "t2r", "hedgehog"]


def t2r(*args: str) -> str:
    print("$ t2r " + " ".join(args), file=sys.stderr, flush=True)
    return subprocess.run([sys.executable, "-m", "t2r", *args], check=True, stdout=subprocess.PIPE, text=True).stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "compare")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps of 4 x 512 tokens per row")
    parser.add_argument("--eval-tokens", type=int, default=40000)
    parser.add_argument("--rows", type=int, default=None, help="train at most N new rows in this run")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    data = []
    for name in BOOKS:
        data += ["--data", str(SHARED / "books" / name)]
    data += ["--data", str(SHARED / "shakespeare" / "input.txt")]
    common = [
        "--window",
        "0",  # the paper's setting: pure linear attention, no softmax window
        "--batch-size",
        "4",
        "--seq-len",
        "512",
        "--ce-weight",
        "1",
        "--distill-weight",
        "0",
        "--lora-rank",
        "8",
        "--eval-blocks",
        "4",
        "--checkpoint-every",
        "25",  # a row cut off by the end of a session resumes from its last checkpoint
        *data,
    ]
    half = args.steps // 2
    runs = []
    for feature_map in MAPS:
        untie = ["--untie-qk"] if feature_map == "hedgehog" else []
        runs.append(
            (
                f"{feature_map}: swap + fine-tune",
                ["--feature-map", feature_map, *untie, "--transfer-steps", "0", "--finetune-steps", str(args.steps)],
            )
        )
        # Parameter-free maps transfer through the pretrained projections: a fine-tuning rate, not 1e-2.
        rate = ["--lr-transfer", "1e-4"] if feature_map in ("elu", "rfa") else []
        runs.append(
            (
                f"{feature_map}: transfer + fine-tune",
                [
                    "--feature-map",
                    feature_map,
                    *untie,
                    *rate,
                    "--transfer-steps",
                    str(half),
                    "--finetune-steps",
                    str(args.steps - half),
                ],
            )
        )
    runs.append(
        (
            "t2r: from scratch (random init)",
            ["--feature-map", "t2r", "--from-scratch", "--transfer-steps", "0", "--finetune-steps", str(args.steps)],
        )
    )

    scoring = [
        "--data",
        str(SHARED / "wikitext2" / "test.txt"),
        "--max-tokens",
        str(args.eval_tokens),
        "--seq-len",
        "512",
        "--json",
    ]
    kept = ROOT / "benchmarks" / "compare_maps" / f"{args.steps}-{args.eval_tokens}"
    kept.mkdir(parents=True, exist_ok=True)
    teacher_file = kept / "teacher.json"
    if not teacher_file.exists():
        teacher = {"name": "teacher (softmax attention)", **json.loads(t2r("eval", "smollm2-135m", *scoring))}
        teacher_file.write_text(json.dumps(teacher, indent=1))
    results = [json.loads(teacher_file.read_text())]
    pending, new_rows = [], 0
    for index, (name, flags) in enumerate(runs):
        row_file = kept / f"row{index}.json"
        if not row_file.exists() and (args.rows is None or new_rows < args.rows):
            run_dir = args.out / f"run{index}-{args.steps}"
            if not (run_dir / "model" / "config.json").is_file():
                t2r("train", "--out", str(run_dir), *common, *flags, *(["--resume"] if run_dir.exists() else []))
            summary = json.loads((run_dir / "summary.json").read_text())
            score = json.loads(t2r("eval", str(run_dir / "model"), *scoring, "--teacher", "smollm2-135m"))
            row = {"name": name, "flags": flags, "train_tokens": summary["tokens"], "train_minutes": summary["minutes"]}
            row_file.write_text(json.dumps({**row, **score}, indent=1))
            new_rows += 1
        if row_file.exists():
            results.append(json.loads(row_file.read_text()))
        else:
            pending.append(name)
    teacher_ppl = results[0]["perplexity"]
    for row in results:
        row["ratio"] = row["perplexity"] / teacher_ppl
    (ROOT / "benchmarks").mkdir(exist_ok=True)
    (ROOT / "benchmarks" / "compare_maps.json").write_text(json.dumps(results, indent=2))
    plot(results, ROOT / "benchmarks" / "compare_maps.png")
    budget = args.steps * 4 * 512
    lines = [
        "| model | perplexity | x teacher | KL | top-1 agreement | training minutes |",
        "|---|---|---|---|---|---|",
    ]
    for row in results:
        kl = f"{row['kl']:.3f}" if "kl" in row else "-"
        agree = f"{row['top1_agreement']:.3f}" if "top1_agreement" in row else "-"
        minutes = f"{row['train_minutes']:.1f}" if "train_minutes" in row else "-"
        lines.append(f"| {row['name']} | {row['perplexity']:.1f} | {row['ratio']:.2f} | {kl} | {agree} | {minutes} |")
    lines += [
        "",
        f"Budget: {budget:,} training tokens per row ({args.steps} steps of 4 x 512). Scored: first "
        f"{args.eval_tokens:,} tokens of wikitext2/test.txt, windows of 512 ({results[0]['tokens']:,} tokens).",
        f"Command: `python scripts/compare_maps.py --steps {args.steps} --eval-tokens {args.eval_tokens}`"
        f"{'' if not pending else ' (resumable: rows still pending: ' + '; '.join(pending) + ')'}.",
        "![perplexity by row](benchmarks/compare_maps.png)",
    ]
    replace_section(ROOT / "BENCHMARKS.md", "compare", "\n".join(lines), "The paper's comparison at equal budget")


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [row["name"] for row in results]
    ratios = [row["ratio"] for row in results]
    figure, axis = plt.subplots(figsize=(8, 4.5))
    axis.barh(names[::-1], ratios[::-1], color=["tab:gray" if r == 1 else "tab:blue" for r in ratios[::-1]])
    axis.set_xscale("log")
    axis.set_xlabel("WikiText-2 test perplexity / teacher's (log scale)")
    axis.set_title("Equal token budget: feature maps, transfer, and training from scratch")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
