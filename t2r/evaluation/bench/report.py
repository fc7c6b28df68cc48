"""What `t2r bench` writes: the bars' ratios, a table per batch size, two plots, a BENCHMARKS section."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from t2r.evaluation.markdown import replace_section

TEACHER = "teacher"


def find(cases: list[dict], engine: str, context: int, batch: int = 1) -> dict | None:
    for case in cases:
        if case["engine"] == engine and case["context"] == context and case["batch"] == batch:
            return case
    return None


def converted_engines(cases: list[dict], kind: str = "converted") -> list[str]:
    return sorted({c["engine"] for c in cases if c["engine"].startswith(kind)})


def best_engine(cases: list[dict], context: int) -> str | None:
    """The converted engine with the fastest batch-1 decode at `context`."""
    found = [c for c in cases if c["engine"].startswith("converted") and c["context"] == context and c["batch"] == 1]
    return max(found, key=lambda c: c["decode_tokens_per_s"])["engine"] if found else None


def ratio(a: dict | None, b: dict | None, key: str) -> float | None:
    if a is None or b is None or not a.get(key) or not b.get(key):
        return None
    return a[key] / b[key]


def bars(record: dict[str, Any]) -> list[dict[str, Any]]:
    """Each bar of the issue with the measured figure, the target and whether it holds."""
    cases = record["cases"]
    engine = best_engine(cases, 8192) or best_engine(cases, 256)
    rows = []

    def bar(name: str, value: float | None, target: float, at_most: bool = False, note: str = "") -> None:
        met = None if value is None else (value <= target if at_most else value >= target)
        rows.append({"bar": name, "value": value, "target": target, "at_most": at_most, "met": met, "note": note})

    teacher_8k, teacher_256 = find(cases, TEACHER, 8192), find(cases, TEACHER, 256)
    ours_8k, ours_256, ours_32k = (find(cases, engine, n) for n in (8192, 256, 32768))
    bar("decode at 8k / teacher's", ratio(ours_8k, teacher_8k, "decode_tokens_per_s"), 4.0, note=engine or "")
    prefill_8k = max(
        (
            c
            for c in cases
            if c["engine"].startswith("converted") and c["context"] == 8192 and c["prefill_tokens_per_s"]
        ),
        key=lambda c: c["prefill_tokens_per_s"],
        default=None,
    )  # the prefill a user would pick (int8 / int4 rows reuse the fp32 prefill and report none)
    bar(
        "prefill at 8k / teacher's",
        ratio(prefill_8k, teacher_8k, "prefill_tokens_per_s"),
        2.0,
        note=prefill_8k["engine"] if prefill_8k else "",
    )
    bar("decode at 32k / own at 256", ratio(ours_32k, ours_256, "decode_tokens_per_s"), 0.9, note=engine or "")
    bar(
        "batch-1 decode at 256 / teacher's", ratio(ours_256, teacher_256, "decode_tokens_per_s"), 1.5, note=engine or ""
    )
    if ours_256 is not None and engine is not None:
        bound = record["machine"]["memory_read_bandwidth_bytes_per_s"] / record["weight_bytes_per_token"][engine]
        bar("batch-1 decode at 256 / bandwidth bound", ours_256["decode_tokens_per_s"] / bound, 0.7, note=engine)
    batch_engine = max(
        (c for c in cases if c["engine"].startswith("converted") and c["context"] == 4096 and c["batch"] == 16),
        key=lambda c: c["decode_tokens_per_s"],
        default=None,
    )
    bar(
        "batch-16 decode at 4k / teacher's",
        ratio(batch_engine, find(cases, TEACHER, 4096, 16), "decode_tokens_per_s"),
        8.0,
        note=batch_engine["engine"] if batch_engine else "",
    )
    bar(
        "peak memory at 32k / at 256",
        ratio(ours_32k, ours_256, "peak_rss_bytes"),
        1.10,
        at_most=True,
        note=engine or "",
    )
    llama = find(cases, "llama.cpp", 8192)
    bar("decode at 8k / llama.cpp's", ratio(ours_8k, llama, "decode_tokens_per_s"), 2.0, note=record["llama_cpp"])
    return rows


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


def table(record: dict[str, Any], batch: int) -> list[str]:
    cases = record["cases"]
    engines = [TEACHER, *converted_engines(cases), *converted_engines(cases, "baseline"), "llama.cpp"]
    engines = [e for e in engines if any(c["engine"] == e and c["batch"] == batch for c in cases)]
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
            cells = []
            for n in contexts:
                case = find(cases, engine, n, batch)
                value = None if case is None else case.get(key)
                cells.append("-" if value is None else f"{value / scale:,.{digits}f}")
            lines.append(f"| {engine}: {what} | " + " | ".join(cells) + " |")
    return lines


def plot(record: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = record["cases"]
    engines = [TEACHER, *converted_engines(cases), *converted_engines(cases, "baseline"), "llama.cpp"]
    paths = []
    for name, key, scale, label in [
        ("bench_decode.png", "decode_tokens_per_s", 1, "decode tokens/s (batch 1)"),
        ("bench_memory.png", "peak_rss_bytes", 2**30, "peak resident memory, GiB (batch 1)"),
    ]:
        figure, axis = plt.subplots(figsize=(6.4, 4.0))
        for engine in engines:
            points = sorted((c["context"], c[key] / scale) for c in cases if c["engine"] == engine and c["batch"] == 1)
            if points:
                axis.plot(*zip(*points, strict=True), marker="o", label=engine)
        axis.axvline(record["teacher_context"], color="grey", linestyle=":", linewidth=1)
        axis.set_xscale("log", base=2)
        axis.set_xlabel("context (tokens)")
        axis.set_ylabel(label)
        axis.legend(fontsize=8)
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
        lines = [
            f"Machine: {machine['processor']}, {machine['threads']} threads, torch {machine['torch']}; "
            f"measured memory read bandwidth {machine['memory_read_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s. "
            f"llama.cpp: {record['llama_cpp']}.",
            "",
            "| bar | measured | target | met |",
            "|---|---|---|---|",
        ]
        for row in record["bars"]:
            value = "-" if row["value"] is None else f"{row['value']:.2f}"
            sign = "<=" if row["at_most"] else ">="
            met = {True: "yes", False: "**no**", None: "not measured"}[row["met"]]
            note = f" ({row['note']})" if row["note"] else ""
            lines.append(f"| {row['bar']}{note} | {value} | {sign} {row['target']} | {met} |")
        bounds = bound_table(record)
        if bounds:
            lines += ["", "Each engine against its own bandwidth bound:", "", *bounds]
        for batch in sorted({c["batch"] for c in record["cases"]}):
            lines += ["", f"Batch {batch}:", "", *table(record, batch)]
        relative = [path.relative_to(report.parent) if path.is_relative_to(report.parent) else path for path in paths]
        lines += ["", f"Command: `{command}`.", ""] + [f"![{p.stem}]({p})" for p in relative]
        replace_section(report, "bench", "\n".join(lines), "Speed and memory: `t2r bench`")
    return record["bars"]
