"""What `t2r bench` writes: the bars' ratios, a like-for-like table, a table per batch size, two
plots, a BENCHMARKS section.

Rates are medians over the rounds, with their spread (min-max) where there were several rounds. A
like-for-like ratio divides two engines' rates of the same round (neighbours in time: `run`
interleaves the rounds) and reports the median of those ratios with their spread. Records of runs
before rounds (no spread, no per-round figures) render as they did, their ratios of medians.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from t2r.evaluation.bench.cases import PARTNERS, engine_name
from t2r.evaluation.markdown import replace_section

TEACHER = "teacher"
LLAMA_CPP = "llama.cpp"
LIKE_FOR_LIKE_CONTEXTS = (256, 2048, 8192)
ROUNDS = {"decode_tokens_per_s": "decode_rounds", "prefill_tokens_per_s": "prefill_rounds"}


def find(cases: list[dict], engine: str, context: int, batch: int = 1) -> dict | None:
    for case in cases:
        if case["engine"] == engine and case["context"] == context and case["batch"] == batch:
            return case
    return None


def converted_engines(cases: list[dict], kind: str = "converted") -> list[str]:
    """The engines of `kind` (converted, baseline, teacher) that have cases, sorted by name."""
    return sorted({c["engine"] for c in cases if c["engine"].startswith(kind)})


def all_engines(cases: list[dict]) -> list[str]:
    """Every engine with cases, in the tables' order: the teacher's, the converted model's, the
    baseline's, llama.cpp."""
    found = [*converted_engines(cases, TEACHER), *converted_engines(cases), *converted_engines(cases, "baseline")]
    return found + [LLAMA_CPP] * any(c["engine"] == LLAMA_CPP for c in cases)


def best_engine(cases: list[dict], context: int) -> str | None:
    """The converted engine with the fastest batch-1 decode at `context`."""
    found = [c for c in cases if c["engine"].startswith("converted") and c["context"] == context and c["batch"] == 1]
    return max(found, key=lambda c: c["decode_tokens_per_s"])["engine"] if found else None


def best_prefill(cases: list[dict], context: int) -> dict | None:
    """The converted case with the fastest batch-1 prefill at `context` (the prefill a user would pick)."""
    found = [
        c
        for c in cases
        if c["engine"].startswith("converted") and c["context"] == context and c["prefill_tokens_per_s"]
    ]
    return max(found, key=lambda c: c["prefill_tokens_per_s"], default=None)


def bound_rate(record: dict[str, Any], engine: str) -> float:
    """The engine's memory-bandwidth bound in tokens/s: read bandwidth / its weight bytes per token."""
    return record["machine"]["memory_read_bandwidth_bytes_per_s"] / record["weight_bytes_per_token"][engine]


def ratio(a: dict | None, b: dict | None, key: str) -> float | None:
    if a is None or b is None or not a.get(key) or not b.get(key):
        return None
    return a[key] / b[key]


def round_ratios(a: dict | None, b: dict | None, key: str) -> list[float]:
    """a's rate over b's, round by round (the same round: neighbours in time), when both have every
    round's figure; else the ratio of their medians alone; none if either lacks the rate."""
    if ratio(a, b, key) is None:
        return []
    ours, theirs = a.get(ROUNDS[key]) or [], b.get(ROUNDS[key]) or []
    if ours and len(ours) == len(theirs):
        return [x / y for x, y in zip(ours, theirs, strict=True)]
    return [a[key] / b[key]]


def spread(value: float, low: float | None, high: float | None, rounds: int, digits: int) -> str:
    """ "30.3 (28.1-31.0)": the median and its min-max, when more than one round made them."""
    text = f"{value:,.{digits}f}"
    if rounds > 1 and low is not None and high is not None:
        text += f" ({low:,.{digits}f}-{high:,.{digits}f})"
    return text


def bars(record: dict[str, Any]) -> list[dict[str, Any]]:
    """Each bar of the issue with the measured figure, the target, whether it holds, and in its
    note the engine measured and what it is measured against."""
    cases = record["cases"]
    engine = best_engine(cases, 8192) or best_engine(cases, 256)
    rows = []

    def bar(name: str, value: float | None, target: float, at_most: bool = False, note: str = "") -> None:
        met = None if value is None else (value <= target if at_most else value >= target)
        rows.append({"bar": name, "value": value, "target": target, "at_most": at_most, "met": met, "note": note})

    def against(partner: str, ours: str | None = engine) -> str:
        return f"{ours} vs {partner}" if ours else ""

    teacher_8k, teacher_256 = find(cases, TEACHER, 8192), find(cases, TEACHER, 256)
    ours_8k, ours_256, ours_32k = (find(cases, engine, n) for n in (8192, 256, 32768))
    bar("decode at 8k / teacher's", ratio(ours_8k, teacher_8k, "decode_tokens_per_s"), 4.0, note=against(TEACHER))
    prefill_8k = best_prefill(cases, 8192)
    bar(
        "prefill at 8k / teacher's",
        ratio(prefill_8k, teacher_8k, "prefill_tokens_per_s"),
        2.0,
        note=against(TEACHER, prefill_8k["engine"] if prefill_8k else None),
    )
    itself = f"{engine}, against itself" if engine else ""
    bar("decode at 32k / own at 256", ratio(ours_32k, ours_256, "decode_tokens_per_s"), 0.9, note=itself)
    bar(
        "batch-1 decode at 256 / teacher's",
        ratio(ours_256, teacher_256, "decode_tokens_per_s"),
        1.5,
        note=against(TEACHER),
    )
    if ours_256 is not None and engine is not None:
        bound = bound_rate(record, engine)
        bar(
            "batch-1 decode at 256 / bandwidth bound",
            ours_256["decode_tokens_per_s"] / bound,
            0.7,
            note=against("its bandwidth bound"),
        )
    batch_engine = max(
        (c for c in cases if c["engine"].startswith("converted") and c["context"] == 4096 and c["batch"] == 16),
        key=lambda c: c["decode_tokens_per_s"],
        default=None,
    )
    bar(
        "batch-16 decode at 4k / teacher's",
        ratio(batch_engine, find(cases, TEACHER, 4096, 16), "decode_tokens_per_s"),
        8.0,
        note=against(TEACHER, batch_engine["engine"] if batch_engine else None),
    )
    bar("peak memory at 32k / at 256", ratio(ours_32k, ours_256, "peak_rss_bytes"), 1.10, at_most=True, note=itself)
    llama = find(cases, LLAMA_CPP, 8192)
    status = "" if record["llama_cpp"] == "measured" else f" ({record['llama_cpp']})"
    bar(
        "decode at 8k / llama.cpp's",
        ratio(ours_8k, llama, "decode_tokens_per_s"),
        2.0,
        note=against(LLAMA_CPP) + status,
    )
    short_context_bars(record, bar)
    return rows


def short_context_bars(record: dict[str, Any], bar: Callable[..., None]) -> None:
    """The bars of short contexts (issue 18), at every context measured: the fastest converted
    decode against llama.cpp's (>= 0.8x at 256, >= 1x from 1k), its own bandwidth bound at 256, and
    the fastest converted prefill against the teacher's (>= 1x) and, from 4k, against the teacher's
    compiled fast path (>= 1x)."""
    cases = record["cases"]
    contexts = sorted({c["context"] for c in cases if c["batch"] == 1})
    for context in contexts:
        engine = best_engine(cases, context)
        target = 0.8 if context < 1024 else 1.0
        note = f"{engine} vs {LLAMA_CPP}" if engine else ""
        ratio_ = ratio(
            find(cases, engine, context) if engine else None, find(cases, LLAMA_CPP, context), "decode_tokens_per_s"
        )
        bar(f"batch-1 decode at {context:,} / llama.cpp's", ratio_, target, note=note)
    engine = best_engine(cases, 256)
    ours = find(cases, engine, 256) if engine else None
    if ours is not None and record["weight_bytes_per_token"].get(engine):
        bar(
            "batch-1 decode at 256 / bandwidth bound (issue 18)",
            ours["decode_tokens_per_s"] / bound_rate(record, engine),
            0.5,
            note=f"{engine}",
        )
    compiled_teacher = engine_name(TEACHER, "fp32", "compiled")
    for context in contexts:
        best = best_prefill(cases, context)
        name = best["engine"] if best else None
        bar(
            f"prefill at {context:,} / teacher's",
            ratio(best, find(cases, TEACHER, context), "prefill_tokens_per_s"),
            1.0,
            note=f"{name} vs {TEACHER}" if name else "",
        )
        if context >= 4096:
            bar(
                f"prefill at {context:,} / compiled teacher's",
                ratio(best, find(cases, compiled_teacher, context), "prefill_tokens_per_s"),
                1.0,
                note=f"{name} vs {compiled_teacher}" if name else "",
            )


def like_for_like_pairs(cases: list[dict]) -> list[tuple[str, str]]:
    """(t2r engine, its partner) with both measured: each converted row against the teacher row of
    the same weights and decoder, then t2r's int4 (compiled where compiled) against llama.cpp's
    Q4 GGUF."""
    names = {c["engine"] for c in cases}
    pairs = [(ours, theirs) for ours, theirs in PARTNERS.items() if ours in names and theirs in names]
    int4 = [engine_name("converted", "int4", d) for d in ("compiled", "eager")]
    pairs += [(ours, LLAMA_CPP) for ours in int4 if ours in names and LLAMA_CPP in names][:1]
    return pairs


def like_for_like_table(record: dict[str, Any]) -> list[str]:
    """Batch-1 decode and prefill of each t2r engine over its like-for-like partner's, at 256, 2k
    and 8k where measured (else at every context measured); each cell the median over rounds of
    the ratio within a round, and its min-max."""
    cases = record["cases"]
    measured = sorted({c["context"] for c in cases if c["batch"] == 1})
    contexts = [n for n in LIKE_FOR_LIKE_CONTEXTS if n in measured] or measured
    pairs = like_for_like_pairs(cases)
    if not pairs or not contexts:
        return []
    columns = [
        (what, key, n)
        for what, key in (("decode", "decode_tokens_per_s"), ("prefill", "prefill_tokens_per_s"))
        for n in contexts
    ]
    lines = [
        "| t2r engine / partner (batch 1) | " + " | ".join(f"{what} at {n:,}" for what, _, n in columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for ours, theirs in pairs:
        cells = []
        for _, key, n in columns:
            ratios = round_ratios(find(cases, ours, n), find(cases, theirs, n), key)
            median = statistics.median(ratios) if ratios else None
            cells.append("-" if median is None else spread(median, min(ratios), max(ratios), len(ratios), 2))
        lines.append(f"| {ours} / {theirs} | " + " | ".join(cells) + " |")
    return lines


def bound_table(record: dict[str, Any]) -> list[str]:
    """Batch-1 decode at the shortest context (256 by default) against each engine's own bandwidth
    bound (bandwidth / the bytes of weights it reads per token): how close each weight format
    comes to what memory allows."""
    if not record["cases"]:
        return []
    context = min(c["context"] for c in record["cases"])
    bandwidth = record["machine"]["memory_read_bandwidth_bytes_per_s"]
    lines = [
        f"| engine (batch 1, context {context:,}) | weights read per token, MB | bound tok/s | decode tok/s "
        "| of bound |",
        "|---|---|---|---|---|",
    ]
    for engine, weight_bytes in sorted(record["weight_bytes_per_token"].items()):
        case = find(record["cases"], engine, context)
        if case is None or not weight_bytes:
            continue
        bound = bandwidth / weight_bytes
        rate = case["decode_tokens_per_s"]
        lines.append(f"| {engine} | {weight_bytes / 1e6:,.0f} | {bound:,.1f} | {rate:,.1f} | {rate / bound:.2f} |")
    return lines if len(lines) > 2 else []


def cell(case: dict | None, key: str, scale: float, digits: int) -> str:
    """A table's cell: the figure (a rate with its spread over rounds), or "-" where none."""
    value = None if case is None else case.get(key)
    if value is None:
        return "-"
    if key in ROUNDS:
        rounds = len(case.get(ROUNDS[key]) or [])
        return spread(value, case.get(f"{key}_min"), case.get(f"{key}_max"), rounds, digits)
    return f"{value / scale:,.{digits}f}"


def table(record: dict[str, Any], batch: int) -> list[str]:
    cases = record["cases"]
    engines = [e for e in all_engines(cases) if any(c["engine"] == e and c["batch"] == batch for c in cases)]
    contexts = sorted({c["context"] for c in cases})
    header = "| engine | " + " | ".join(f"{n:,}" for n in contexts) + " |"
    lines = [header, "|---" * (len(contexts) + 1) + "|"]
    for what, key, scale, digits in [
        ("decode tok/s", "decode_tokens_per_s", 1, 1),
        ("prefill tok/s", "prefill_tokens_per_s", 1, 0),
        ("peak RSS MiB", "peak_rss_bytes", 2**20, 0),
        ("state/cache MiB per seq.", "state_bytes_per_sequence", 2**20, 2),
    ]:
        if batch > 1 and key == "prefill_tokens_per_s":
            continue
        for engine in engines:
            cells = [cell(find(cases, engine, n, batch), key, scale, digits) for n in contexts]
            lines.append(f"| {engine}: {what} | " + " | ".join(cells) + " |")
    return lines


def plot(record: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = record["cases"]
    paths = []
    for name, key, scale, label in [
        ("bench_decode.png", "decode_tokens_per_s", 1, "decode tokens/s (batch 1; shaded: min-max of the rounds)"),
        ("bench_memory.png", "peak_rss_bytes", 2**30, "peak resident memory, GiB (batch 1)"),
    ]:
        figure, axis = plt.subplots(figsize=(6.4, 4.0))
        for engine in all_engines(cases):
            points = sorted(
                ((c["context"], c) for c in cases if c["engine"] == engine and c["batch"] == 1), key=lambda p: p[0]
            )
            if not points:
                continue
            x = [n for n, _ in points]
            (line,) = axis.plot(x, [c[key] / scale for _, c in points], marker="o", label=engine)
            low, high = [[c.get(f"{key}_{end}") for _, c in points] for end in ("min", "max")]
            if None not in low and None not in high:  # rates measured in rounds
                low, high = [v / scale for v in low], [v / scale for v in high]
                axis.fill_between(x, low, high, color=line.get_color(), alpha=0.15, linewidth=0)
        axis.axvline(record["teacher_context"], color="grey", linestyle=":", linewidth=1)
        axis.set_xscale("log", base=2)
        axis.set_xlabel("context (tokens)")
        axis.set_ylabel(label)
        axis.legend(fontsize=7)
        axis.grid(alpha=0.3)
        figure.tight_layout()
        path = out / name
        figure.savefig(path, dpi=120)
        plt.close(figure)
        paths.append(path)
    return paths


def write(record: dict[str, Any], out: Path, report: Path | None, command: str) -> list[dict[str, Any]]:
    """JSON and plots into `out`; the bench section of `report` (BENCHMARKS.md) if given."""
    out.mkdir(parents=True, exist_ok=True)
    record = {**record, "command": command, "bars": bars(record)}
    (out / "bench.json").write_text(json.dumps(record, indent=2))
    paths = plot(record, out)
    if report is not None:
        machine = record["machine"]
        rounds = record.get("settings", {}).get("repeats")
        lines = [
            f"Machine: {machine['processor']}, {machine['threads']} threads, torch {machine['torch']}; "
            f"measured memory read bandwidth {machine['memory_read_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s. "
            f"llama.cpp: {record['llama_cpp']}."
            + (f" {rounds} interleaved rounds; rates are medians (min-max)." if "engines" in record else ""),
            "",
        ]
        failed = [why for why in record.get("engines", {}).values() if why != "measured"]
        if failed:
            lines += ["Not measured to the end: " + "; ".join(failed) + ".", ""]
        lines += ["| bar | measured | target | met |", "|---|---|---|---|"]
        for row in record["bars"]:
            value = "-" if row["value"] is None else f"{row['value']:.2f}"
            sign = "<=" if row["at_most"] else ">="
            met = {True: "yes", False: "**no**", None: "not measured"}[row["met"]]
            note = f" ({row['note']})" if row["note"] else ""
            lines.append(f"| {row['bar']}{note} | {value} | {sign} {row['target']} | {met} |")
        like = like_for_like_table(record)
        if like:
            lines += [
                "",
                "Like for like, t2r's engine over its partner of the same weights and decoder (the teacher), "
                "or over llama.cpp's Q4 GGUF: the median over rounds of the ratio within a round (min-max):",
                "",
                *like,
            ]
        bounds = bound_table(record)
        if bounds:
            lines += ["", "Each engine against its own bandwidth bound:", "", *bounds]
        for batch in sorted({c["batch"] for c in record["cases"]}):
            lines += ["", f"Batch {batch}:", "", *table(record, batch)]
        relative = [path.relative_to(report.parent) if path.is_relative_to(report.parent) else path for path in paths]
        lines += ["", f"Command: `{command}`.", ""] + [f"![{p.stem}]({p})" for p in relative]
        replace_section(report, "bench", "\n".join(lines), "Speed and memory: `t2r bench`")
    return record["bars"]
