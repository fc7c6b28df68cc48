"""Beyond the teacher's window: a held-out novel read as one 32k-token stream, perplexity per position.

    python scripts/long_context.py --model runs/recipe-hybrid/train/model

Runs `t2r eval MODEL --long --teacher` on the first 32,768 tokens of novels the recipes never
train on (Dracula, then Moby Dick if more text is needed), in segments of 1,024 through the
recurrent state. The teacher (SmolLM2, 8,192-token context) runs where it can: the buckets 0-2k and
2k-8k. Writes benchmarks/long_context.{json,png} and the long-context section of BENCHMARKS.md,
including the bar's ratio: perplexity on tokens 16k-32k over perplexity on tokens 0-8k.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

from t2r.evaluation.markdown import replace_section

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
HELD_OUT = ["pg345.txt", "pg2701.txt"]  # Dracula, Moby Dick: in no recipe's training data


def t2r(*args: str) -> str:
    print("$ t2r " + " ".join(args), file=sys.stderr, flush=True)
    return subprocess.run([sys.executable, "-m", "t2r", *args], check=True, stdout=subprocess.PIPE, text=True).stdout


def pooled_perplexity(buckets: list[dict], begin: int, end: int, key: str = "perplexity") -> float | None:
    """Perplexity over the buckets inside [begin, end), pooled by token count."""
    chosen = [b for b in buckets if b["begin"] >= begin - 1 and b["end"] <= end and key in b]
    tokens = sum(b["tokens"] for b in chosen)
    if not chosen or tokens == 0:
        return None
    return math.exp(sum(math.log(b[key]) * b["tokens"] for b in chosen) / tokens)


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    buckets = record["buckets"]
    labels = [f"{b['begin'] // 1024}k-{b['end'] // 1024}k" for b in buckets]
    positions = range(len(buckets))
    figure, axis = plt.subplots(figsize=(6.4, 3.6))
    axis.bar([p - 0.2 for p in positions], [b["perplexity"] for b in buckets], 0.4, label="converted (recurrent)")
    teacher = [(p, b["teacher_perplexity"]) for p, b in enumerate(buckets) if "teacher_perplexity" in b]
    context = record.get("teacher_context") or 0
    label = f"teacher (softmax, {context // 1024}k context)"
    axis.bar([p + 0.2 for p, _ in teacher], [v for _, v in teacher], 0.4, label=label)
    axis.set_xticks(list(positions), labels)
    axis.set_xlabel("token positions in the stream")
    axis.set_ylabel("perplexity")
    axis.set_title("One 32k-token stream of held-out novels")
    highest = max([b["perplexity"] for b in buckets] + [v for _, v in teacher])
    axis.set_ylim(0, highest * 1.3)  # room for the legend above the bars
    axis.legend(loc="upper center", ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "runs" / "recipe-hybrid" / "train" / "model"))
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--replot", action="store_true", help="redraw the plot from benchmarks/long_context.json")
    args = parser.parse_args()
    if args.replot:
        plot(
            json.loads((ROOT / "benchmarks" / "long_context.json").read_text()),
            ROOT / "benchmarks" / "long_context.png",
        )
        return
    data = []
    for name in HELD_OUT:
        data += ["--data", str(SHARED / "books" / name)]
    flags = ["--long", "--max-tokens", str(args.tokens), "--segment", "1024", "--teacher", "smollm2-135m", "--json"]
    record = json.loads(t2r("eval", args.model, *data, *flags))
    buckets = record["buckets"]
    early, late = pooled_perplexity(buckets, 0, 8192), pooled_perplexity(buckets, 16384, args.tokens)
    record["perplexity_0_8k"] = early
    record["perplexity_16k_32k"] = late
    record["late_over_early"] = late / early if early and late else None
    record["teacher_perplexity_0_8k"] = pooled_perplexity(buckets, 0, 8192, "teacher_perplexity")
    record["command"] = f"python scripts/long_context.py --model {args.model}"
    out = ROOT / "benchmarks"
    out.mkdir(exist_ok=True)
    (out / "long_context.json").write_text(json.dumps(record, indent=2))
    plot(record, out / "long_context.png")
    write_section(record)
    print(json.dumps({k: record[k] for k in ("perplexity_0_8k", "perplexity_16k_32k", "late_over_early")}))


def write_section(record: dict) -> None:
    def figure(value: float | None, digits: int = 2) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    lines = [
        "| positions | tokens | converted perplexity | teacher perplexity | KL | top-1 agreement |",
        "|---|---|---|---|---|---|",
    ]
    for b in record["buckets"]:
        lines.append(
            f"| {b['begin']:,}-{b['end']:,} | {b['tokens']:,} | {b['perplexity']:.2f} | "
            f"{figure(b.get('teacher_perplexity'))} | {figure(b.get('kl'), 3)} | {figure(b.get('top1_agreement'), 3)} |"
        )
    lines += [
        "",
        f"Perplexity on tokens 16k-32k / on tokens 0-8k: {figure(record['perplexity_16k_32k'])} / "
        f"{figure(record['perplexity_0_8k'])} = **{figure(record['late_over_early'], 3)}** (bar: <= 1.10).",
        f"State: {record['state_bytes_first']:,} bytes after the first segment and {record['state_bytes_last']:,} "
        f"after the last ({record['tokens']:,} tokens, segments of {record['segment']}); the teacher ran on the "
        f"first {record['teacher_context']:,} tokens, its context.",
        f"Command: `{record['command']}`.",
        "![perplexity by position](benchmarks/long_context.png)",
    ]
    replace_section(
        ROOT / "BENCHMARKS.md", "long-context", "\n".join(lines), "Beyond the teacher's window: one 32k-token stream"
    )


if __name__ == "__main__":
    main()
