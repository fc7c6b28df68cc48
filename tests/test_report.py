"""The BENCHMARKS.md sections: replaced in place; the bench's section from a bench.json."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from t2r.evaluation.bench.cases import Case
from t2r.evaluation.bench.report import write
from t2r.evaluation.markdown import replace_section


def test_sections_are_replaced_in_place_and_the_rest_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\nHand-written intro.\n")
    replace_section(path, "one", "first", "One")
    replace_section(path, "two", "second", "Two")
    replace_section(path, "one", "first, again", "One")
    text = path.read_text()
    assert text.count("<!-- one:start -->") == 1 and "first, again" in text and "first\n" not in text
    assert text.index("## One") < text.index("## Two") and "Hand-written intro." in text


def bench_case(engine: str, context: int, decode: list[float], prefill: list[float] | None = None) -> dict:
    """A batch-1 case of a bench.json, measured in rounds (one rate per round, in order)."""
    prefill = prefill or [2 * rate for rate in decode]
    return Case(
        engine, context, 1, statistics.median(prefill), statistics.median(decode), 2**30, 2**20,
        min(decode), max(decode), min(prefill), max(prefill), decode, prefill,
    ).to_dict()  # fmt: skip


def bench_record(cases: list[dict]) -> dict:
    machine = {"processor": "x86_64", "threads": 2, "torch": "2", "memory_read_bandwidth_bytes_per_s": 1e10}
    weights = {case["engine"]: 10**8 for case in cases}
    return {"machine": machine, "settings": {"repeats": 3}, "teacher_context": 8192, "llama_cpp": "measured",
            "engines": {case["engine"]: "measured" for case in cases}, "weight_bytes_per_token": weights,
            "cases": cases}  # fmt: skip


def test_like_for_like_table_divides_rates_of_the_same_round(tmp_path: Path) -> None:
    """Each ratio is the median of the rounds' own ratios: here 2, 1, 4 -> 2 (1-4), where the ratio
    of the medians would be 12 / 10 = 1.2."""
    cases = []
    for context in (256, 1024, 2048, 8192):
        cases += [
            bench_case("teacher", context, [4.0, 5.0, 6.0]),
            bench_case("teacher (compiled)", context, [5.0, 12.0, 10.0]),
            bench_case("converted (compiled)", context, [10.0, 12.0, 40.0]),
            bench_case("teacher (compiled, int4)", context, [8.0, 8.0, 8.0], prefill=[100.0, 100.0, 100.0]),
            bench_case("converted (compiled, int4)", context, [16.0, 24.0, 20.0], prefill=[50.0, 50.0, 60.0]),
            bench_case("llama.cpp", context, [32.0, 32.0, 40.0]),
        ]
    saved = tmp_path / "out" / "bench.json"
    saved.parent.mkdir()
    saved.write_text(json.dumps(bench_record(cases)))
    report = tmp_path / "BENCHMARKS.md"
    record = json.loads(saved.read_text())
    write(record, tmp_path / "out", report, "t2r bench m")
    text = report.read_text()
    header = "| t2r engine / partner (batch 1) | decode at 256 | decode at 2,048 | decode at 8,192 | prefill at 256 |"
    like_header = next(line for line in text.splitlines() if line.startswith("| t2r engine / partner"))
    assert header in text and "at 1,024" not in like_header  # 256 / 2k / 8k only
    rows = {line.split(" | ")[0]: line.split(" | ")[1:] for line in text.splitlines() if " / " in line}
    assert rows["| converted (compiled) / teacher (compiled)"][0] == "2.00 (1.00-4.00)"
    assert rows["| converted (compiled, int4) / teacher (compiled, int4)"][:4] == ["2.50 (2.00-3.00)"] * 3 + [
        "0.50 (0.50-0.60)"
    ]  # decode at 256, 2k, 8k (16/8, 24/8, 20/8), then prefill at 256
    assert rows["| converted (compiled, int4) / llama.cpp"][0] == "0.50 (0.50-0.75)"  # 16/32, 24/32, 20/40
    assert "| converted (compiled): decode tok/s | 12.0 (10.0-40.0) |" in text  # medians and spread
    written = json.loads(saved.read_text())["bars"]
    notes = {row["bar"]: row["note"] for row in written}
    assert notes["decode at 8k / teacher's"] == "converted (compiled, int4) vs teacher"
    assert notes["decode at 8k / llama.cpp's"] == "converted (compiled, int4) vs llama.cpp"
    assert notes["decode at 32k / own at 256"] == "converted (compiled, int4), against itself"
    # The short-context bars: the fastest converted decode over llama.cpp's at every context (0.8x
    # at 256, 1x from 1k), its bandwidth bound, the fastest converted prefill over the teacher's
    # (and over the compiled teacher's from 4k).
    values = {row["bar"]: (row["value"], row["target"], row["met"]) for row in written}
    assert values["batch-1 decode at 256 / llama.cpp's"] == (20.0 / 32.0, 0.8, False)  # medians
    assert values["batch-1 decode at 1,024 / llama.cpp's"] == (20.0 / 32.0, 1.0, False)
    assert notes["batch-1 decode at 2,048 / llama.cpp's"] == "converted (compiled, int4) vs llama.cpp"
    assert values["batch-1 decode at 256 / bandwidth bound (issue 18)"] == (20.0 / 100.0, 0.5, False)
    assert values["prefill at 256 / teacher's"] == (50.0 / 10.0, 1.0, True)  # int4's 50 over 2 x 5
    assert notes["prefill at 8,192 / compiled teacher's"] == "converted (compiled, int4) vs teacher (compiled)"
    assert "prefill at 2,048 / compiled teacher's" not in values and "prefill at 8,192 / teacher's" in values


def test_a_record_from_before_rounds_still_renders(tmp_path: Path) -> None:
    """bench.json of an earlier bench (no rounds, no spread, no per-engine status): its tables as
    they were, its like-for-like ratios the ratios of its medians."""
    old = bench_record([])
    del old["engines"]
    old["cases"] = [
        {"engine": engine, "context": 256, "batch": 1, "prefill_tokens_per_s": prefill,
         "decode_tokens_per_s": decode, "peak_rss_bytes": 2**30, "state_bytes_per_sequence": 2**20}
        for engine, prefill, decode in [("teacher", 700.0, 20.0), ("converted (compiled, int4)", None, 45.0),
                                        ("llama.cpp", 190.0, 90.0)]
    ]  # fmt: skip
    old["weight_bytes_per_token"] = {case["engine"]: 10**8 for case in old["cases"]}
    report = tmp_path / "BENCHMARKS.md"
    write(old, tmp_path / "out", report, "t2r bench m")
    text = report.read_text()
    assert "| teacher: decode tok/s | 20.0 |" in text and "| converted (compiled, int4): prefill tok/s | - |" in text
    assert "| converted (compiled, int4) / llama.cpp | 0.50 | - |" in text  # no prefill to divide
    assert "interleaved rounds" not in text
