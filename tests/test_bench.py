"""`t2r bench` on tiny models: every engine and case measured, bars computed, files written."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import t2r.evaluation.bench.engines
from t2r.evaluation.bench.cases import BenchSettings, Engine
from t2r.evaluation.bench.memory import memory_bandwidth, peak_rss, weight_bytes_per_token
from t2r.evaluation.bench.run import run_bench
from tests.conftest import tiny_model
from tests.test_cli import run


def test_bench_writes_json_plots_and_report(
    converted_folder: Path, text_file: Path, tmp_path: Path, capfd, monkeypatch: pytest.MonkeyPatch
) -> None:
    def in_this_process(*args, **kwargs):
        raise AssertionError("the engines must be measured in child processes, not in the bench's")

    # Only this process's module is patched: rows that still appear were measured by the children.
    monkeypatch.setattr(t2r.evaluation.bench.engines, "measure", in_this_process)
    report = tmp_path / "BENCHMARKS.md"
    report.write_text("# Benchmarks\n\nkept text\n")
    argv = ["bench", converted_folder, "--contexts", "16,64", "--batches", "1,2", "--steps", 2, "--repeats", 1]
    # Two engines (a child each per context and round): every other row is measured in process in
    # tests/test_bench_engines.py, the compiled ones in test_fast_decode; compiling takes a while.
    argv += ["--weights", "fp32", "--no-compile", "--no-reference-step"]
    argv += ["--data", text_file, "--out", tmp_path / "out", "--report", report]
    code, out, err = run(argv, capfd)
    assert code == 0, err
    record = json.loads((tmp_path / "out" / "bench.json").read_text())
    engines = {(c["engine"], c["context"], c["batch"]) for c in record["cases"]}
    assert engines == {(e, n, b) for e in ("teacher", "converted (fast)") for n in (16, 64) for b in (1, 2)}
    assert all(c["decode_tokens_per_s"] > 0 and c["peak_rss_bytes"] > 0 for c in record["cases"])
    assert all((c["prefill_tokens_per_s"] or 0) > 0 for c in record["cases"] if c["batch"] == 1)
    assert record["engines"] == {"teacher": "measured", "converted (fast)": "measured"}
    assert record["teacher"] == record["converted"] == "measured" and record["baseline"] == "not asked for"
    teacher_cache = [c["state_bytes_per_sequence"] for c in record["cases"] if c["engine"] == "teacher"]
    assert teacher_cache[0] < teacher_cache[-1]  # the KV cache grows with the context
    ours = {c["state_bytes_per_sequence"] for c in record["cases"] if c["engine"] == "converted (fast)"}
    assert len(ours) == 1  # the recurrent state does not
    assert {row["bar"] for row in record["bars"]} >= {"decode at 8k / teacher's", "peak memory at 32k / at 256"}
    assert (tmp_path / "out" / "bench_decode.png").stat().st_size > 0
    text = report.read_text()
    assert "kept text" in text and "<!-- bench:start -->" in text and "| teacher: decode tok/s |" in text
    assert "| converted (fast) |" in text  # its fraction of its own bandwidth bound
    assert "| converted (fast) / teacher |" in text  # the like-for-like pair: fp32, eager both
    assert "decode at 8k / teacher's" in out
    # --replot: the same section again from bench.json, nothing measured (no model is even loaded).
    report.write_text("# Benchmarks\n\nkept text\n")
    code, out, err = run(
        ["bench", tmp_path / "nowhere", "--replot", "--out", tmp_path / "out", "--report", report], capfd
    )
    assert code == 0, err
    assert report.read_text() == text and "decode at 8k / teacher's" in out
    code, _, err = run(["bench", tmp_path / "nowhere", "--replot", "--out", tmp_path / "none"], capfd)
    assert code == 2 and "does not exist" in err
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "bench.json").write_text("{not json")
    code, _, err = run(["bench", tmp_path / "nowhere", "--replot", "--out", tmp_path / "broken"], capfd)
    assert code == 2 and "is not a bench record" in err and "Traceback" not in err


def test_a_failing_converted_child_is_recorded_not_raised(tmp_path: Path) -> None:
    lines: list[str] = []
    settings = BenchSettings((8, 16), (1,), steps=1, repeats=2, weights=("fp32",), compile=False, reference_step=False)
    record = run_bench(tmp_path / "missing", "unused", torch.arange(16), settings, teacher_context=0, log=lines.append)
    assert record["converted"].startswith("converted (fast): measure failed (exit 1: ")
    assert "missing" in record["converted"]  # the child's own error line names the folder
    assert record["engines"] == {"teacher": "measured", "converted (fast)": record["converted"]}  # teacher: no context
    assert record["cases"] == [] and record["weight_bytes_per_token"] == {}
    assert lines.count(record["converted"]) == 1  # logged once; no further round or context is tried


def test_measurement_helpers() -> None:
    assert memory_bandwidth(megabytes=64, repeats=2) > 1e8  # bytes/s: any machine reads 100 MB/s
    model = tiny_model("llama")  # ties its embedding to the head: counted once
    everything = [*model.parameters(), *model.buffers()]
    assert weight_bytes_per_token(model) == sum(t.nbytes for t in everything)
    with peak_rss() as peak:
        block = torch.ones(64 * 2**20 // 4)
        block += 1
    assert peak() >= block.nbytes


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")
def test_llama_cpp_row_on_the_default_gguf() -> None:
    """The third engine in its child process, on the GGUF the default model ships."""
    from t2r.evaluation.bench.run import isolated
    from t2r.hub import alias_path

    gguf = str(alias_path("smollm2-135m"))
    engine = Engine("llama.cpp", gguf).to_dict()
    found = isolated("measure", engine=engine, prompt=list(range(10, 74)), steps=4, segment=16, threads=2)
    assert not isinstance(found, str), found
    (case,) = found["cases"]
    assert case["engine"] == "llama.cpp" and case["context"] == 64 and case["decode_tokens_per_s"] > 0
    assert case["prefill_tokens_per_s"] > 0  # after a warm-up prefill of 16 tokens and a reset
    assert found["weight_bytes_per_token"] == Path(gguf).stat().st_size
