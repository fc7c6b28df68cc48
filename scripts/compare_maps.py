"""The T2R paper's comparison (Kasai et al. 2021, Table 1's protocol) at a budget that can decide
its ordering: feature maps swapped in and fine-tuned, with and without attention transfer, and the
same RNN trained from random weights, beside the teacher.

    python scripts/compare_maps.py                 # every row not yet done (hours: resumable)
    python scripts/compare_maps.py --rows 1        # at most one new row, then the table so far

Rows (pure linear attention, `--window 0`; the default model SmolLM2-135M as teacher):
  swap + fine-tune      the map swapped in, then next-token fine-tuning (maps + LoRA-8) for every step;
  transfer + fine-tune  half the steps of attention transfer (lr 1e-2 for the learned maps; ELU+1 and
                        RFA have no parameters and transfer through the projections at lr 1e-4), then
                        half of fine-tuning;
  from scratch          the T2R architecture from random weights, every parameter trained;
  hybrid                the best two maps by held-out perplexity, again with a 64-token softmax window.
Fine-tuning: next-token cross-entropy on three novels and Shakespeare (../shared/data), the same
data, steps and scoring for every row.

Fair to every map: before its run, each row's fine-tuning rate is chosen from three values
(SWEEP_RATES; from scratch: SCRATCH_RATES) by a short run of --sweep-steps steps each, scored on
held-out text (the first --heldout-tokens of the first half of Dorian Gray, pg174, which no recipe
trains on), never on WikiText-2 test. The hybrid rows take their linear row's rate.

Each row validates every --steps/8 steps on held-out blocks of its training text (`t2r train
--eval-every`): the loss curve of the plot. A row is *converged* when its held-out loss improved by
less than 2% over the last quarter of its steps.

Scored: WikiText-2 test (first --eval-tokens, windows of 512) and the held-out novel (the first
--heldout-tokens of its second half: not the text rates were chosen on), teacher first, by
`t2r eval --teacher` (perplexity, KL, top-1).

Resumable across sessions: every sweep point and every finished row is kept under
benchmarks/compare_maps/<key>/ (committed as it finishes); a run does only what is missing, and a
row cut off mid-training resumes from its last checkpoint when its run folder is still there.
Writes benchmarks/compare_maps.{json,png} and the BENCHMARKS.md table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from t2r.evaluation.markdown import replace_section

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
BOOKS = ["pg1342.txt", "pg1661.txt", "pg98.txt"]
HELD_OUT = SHARED / "books" / "pg174.txt"  # Dorian Gray: in no training mix here
MAPS = ["elu", "rfa", "t2r", "hedgehog"]
SWEEP_RATES = (1e-4, 3e-4, 1e-3)  # fine-tuning rates tried per converted row
SCRATCH_RATES = (3e-4, 1e-3, 3e-3)  # random weights want larger steps
CONVERGED = 0.02  # relative improvement of the held-out loss over the last quarter of the steps
BLOCK_TOKENS = 4 * 512  # a step: 4 sequences of 512


@dataclass
class Row:
    name: str
    flags: list[str]  # the map and the stage split, without step counts or rates
    protocol: str  # "swap", "transfer" or "scratch"
    rates: tuple[float, ...] = SWEEP_RATES
    hybrid_of: int | None = None  # the linear row whose chosen rate a hybrid row takes
    extra: list[str] = field(default_factory=list)


def base_rows() -> list[Row]:
    rows = []
    for feature_map in MAPS:
        untie = ["--untie-qk"] if feature_map == "hedgehog" else []
        rows.append(Row(f"{feature_map}: swap + fine-tune", ["--feature-map", feature_map, *untie], "swap"))
        rate = ["--lr-transfer", "1e-4"] if feature_map in ("elu", "rfa") else []
        rows.append(
            Row(f"{feature_map}: transfer + fine-tune", ["--feature-map", feature_map, *untie, *rate], "transfer")
        )
    rows.append(
        Row("t2r: from scratch (random init)", ["--feature-map", "t2r", "--from-scratch"], "scratch", SCRATCH_RATES)
    )
    return rows


def stage_steps(row: Row, steps: int) -> list[str]:
    transfer = steps // 2 if row.protocol == "transfer" else 0
    return ["--transfer-steps", str(transfer), "--finetune-steps", str(steps - transfer)]


def t2r(*args: str) -> str:
    print("$ t2r " + " ".join(args), file=sys.stderr, flush=True)
    return subprocess.run([sys.executable, "-m", "t2r", *args], check=True, stdout=subprocess.PIPE, text=True).stdout


def common_flags() -> list[str]:
    data = [item for name in BOOKS for item in ("--data", str(SHARED / "books" / name))]
    return ["--window", "0", "--batch-size", "4", "--seq-len", "512", "--ce-weight", "1", "--distill-weight", "0",
            "--lora-rank", "8", "--eval-blocks", "4", "--checkpoint-every", "20", "--keep", "1",
            *data, "--data", str(SHARED / "shakespeare" / "input.txt")]  # fmt: skip


def train(out: Path, row: Row, steps: int, rate: float, eval_every: int = 0) -> dict:
    """`t2r train` of one row (resumed where `out` holds its checkpoints); its summary."""
    if not (out / "model" / "config.json").is_file():
        flags = [*common_flags(), *row.flags, *row.extra, *stage_steps(row, steps), "--lr-finetune", f"{rate:g}"]
        if eval_every:
            flags += ["--eval-every", str(eval_every)]
        resume = ["--resume"] if (out / "manifest.json").is_file() else []
        if out.exists() and not resume:
            shutil.rmtree(out)  # a run that died before its first checkpoint: start it again
        t2r("train", "--out", str(out), *flags, *resume)
    return json.loads((out / "summary.json").read_text())


def held_out_halves(out: Path) -> tuple[Path, Path]:
    """Dorian Gray cut in two at its middle line: the first half chooses rates, the second scores
    (a text chosen on is not the text reported)."""
    lines = HELD_OUT.read_text(encoding="utf-8").splitlines(keepends=True)
    halves = (out / "pg174-first-half.txt", out / "pg174-second-half.txt")
    for path, part in zip(halves, (lines[: len(lines) // 2], lines[len(lines) // 2 :]), strict=True):
        path.write_text("".join(part), encoding="utf-8")
    return halves


def score(model: str, text: Path, tokens: int, teacher: bool = True) -> dict:
    flags = ["--data", str(text), "--max-tokens", str(tokens), "--seq-len", "512", "--json"]
    return json.loads(t2r("eval", model, *flags, *(["--teacher", "smollm2-135m"] if teacher else [])))


def held_out_curve(run: Path, transfer_steps: int) -> list[dict]:
    """The run's validations in order of training: step (over both stages), tokens, loss (nll)."""
    points: dict[tuple[str, int], dict] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "validation" in record:  # a resumed stage may log its last validation twice: one per step
            offset = transfer_steps if record["stage"] == "finetune" else 0
            step = record["step"] + 1 + offset
            points[(record["stage"], record["step"])] = {
                "step": step, "tokens": step * BLOCK_TOKENS, "loss": record["validation"]["nll"]
            }  # fmt: skip
    return sorted(points.values(), key=lambda point: point["step"])


def convergence(curve: list[dict]) -> tuple[bool, float]:
    """(converged, relative improvement of the loss over the last quarter of the steps)."""
    last = curve[-1]
    quarter = [point for point in curve if point["step"] <= 0.75 * last["step"]]
    before = quarter[-1] if quarter else curve[0]
    improvement = (before["loss"] - last["loss"]) / before["loss"]
    return improvement < CONVERGED, improvement


def sweep(row: Row, index: int, args: argparse.Namespace, kept: Path) -> float:
    """The row's fine-tuning rate: the one of three whose short run scores best on held-out text."""
    path = kept / f"row{index}-sweep.json"
    points = json.loads(path.read_text()) if path.exists() else {}
    for rate in row.rates:
        if f"{rate:g}" in points:
            continue
        run = args.out / f"sweep{index}-{rate:g}"
        train(run, row, args.sweep_steps, rate)
        points[f"{rate:g}"] = score(str(run / "model"), args.choose_text, args.heldout_tokens, teacher=False)[
            "perplexity"
        ]
        path.write_text(json.dumps(points, indent=1))
        shutil.rmtree(run)  # hundreds of MB a run; its score is kept
    return float(min(points, key=points.get))


def run_row(row: Row, index: int, args: argparse.Namespace, kept: Path, rows: dict[int, dict]) -> dict:
    if row.hybrid_of is not None:
        rate, swept = rows[row.hybrid_of]["lr_finetune"], None
    else:
        rate = sweep(row, index, args, kept)
        swept = json.loads((kept / f"row{index}-sweep.json").read_text())
    run = args.out / f"run{index}-{args.steps}"
    summary = train(run, row, args.steps, rate, eval_every=max(1, args.steps // 8))
    transfer = int(stage_steps(row, args.steps)[1])
    curve = held_out_curve(run, transfer)
    converged, improvement = convergence(curve)
    model = str(run / "model")
    return {"name": row.name, "flags": [*row.flags, *row.extra, *stage_steps(row, args.steps)], "lr_finetune": rate,
            "sweep": swept, "train_tokens": summary["tokens"], "train_minutes": summary["minutes"],
            "curve": curve, "converged": converged, "improvement_last_quarter": improvement,
            "wikitext2": score(model, SHARED / "wikitext2" / "test.txt", args.eval_tokens),
            "held_out": score(model, args.report_text, args.heldout_tokens)}  # fmt: skip


def hybrid_rows(base: list[Row], done: dict[int, dict]) -> list[Row]:
    """The best two maps (by held-out novel perplexity, each at its better protocol) with a
    64-token softmax window; known once every converted row is done."""
    converted = [i for i, row in enumerate(base) if row.protocol != "scratch"]
    if not all(i in done for i in converted):
        return []
    best: dict[str, int] = {}
    for i in sorted(converted, key=lambda i: done[i]["held_out"]["perplexity"]):
        best.setdefault(base[i].flags[1], i)
    chosen = sorted(best.values(), key=lambda i: done[i]["held_out"]["perplexity"])[:2]
    rows = []
    for i in chosen:
        flags = [flag for flag in base[i].flags]
        rows.append(Row(f"{base[i].name}, window 64", flags, base[i].protocol, hybrid_of=i,
                        extra=["--window", "64", "--sinks", "4"]))  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "compare")
    parser.add_argument("--steps", type=int, default=80, help="optimizer steps of 4 x 512 tokens per row")
    parser.add_argument("--sweep-steps", type=int, default=16, help="steps of each rate's trial run")
    parser.add_argument("--eval-tokens", type=int, default=40000, help="WikiText-2 test tokens scored")
    parser.add_argument("--heldout-tokens", type=int, default=8192, help="held-out novel tokens (sweep; scoring)")
    parser.add_argument("--rows", type=int, default=None, help="finish at most N new rows in this run")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.choose_text, args.report_text = held_out_halves(args.out)
    key = f"{args.steps}-{args.sweep_steps}-{args.eval_tokens}-{args.heldout_tokens}"
    kept = ROOT / "benchmarks" / "compare_maps" / key
    kept.mkdir(parents=True, exist_ok=True)
    teacher_file = kept / "teacher.json"
    if not teacher_file.exists():
        wikitext = score("smollm2-135m", SHARED / "wikitext2" / "test.txt", args.eval_tokens, teacher=False)
        novel = score("smollm2-135m", args.report_text, args.heldout_tokens, teacher=False)
        teacher = {"name": "teacher (softmax attention)", "wikitext2": wikitext, "held_out": novel}
        teacher_file.write_text(json.dumps(teacher, indent=1))
    base = base_rows()
    done = {i: json.loads((kept / f"row{i}.json").read_text()) for i in range(len(base) + 2)
            if (kept / f"row{i}.json").exists()}  # fmt: skip
    new = 0
    while args.rows is None or new < args.rows:
        rows = base + hybrid_rows(base, done)
        todo = [i for i in range(len(rows)) if i not in done]
        if not todo:
            break
        index = todo[0]
        done[index] = run_row(rows[index], index, args, kept, done)
        (kept / f"row{index}.json").write_text(json.dumps(done[index], indent=1))
        new += 1
    rows = base + hybrid_rows(base, done)
    report(json.loads(teacher_file.read_text()), [done.get(i) for i in range(len(rows))], rows, args)


def report(teacher: dict, results: list[dict | None], rows: list[Row], args: argparse.Namespace) -> None:
    finished = [row for row in results if row is not None]
    pending = [rows[i].name for i, row in enumerate(results) if row is None]
    (ROOT / "benchmarks" / "compare_maps.json").write_text(json.dumps({"teacher": teacher, "rows": finished}, indent=1))
    plot(finished, teacher, ROOT / "benchmarks" / "compare_maps.png")
    wiki, novel = teacher["wikitext2"]["perplexity"], teacher["held_out"]["perplexity"]
    lines = [
        "| model | lr (of 3) | WikiText-2 ppl | x teacher | KL | top-1 | held-out novel ppl | x teacher | converged "
        "(last-quarter gain) | minutes |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| {teacher['name']} | - | {wiki:.1f} | 1.00 | - | - | {novel:.1f} | 1.00 | - | - |",
    ]
    for row in finished:
        w, h = row["wikitext2"], row["held_out"]
        state = "yes" if row["converged"] else "**no**"
        lines.append(
            f"| {row['name']} | {row['lr_finetune']:g} | {w['perplexity']:.1f} | {w['perplexity'] / wiki:.2f} | "
            f"{w['kl']:.3f} | {w['top1_agreement']:.3f} | {h['perplexity']:.1f} | {h['perplexity'] / novel:.2f} | "
            f"{state} ({row['improvement_last_quarter']:.1%}) | {row['train_minutes']:.0f} |"
        )
    lines += ["", *orderings(results, rows, wiki, novel)]
    tokens = finished[0]["train_tokens"] if finished else args.steps * BLOCK_TOKENS
    sweeps = "; ".join(
        f"{row['name']}: " + ", ".join(f"{rate} → {ppl:.0f}" for rate, ppl in row["sweep"].items())
        for row in finished
        if row.get("sweep")
    )
    lines += [
        "",
        f"Budget: {tokens:,} training tokens per row ({args.steps} steps of 4 x 512). Scored: the first "
        f"{args.eval_tokens:,} tokens of wikitext2/test.txt and the first {args.heldout_tokens:,} tokens of the "
        f"second half of Dorian Gray (pg174), windows of 512.",
        f"Rate sweep ({args.sweep_steps} steps each; perplexity on the first {args.heldout_tokens:,} tokens of "
        f"the first half of Dorian Gray): {sweeps or 'none yet'}.",
        f"Command: `python scripts/compare_maps.py --steps {args.steps} --sweep-steps {args.sweep_steps} "
        f"--eval-tokens {args.eval_tokens} --heldout-tokens {args.heldout_tokens}`"
        f"{'' if not pending else ' (resumable; rows still pending: ' + '; '.join(pending) + ')'}.",
        "![held-out loss curves and perplexity by row](benchmarks/compare_maps.png)",
    ]
    replace_section(ROOT / "BENCHMARKS.md", "compare", "\n".join(lines), "The paper's comparison at equal budget")


PROTOCOL_LABELS = {"swap": "swap + fine-tune", "transfer": "transfer + fine-tune", "scratch": "from random weights"}


def times(ratio: float) -> str:
    """A perplexity ratio for the rankings: two decimals below 10x, one above."""
    return f"{ratio:.2f}x" if ratio < 10 else f"{ratio:.1f}x"


def orderings(results: list[dict | None], rows: list[Row], wiki: float, novel: float) -> list[str]:
    """The finished rows ranked within each protocol (the reading below the table quotes these), and
    how many chose the largest rate of their sweep or passed the convergence rule."""
    groups: dict[str, list[tuple[str, dict]]] = {}
    for row, result in zip(rows, results, strict=True):
        if result is not None:
            group = "with a 64-token window" if row.hybrid_of is not None else PROTOCOL_LABELS[row.protocol]
            groups.setdefault(group, []).append((row.name.split(":")[0], result))
    lines = ["Ranked by WikiText-2 perplexity (x teacher on WikiText-2 / on the held-out novel):"]
    for group, members in groups.items():
        ranked = sorted(members, key=lambda member: member[1]["wikitext2"]["perplexity"])
        lines.append(f"- {group}: " + ", ".join(
            f"{name} {times(r['wikitext2']['perplexity'] / wiki)} / {times(r['held_out']['perplexity'] / novel)}"
            for name, r in ranked))  # fmt: skip
    swept = [(row, result) for row, result in zip(rows, results, strict=True) if result and result.get("sweep")]
    at_edge = sum(result["lr_finetune"] == max(row.rates) for row, result in swept)
    finished = [result for result in results if result is not None]
    converged = sum(result["converged"] for result in finished)
    lines.append(f"- {at_edge} of {len(swept)} swept rows chose the largest rate of their sweep; "
                 f"{converged} of {len(finished)} rows pass the convergence rule.")  # fmt: skip
    return lines


def plot(rows: list[dict], teacher: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (curves, bars) = plt.subplots(1, 2, figsize=(14, 6.5))
    colours = plt.get_cmap("tab20").colors  # 20 distinct colours: the default cycle repeats after 10 rows
    for number, row in enumerate(rows):
        points = row["curve"]
        label = f"{row['name']} ({'converged' if row['converged'] else 'not converged'})"
        curves.plot([p["tokens"] for p in points], [p["loss"] for p in points], marker="o", markersize=3,
                    color=colours[number % len(colours)], linestyle="-" if row["converged"] else "--",
                    label=label)  # fmt: skip
    curves.set_xlabel("training tokens")
    curves.set_ylabel("held-out loss (nll, validation blocks)")
    curves.set_title("Held-out loss while training (dashed: not converged)")
    curves.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)  # below: clear of the curves
    names = [row["name"] for row in rows]
    ratios = [row["wikitext2"]["perplexity"] for row in rows]
    bars.barh(names[::-1], ratios[::-1], color="tab:blue")
    bars.axvline(teacher["wikitext2"]["perplexity"], color="tab:gray", linestyle=":", label="teacher")
    bars.legend(fontsize=7)
    bars.set_xscale("log")
    bars.set_xlabel("WikiText-2 test perplexity (log scale)")
    bars.tick_params(axis="y", labelsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
