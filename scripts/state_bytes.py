"""Where the bytes go: state bytes per sequence against quality, for the sliding-window baseline at
several windows and for converted models.

    python scripts/state_bytes.py --windows 64,128,192

Each window W is `t2r convert --feature-map none --window W` (4 sinks, no training), scored by
`t2r eval` on the first 40,000 tokens of wikitext2/test.txt in windows of 512 (with the teacher:
KL, agreement) and along one 32,768-token stream of Dracula then Moby Dick (`--long`, 2k-8k ratio
to the teacher). The converted model and its equal-memory baseline come from
scripts/equal_memory.py's summaries (the same evals), when they exist. Every eval's JSON is kept in
benchmarks/state_bytes/ (a finished one is not rerun); writes a table and a plot
(benchmarks/state_bytes/state_bytes.png) into BENCHMARKS.md.
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
OUT = ROOT / "benchmarks" / "state_bytes"
HELD_OUT = ["pg345.txt", "pg2701.txt"]  # Dracula, Moby Dick: in no recipe's training data
TEACHER = "smollm2-135m"
WIKITEXT = ["--data", str(SHARED / "wikitext2" / "test.txt"), "--max-tokens", "40000", "--seq-len", "512"]
LONG = [arg for name in HELD_OUT for arg in ("--data", str(SHARED / "books" / name))]
LONG += ["--long", "--max-tokens", "32768", "--segment", "1024"]


def t2r(*args: str) -> str:
    print("$ t2r " + " ".join(args), file=sys.stderr, flush=True)
    return subprocess.run([sys.executable, "-m", "t2r", *args], check=True, stdout=subprocess.PIPE, text=True).stdout


def cached(name: str, args: list[str]) -> dict:
    """The JSON of `t2r eval ARGS --json`, kept in OUT/name.json."""
    path = OUT / f"{name}.json"
    if not path.exists():
        record = json.loads(t2r(*args, "--json"))
        record["command"] = "t2r " + " ".join(args)
        path.write_text(json.dumps(record, indent=1))
    return json.loads(path.read_text())


def pooled(buckets: list[dict], begin: int, end: int, key: str) -> float:
    chosen = [b for b in buckets if b["begin"] >= begin - 1 and b["end"] <= end and key in b]
    tokens = sum(b["tokens"] for b in chosen)
    return math.exp(sum(math.log(b[key]) * b["tokens"] for b in chosen) / tokens)


def row(label: str, kind: str, folder: Path, teacher_ppl: float) -> dict:
    """One model's bytes and figures."""
    name = folder.name
    wiki = cached(f"{name}-wikitext", ["eval", str(folder), *WIKITEXT, "--teacher"])
    long = cached(f"{name}-long", ["eval", str(folder), *LONG, "--teacher"])
    buckets = long["buckets"]
    return {
        "label": label,
        "kind": kind,
        "state_bytes": long["state_bytes_last"],
        "wikitext_ratio": wiki["perplexity"] / teacher_ppl,
        "kl": wiki["kl"],
        "top1_agreement": wiki["top1_agreement"],
        "long_2k_8k_ratio": pooled(buckets, 2048, 8192, "perplexity")
        / pooled(buckets, 2048, 8192, "teacher_perplexity"),
    }


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for axis, key, title in (
        (axes[0], "wikitext_ratio", "WikiText-2 perplexity / teacher's"),
        (axes[1], "long_2k_8k_ratio", "long stream, tokens 2k-8k: perplexity / teacher's"),
    ):
        baseline = sorted((r["state_bytes"] / 2**20, r[key]) for r in rows if r["kind"] == "baseline")
        if baseline:
            axis.plot(*zip(*baseline, strict=True), marker="o", label="sliding window + 4 sinks (no training)")
        for r in rows:
            if r["kind"] == "converted":
                axis.plot(r["state_bytes"] / 2**20, r[key], marker="*", markersize=12, linestyle="", label=r["label"])
        axis.set_xlabel("state per sequence, MiB")
        axis.set_title(title, fontsize=10)
        axis.axhline(1.0, color="grey", linestyle=":", linewidth=1)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", default="64,128,192", help="baseline windows, comma-separated")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    equal_teacher = ROOT / "benchmarks" / "equal_memory" / "teacher_wikitext.json"  # the same command
    teacher = json.loads(equal_teacher.read_text()) if equal_teacher.exists() else None
    teacher_ppl = (teacher or cached("teacher-wikitext", ["eval", TEACHER, *WIKITEXT]))["perplexity"]
    rows = []
    for window in (int(w) for w in args.windows.split(",")):
        folder = ROOT / "runs" / f"baseline-{window}"
        if not (folder / "config.json").exists():
            t2r("convert", "--model", TEACHER, "--feature-map", "none", "--window", str(window), "--out", str(folder),
                "--overwrite")  # fmt: skip
        rows.append(row(f"window {window} + 4 sinks", "baseline", folder, teacher_ppl))
    for equal in sorted((ROOT / "benchmarks" / "equal_memory").glob("*/summary.json")):
        summary = json.loads(equal.read_text())
        config = json.loads((equal.parent / "wikitext.json").read_text())
        for name, kind in (("model", "converted"), ("baseline", "baseline")):
            figures = summary[name]
            label = f"window {figures['window']} + 4 sinks" if kind == "baseline" else f"converted: {config['model']}"
            keys = ("state_bytes", "wikitext_ratio", "kl", "top1_agreement", "long_2k_8k_ratio")
            rows.append({"label": label, "kind": kind, **{key: figures[key] for key in keys}})
    (OUT / "rows.json").write_text(json.dumps(rows, indent=1))
    plot(rows, OUT / "state_bytes.png")
    lines = [
        "| model | state per sequence, MiB | WikiText-2 x teacher | KL | top-1 agreement | long 2k-8k x teacher |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: r["state_bytes"]):
        lines.append(
            f"| {r['label']} | {r['state_bytes'] / 2**20:.2f} | {r['wikitext_ratio']:.3f} | {r['kl']:.3f} | "
            f"{r['top1_agreement']:.3f} | {r['long_2k_8k_ratio']:.3f} |"
        )
    command = f"python scripts/state_bytes.py --windows {args.windows}"
    lines += [
        "",
        f"Teacher: {teacher_ppl:.2f} on the same WikiText-2 tokens (first 40,000 of test, windows of 512). Long: "
        "one 32,768-token stream of Dracula then Moby Dick. Command: `" + command + "`.",
        "![bytes against quality](benchmarks/state_bytes/state_bytes.png)",
    ]
    replace_section(ROOT / "BENCHMARKS.md", "state-bytes", "\n".join(lines), "Where the bytes go")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
