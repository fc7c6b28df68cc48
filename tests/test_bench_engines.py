"""The bench's engines measured in this process on tiny models (the children are tested in
tests/test_bench.py), its plan of engines and its interleaved rounds (with a fake child)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import t2r.evaluation.bench.run as bench_run
from t2r.evaluation.bench import engines as bench_engines
from t2r.evaluation.bench.cases import BenchSettings, Case, Engine, aggregate
from t2r.evaluation.bench.memory import weight_bytes_per_token
from t2r.evaluation.bench.teacher import compiled_forward, prefill, repeated, stepper
from tests.conftest import tiny_model


def greedy(step, count: int) -> list[list[int]]:
    """`count` steps of a stepper: the tokens [B] of each step, as lists."""
    return [step().tolist() for _ in range(count)]


@pytest.mark.parametrize(
    "backend",
    [
        "aot_eager",  # the captured graph, run eagerly: seconds
        pytest.param("inductor", marks=pytest.mark.slow),  # generated C++ kernels, the bench's: a minute cold
    ],
)
def test_compiled_static_teacher_decodes_the_eager_teachers_tokens(backend: str) -> None:
    """transformers' fast path (static cache, compiled forward) is the same greedy decode as its
    eager forward with a dynamic cache, from a cache repeated to batch 2."""
    torch._dynamo.reset()
    teacher = tiny_model("llama")
    with torch.no_grad():  # larger weights: greedy tokens that vary, so a misplaced position shows
        for parameter in teacher.parameters():
            if parameter.dim() == 2:
                parameter.mul_(10)
    prompt, count = torch.arange(5, 45), 10
    logits, cache = prefill(teacher, prompt)
    expected = [row[0] for row in greedy(stepper(teacher, cache, logits.argmax(-1)), count)]
    assert len(set(expected)) > 3
    logits, cache = prefill(teacher, prompt, static_length=len(prompt) + count)
    assert type(cache).__name__ == "StaticCache"
    step = stepper(compiled_forward(teacher, backend), repeated(cache, 2), logits.argmax(-1).repeat(2))
    first = greedy(step, 1)  # compiles
    with torch._dynamo.config.patch(error_on_recompile=True):  # one graph for every position
        assert first + greedy(step, count - 1) == [[token, token] for token in expected]
    assert int(cache.get_seq_length()) == len(prompt)  # the repeated copy decoded; the prefill is intact
    # The comparison can fail: one prompt token short, the same first token decodes otherwise.
    _, short = prefill(teacher, prompt[:-1], static_length=len(prompt) + count)
    assert [row[0] for row in greedy(stepper(teacher, short, logits.argmax(-1)), count)] != expected


@pytest.mark.parametrize("weights", ["fp32", "int4", "bf16"])
def test_compiled_teacher_engines_measure_in_each_weight_format(teacher_folder: Path, weights: str) -> None:
    torch._dynamo.reset()
    engine = Engine("teacher", str(teacher_folder), weights, "compiled", (1,), backend="aot_eager")
    found = bench_engines.measure(engine.to_dict(), list(range(5, 37)), steps=3, segment=16, threads=1)
    (case,) = found["cases"]
    assert (
        case["engine"]
        == engine.name
        == ("teacher (compiled)" if weights == "fp32" else f"teacher (compiled, {weights})")
    )
    for rate in (case["prefill_tokens_per_s"], case["decode_tokens_per_s"]):
        assert math.isfinite(rate) and rate > 0
    fp32 = bench_engines.load_engine_model(Engine("teacher", str(teacher_folder)))
    fp32_bytes = weight_bytes_per_token(fp32)
    model = bench_engines.load_engine_model(engine)
    if weights == "fp32":
        assert found["weight_bytes_per_token"] == fp32_bytes
    elif weights == "bf16":  # every weight in bf16 (half the bytes), and so the KV cache
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
        assert found["weight_bytes_per_token"] < fp32_bytes * 0.51
        eager = bench_engines.measure(
            Engine("teacher", str(teacher_folder), batches=(1,)).to_dict(), list(range(5, 37)), 3, 16, 1
        )
        assert case["state_bytes_per_sequence"] * 2 == eager["cases"][0]["state_bytes_per_sequence"]
    else:  # 4-bit projections (the head 8-bit) read a fraction of the bytes
        assert found["weight_bytes_per_token"] < fp32_bytes / 4
        kinds = {type(module).__name__ for module in model.modules()}
        assert {"Int4Linear", "Int8Linear"} <= kinds and "Linear" not in kinds


def test_every_planned_engine_measures_in_process(
    converted_folder: Path, teacher_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole bench with each engine run here (no child, no compiling): the converted model,
    its baseline and the teacher in fp32 and int4, eager; every row has its prefill at batch 1."""

    def here(function: str, **arguments):
        return getattr(bench_engines, function)(**arguments)

    monkeypatch.setattr(bench_run, "isolated", here)
    monkeypatch.setattr(bench_run, "memory_bandwidth", lambda: 1e10)
    settings = BenchSettings((16,), (1, 2), steps=2, repeats=1, weights=("fp32", "int4"), compile=False, baseline=True)
    prompt = torch.arange(5, 21)
    record = bench_run.run_bench(converted_folder, str(teacher_folder), prompt, settings, log=lambda line: None)
    names = [engine.name for engine in bench_run.plan(converted_folder, str(teacher_folder), settings)]
    assert names == [
        "teacher", "converted (fast)", "baseline (fast)", "converted (step)",
        "teacher (int4)", "converted (fast, int4)", "baseline (fast, int4)",
    ]  # fmt: skip
    assert set(record["engines"].values()) == {"measured"}
    rows = {(c["engine"], c["batch"]): c for c in record["cases"]}
    expected = {(name, batch) for name in names for batch in (1, 2)} - {("converted (step)", 2)}
    assert set(rows) == expected
    for (name, batch), case in rows.items():
        assert case["decode_tokens_per_s"] > 0 and case["decode_rounds"] == [case["decode_tokens_per_s"]]
        assert (case["prefill_tokens_per_s"] is not None) == (batch == 1), name  # int4 rows too
    weights = record["weight_bytes_per_token"]
    for name in ("teacher", "converted (fast)", "baseline (fast)"):
        four_bits = "teacher (int4)" if name == "teacher" else name.replace(")", ", int4)")
        assert weights[four_bits] < weights[name] / 4


def test_plan_follows_the_weights_and_compile_settings() -> None:
    def names(**fields) -> list[str]:
        return [e.name for e in bench_run.plan("m", "t", BenchSettings(**fields), 8192, "t.gguf")]

    assert names(weights=("fp32", "int4", "bf16")) == [
        "teacher", "converted (fast)", "converted (step)",
        "teacher (compiled)", "converted (compiled)",
        "teacher (compiled, int4)", "converted (compiled, int4)",
        "teacher (compiled, bf16)", "converted (compiled, bf16)",
        "llama.cpp",
    ]  # fmt: skip
    # --no-compile: no compiled row of either; each format eager instead.
    assert names(weights=("fp32", "int4"), compile=False, reference_step=False) == [
        "teacher",
        "converted (fast)",
        "teacher (int4)",
        "converted (fast, int4)",
        "llama.cpp",
    ]
    engines = bench_run.plan("m", "t", BenchSettings(), 8192, None)
    assert {e.longest for e in engines if e.kind == "teacher"} == {8192}
    assert {e.longest for e in engines if e.kind == "converted"} == {None}
    with pytest.raises(Exception, match="no bench engine of kind 'llama'"):
        Engine("llama", "x")


def fake_child(calls: list[tuple[str, int]], fail: tuple[str, int, int] | None = None):
    """A stand-in for `isolated` that records (engine, context) in call order and returns a round
    whose decode rate is 10 * the call's number among that engine's calls at that context
    (rounds 1, 2, 3 -> 10, 20, 30) and whose prefill rate is given in reverse (30, 20, 10)."""

    def child(function: str, engine: dict, prompt: list[int], steps: int, segment: int, threads: int):
        name, context = Engine.from_dict(engine).name, len(prompt)
        calls.append((name, context))
        round_number = calls.count((name, context))
        if fail == (name, context, round_number):
            return "measure failed (signal 9)"
        cases = []
        for batch in engine["batches"]:
            prefill = 10.0 * (4 - round_number) if batch == 1 else None
            peak = 100 * round_number
            cases.append(Case(name, context, batch, prefill, 10.0 * round_number, peak, 7).to_dict())
        return {"cases": cases, "weight_bytes_per_token": 1000}

    return child


def test_rounds_interleave_the_engines_and_report_median_and_spread(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, int]] = []
    # The compiled int4 teacher dies in the second round at context 16: its first round is kept.
    monkeypatch.setattr(bench_run, "isolated", fake_child(calls, fail=("teacher (compiled, int4)", 16, 2)))
    monkeypatch.setattr(bench_run, "memory_bandwidth", lambda: 1e10)
    settings = BenchSettings((16, 32), (1, 2), steps=2, repeats=3, weights=("fp32", "int4"), reference_step=False)
    record = bench_run.run_bench("m", "t", torch.arange(32), settings, log=lambda line: None)
    names = [engine.name for engine in bench_run.plan("m", "t", settings)]
    failing = "teacher (compiled, int4)"
    assert names == [
        "teacher",
        "converted (fast)",
        "teacher (compiled)",
        "converted (compiled)",
        failing,
        "converted (compiled, int4)",
    ]
    without = [name for name in names if name != failing]
    # A B C A B C, not A A B B; the failed engine is not called again.
    assert calls == [(name, 16) for name in names + names + without] + [(name, 32) for name in without * 3]
    assert record["engines"][failing] == f"{failing}: measure failed (signal 9)"
    assert record["teacher"] == record["engines"][failing] and record["converted"] == "measured"
    cases = {(c["engine"], c["context"], c["batch"]): c for c in record["cases"]}
    case = cases[("converted (fast)", 32, 1)]
    assert case["decode_rounds"] == [10, 20, 30] and case["decode_tokens_per_s"] == 20
    assert (case["decode_tokens_per_s_min"], case["decode_tokens_per_s_max"]) == (10, 30)
    assert case["prefill_rounds"] == [30, 20, 10] and case["prefill_tokens_per_s"] == 20
    assert (case["prefill_tokens_per_s_min"], case["prefill_tokens_per_s_max"]) == (10, 30)
    assert case["peak_rss_bytes"] == 300  # the largest of the rounds
    batch_2 = cases[("converted (fast)", 32, 2)]
    assert batch_2["prefill_tokens_per_s"] is None and batch_2["prefill_rounds"] == []
    assert cases[(failing, 16, 1)]["decode_rounds"] == [10] and (failing, 32, 1) not in cases


def test_aggregate_takes_the_median_of_an_even_count_and_keeps_the_order() -> None:
    rounds = [Case("x", 8, 1, p, r, m, 5) for p, r, m in [(4.0, 3.0, 1), (1.0, 1.0, 9), (2.0, 8.0, 2), (3.0, 2.0, 3)]]
    case = aggregate(rounds)
    assert case.decode_tokens_per_s == 2.5 and case.prefill_tokens_per_s == 2.5  # between the middle two
    assert (case.decode_tokens_per_s_min, case.decode_tokens_per_s_max) == (1.0, 8.0)
    assert case.decode_rounds == [3.0, 1.0, 8.0, 2.0] and case.peak_rss_bytes == 9
