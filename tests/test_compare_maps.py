"""scripts/compare_maps.py's bookkeeping: the held-out curve read from a run's metrics, the
convergence rule, the held-out halves and the hybrid rows' choice (the training itself is `t2r train`'s)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compare_maps.py"


@pytest.fixture(scope="module")
def compare():
    spec = importlib.util.spec_from_file_location("compare_maps", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["compare_maps"] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules["compare_maps"]


def test_the_curve_runs_over_both_stages_once_per_validation(compare, tmp_path: Path) -> None:
    """Validations of the transfer stage, then of fine-tuning offset by the transfer's steps; a
    validation logged twice (a resumed stage's last) counts once, the later record; loss lines skipped."""
    records = [
        {"stage": "transfer", "step": 0, "loss": 1.0},
        {"stage": "transfer", "step": 1, "validation": {"nll": 6.0}},
        {"stage": "transfer", "step": 3, "validation": {"nll": 5.0}},
        {"stage": "finetune", "step": 1, "validation": {"nll": 4.5}},
        {"stage": "finetune", "step": 3, "validation": {"nll": 4.4}},
        {"stage": "finetune", "step": 3, "validation": {"nll": 4.3}},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    curve = compare.held_out_curve(tmp_path, transfer_steps=4)
    assert [(p["step"], p["loss"]) for p in curve] == [(2, 6.0), (4, 5.0), (6, 4.5), (8, 4.3)]
    assert curve[-1]["tokens"] == 8 * compare.BLOCK_TOKENS


def test_converged_means_less_than_two_percent_over_the_last_quarter(compare) -> None:
    """The point at or before 3/4 of the steps against the last: a 1.9% gain is converged, 2.1% not."""

    def curve(last: float) -> list[dict]:
        return [{"step": s, "loss": loss} for s, loss in ((10, 5.0), (60, 4.0), (70, 3.99), (80, last))]

    converged, gain = compare.convergence(curve(4.0 * (1 - 0.019)))
    assert converged and gain == pytest.approx(0.019)
    converged, gain = compare.convergence(curve(4.0 * (1 - 0.021)))
    assert not converged and gain == pytest.approx(0.021)


def test_rates_are_chosen_on_one_half_of_the_novel_and_scores_taken_on_the_other(compare, tmp_path: Path) -> None:
    first, second = compare.held_out_halves(tmp_path)
    whole = compare.HELD_OUT.read_text(encoding="utf-8")
    assert first.read_text(encoding="utf-8") + second.read_text(encoding="utf-8") == whole
    assert abs(len(first.read_text().splitlines()) - len(second.read_text().splitlines())) <= 1


def test_the_hybrid_rows_are_the_best_two_maps_once_every_converted_row_is_done(compare) -> None:
    """One row per map (its better protocol), the two lowest held-out perplexities, with a window."""
    base = compare.base_rows()
    converted = [i for i, row in enumerate(base) if row.protocol != "scratch"]
    scores = dict(zip(converted, [90, 80, 70, 60, 50, 55, 40, 45], strict=True))  # hedgehog swap, t2r swap best
    done = {i: {"held_out": {"perplexity": p}} for i, p in scores.items()}
    assert compare.hybrid_rows(base, {i: done[i] for i in converted[:-1]}) == []
    rows = compare.hybrid_rows(base, done)
    assert [row.name for row in rows] == ["hedgehog: swap + fine-tune, window 64", "t2r: swap + fine-tune, window 64"]
    assert all(row.extra == ["--window", "64", "--sinks", "4"] and row.hybrid_of is not None for row in rows)


def test_the_rankings_order_each_protocol_by_wikitext_perplexity(compare) -> None:
    """Under the table: rows ranked within their protocol, ratios to the teacher, the sweep-edge count."""
    base = compare.base_rows()
    ppl = {0: 300.0, 1: 90.0, 2: 60.0, 3: 120.0, 8: 5000.0}  # elu swap/transfer, rfa swap/transfer, scratch

    def result(i: int) -> dict:
        rate = max(base[i].rates) if i != 2 else min(base[i].rates)
        return {"wikitext2": {"perplexity": ppl[i]}, "held_out": {"perplexity": ppl[i] / 2},
                "lr_finetune": rate, "sweep": {"x": 1.0}, "converged": i != 8}  # fmt: skip

    results = [result(i) if i in ppl else None for i in range(len(base))]
    lines = compare.orderings(results, base, wiki=30.0, novel=10.0)
    assert lines[1] == "- swap + fine-tune: rfa 2.00x / 3.00x, elu 10.0x / 15.0x"
    assert lines[2] == "- transfer + fine-tune: elu 3.00x / 4.50x, rfa 4.00x / 6.00x"
    assert lines[3] == "- from random weights: t2r 166.7x / 250.0x"
    assert lines[4] == (
        "- 4 of 5 swept rows chose the largest rate of their sweep; 4 of 5 rows pass the convergence rule."
    )
