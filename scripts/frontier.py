"""The frontier: quality per state byte, each converted model beside the window of its bytes.

    python scripts/frontier.py                      # every row not yet measured, in order
    python scripts/frontier.py --rows w112-f32      # these rows only
    python scripts/frontier.py --commit             # git-commit benchmarks/frontier.json after each measurement

Each row is a configuration at a state budget. Its model is trained by `t2r train` (the flags below;
resumed from its checkpoints when a run was cut off, skipped when the model exists; `ready` is the
shipped model, not trained), then measured by `t2r eval --teacher --baseline`, which scores the
training-free window of equal state bytes (the teacher over 4 sinks + the last W tokens) in the same
run:
- `novels`: the first 20,000 tokens of three novels no recipe trains on (Dracula pg345, Moby Dick
  pg2701, The Picture of Dorian Gray pg174), windows of 512: the text every choice is made on;
- `wikitext`: the first 40,000 tokens of wikitext2/test.txt, windows of 512: reported, never chosen on;
- `long`: Dracula then Moby Dick as one stream of 8,192 tokens (the teacher's context) through the
  state, perplexity over positions 2k-8k.
Every measurement is written to benchmarks/frontier.json as it completes (a cut-off run resumes
where it stopped), then benchmarks/frontier.png and BENCHMARKS.md's frontier section are rewritten.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from recipe import COMMON_FLAGS, RECIPES, state_bytes, window_heavy

from t2r.evaluation.markdown import replace_section

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "frontier.json"
NOVELS = ("pg345.txt", "pg2701.txt", "pg174.txt")  # in no recipe's training data: choices are made here
LONG_STREAM = ("pg345.txt", "pg2701.txt")
MEASUREMENTS = ("novels", "wikitext", "long")

ROWS: dict[str, dict] = {
    # The shipped model (issue 14's hybrid-kv: window 64, 2 x 32 Hedgehog features, LoRA 8).
    "ready": {"model": "t2r-smollm2-135m"},
    # ~6.1 MB: 4 sinks + 112 slots + a linear state of 2 x 16 features per kv head (the bytes of 16
    # slots) = the bytes of the 128-slot window that beats the shipped model today.
    "w112-f32": {"flags": RECIPES["window-heavy"]["flags"]},
    # ~3 MB: 4 sinks + 44 slots + the same linear state = the bytes of a 61-slot window.
    "w44-f32": {"flags": window_heavy(44, 16, 200, 60)},
    # ~12 MB: 4 sinks + 240 slots + the same linear state = the bytes of a 256-slot window.
    "w240-f32": {"flags": window_heavy(240, 16, 200, 60)},
    # ~1.5 MB: 4 sinks + 12 slots + the same linear state = the bytes of a 28-slot window.
    "w12-f32": {"flags": window_heavy(12, 16, 200, 60)},
}


def t2r(*args: str) -> str:
    print("$ t2r " + " ".join(args), file=sys.stderr, flush=True)
    return subprocess.run([sys.executable, "-m", "t2r", *args], check=True, stdout=subprocess.PIPE, text=True).stdout


def load_results() -> dict:
    return json.loads(RESULTS.read_text()) if RESULTS.exists() else {"rows": {}}


def save_results(results: dict, commit: bool, message: str) -> None:
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    if commit:
        subprocess.run(["git", "-C", str(ROOT), "add", str(RESULTS)], check=True)
        subprocess.run(["git", "-C", str(ROOT), "commit", "-q", "-m", f"frontier: {message}"], check=False)


def trained_model(name: str, row: dict) -> tuple[str, dict | None]:
    """The row's model (trained here unless it exists) and its training record."""
    if "model" in row:
        return row["model"], None
    run = ROOT / "runs" / "frontier" / name / "train"
    model = run / "model"
    if not (model / "config.json").exists():
        flags = ["--model", "smollm2-135m", *COMMON_FLAGS, *row["flags"], "--out", str(run)]
        flags += ["--data", str(SHARED / "books" / "pg1342.txt")]
        flags += ["--distill-data", str(SHARED / "wikitext2" / "valid.txt")]
        if (run / "checkpoints").exists():
            flags.append("--resume")
        started = time.time()
        t2r("train", *flags)
        (run.parent / "train_wall.json").write_text(json.dumps({"minutes": (time.time() - started) / 60}))
    summary = json.loads((run / "summary.json").read_text())
    wall = run.parent / "train_wall.json"  # absent for a run trained before this script
    # flags after --lora-rank 0 override COMMON_FLAGS' --lora-rank 8 (argparse keeps the last)
    return str(model), {"command": "t2r train " + " ".join([*COMMON_FLAGS, *row["flags"]]),
                        "tokens": summary["tokens"], "loop_minutes": summary["minutes"],
                        "wall_minutes": json.loads(wall.read_text())["minutes"] if wall.exists() else None}  # fmt: skip


def scored(record: dict, teacher_ppl: float) -> dict:
    """perplexity ratio, KL and agreement of one `t2r eval --json` record (model or its baseline)."""
    return {"perplexity": record["perplexity"], "ratio": record["perplexity"] / teacher_ppl,
            "kl": record["kl"], "top1_agreement": record["top1_agreement"]}  # fmt: skip


def measure(name: str, model: str, results: dict) -> dict:
    """Every measurement of one row that is not in `results` yet, saved one by one by the caller."""
    row = results["rows"][name]
    teachers = results.setdefault("teacher", {})
    if "novels" not in row:
        novels = {}
        for novel in NOVELS:
            scoring = ["--data", str(SHARED / "books" / novel), "--max-tokens", "20000", "--seq-len", "512", "--json"]
            if novel not in teachers:
                teachers[novel] = json.loads(t2r("eval", "smollm2-135m", *scoring))["perplexity"]
            record = json.loads(t2r("eval", model, *scoring, "--teacher", "--baseline"))
            novels[novel] = {"converted": scored(record, teachers[novel]),
                             "window": scored(record["baseline"], teachers[novel])}  # fmt: skip
            row["window"] = {"sinks": record["baseline"]["sinks"], "slots": record["baseline"]["window"],
                             "state_bytes": record["baseline"]["state_bytes"]}  # fmt: skip
        row["novels"] = novels
        yield "novels"
    if "wikitext" not in row:
        scoring = ["--data", str(SHARED / "wikitext2" / "test.txt"), "--max-tokens", "40000", "--seq-len", "512"]
        if "wikitext" not in teachers:
            teachers["wikitext"] = json.loads(t2r("eval", "smollm2-135m", *scoring, "--json"))["perplexity"]
        record = json.loads(t2r("eval", model, *scoring, "--json", "--teacher", "--baseline"))
        row["wikitext"] = {"converted": scored(record, teachers["wikitext"]),
                           "window": scored(record["baseline"], teachers["wikitext"])}  # fmt: skip
        yield "wikitext"
    if "long" not in row:
        stream = [arg for novel in LONG_STREAM for arg in ("--data", str(SHARED / "books" / novel))]
        record = json.loads(t2r("eval", model, *stream, "--long", "--max-tokens", "8192", "--buckets", "2048",
                                "--teacher", "--baseline", "--json"))  # fmt: skip

        def bucket(buckets: list[dict]) -> dict:
            late = next(b for b in buckets if b["begin"] >= 2047)
            return {"perplexity": late["perplexity"], "ratio": late["perplexity"] / late["teacher_perplexity"],
                    "kl": late["kl"], "top1_agreement": late["top1_agreement"]}  # fmt: skip

        row["long"] = {"converted": bucket(record["buckets"]), "window": bucket(record["baseline"]["buckets"])}
        yield "long"


def mean_figure(row: dict, measure_name: str, side: str, key: str) -> float | None:
    """One figure of a row's measurement (the mean over the novels), for "converted" or "window"."""
    if measure_name not in row:
        return None
    figures = list(row[measure_name].values()) if measure_name == "novels" else [row[measure_name]]
    return sum(f[side][key] for f in figures) / len(figures)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["rows"].values() if "novels" in r]
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    panels = (("novels", "held-out novels (mean)"), ("wikitext", "WikiText-2"))
    for axis, (measure_name, title) in zip(axes, panels, strict=True):
        for side, marker in (("converted", "o"), ("window", "s")):
            points = sorted(
                ((r["state_bytes"] if side == "converted" else r["window"]["state_bytes"]) / 1e6, ratio)
                for r in rows
                if (ratio := mean_figure(r, measure_name, side, "ratio")) is not None
            )
            label = "converted" if side == "converted" else "window of equal bytes (no training)"
            axis.plot([p[0] for p in points], [p[1] for p in points], marker=marker, label=label)
        axis.set_xlabel("state per sequence (MB)")
        axis.set_ylabel("perplexity / teacher's")
        axis.set_title(title)
        axis.grid(alpha=0.3)
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def table(results: dict) -> str:
    lines = [
        "Made by `python scripts/frontier.py` (benchmarks/frontier.json, frontier.png). Each row: a converted "
        "model and, measured in the same `t2r eval --teacher --baseline` run, the training-free window of "
        "equal state bytes (4 sinks + W slots). Ratio = perplexity / the teacher's; agreement = top-1 with "
        "the teacher. Novels: first 20,000 tokens of Dracula, Moby Dick, Dorian Gray (held out: choices are "
        "made here), mean of the three; WikiText-2: first 40,000 tokens of test.txt (reported only); long: "
        "Dracula + Moby Dick as one 8,192-token stream, positions 2k-8k.",
        "",
        "| row | state MB | window slots | novels ratio (model / window) | novels agreement | WikiText-2 ratio | "
        "WikiText-2 agreement | long 2k-8k ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results["rows"].items():
        if "novels" not in r:
            continue

        def pair(measure_name: str, key: str, r: dict = r) -> str:
            mine, window = (mean_figure(r, measure_name, side, key) for side in ("converted", "window"))
            return "-" if mine is None else f"{mine:.3f} / {window:.3f}"

        lines.append(
            f"| {name} | {r['state_bytes'] / 1e6:.2f} | {r['window']['slots']} | {pair('novels', 'ratio')} | "
            f"{pair('novels', 'top1_agreement')} | {pair('wikitext', 'ratio')} | "
            f"{pair('wikitext', 'top1_agreement')} | {pair('long', 'ratio')} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated row names (default: all)")
    parser.add_argument("--commit", action="store_true", help="git-commit benchmarks/frontier.json after each step")
    args = parser.parse_args()
    results = load_results()
    for name in args.rows.split(","):
        if name not in ROWS:
            raise SystemExit(f"no row {name!r}; rows: {', '.join(ROWS)}")
        model, training = trained_model(name, ROWS[name])
        row = results["rows"].setdefault(name, {})
        row.update({"model": model, "state_bytes": state_bytes(Path(model))})
        if training is not None:
            row["training"] = training
        for done in measure(name, model, results):
            save_results(results, args.commit, f"{name} {done}")
        plot(results, ROOT / "benchmarks" / "frontier.png")
        replace_section(ROOT / "BENCHMARKS.md", "frontier", table(results), "Quality per state byte: the frontier")
        save_results(results, args.commit, f"{name} done")


if __name__ == "__main__":
    main()
