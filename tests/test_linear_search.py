"""scripts/linear_search.py's flags: the transfer run is the linear recipe's conversion, and its
distillation variants continue the converted model (which `t2r train` refuses to convert again)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from t2r.training.config import TrainConfig

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.fixture(scope="module")
def search():
    sys.path.insert(0, str(SCRIPTS))  # the script imports recipe.py and compare_maps.py beside it
    spec = importlib.util.spec_from_file_location("linear_search", SCRIPTS / "linear_search.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["linear_search"] = module
    spec.loader.exec_module(module)
    yield module
    for name in ("linear_search", "compare_maps", "recipe"):
        sys.modules.pop(name, None)
    sys.path.remove(str(SCRIPTS))


def parse(flags: list[str]):
    from t2r.cli import build_parser

    return build_parser().parse_args(["train", "--out", "run", *flags])


def test_the_transfer_run_converts_as_the_recipe_does(search) -> None:
    """Every flag of the recipe but its step counts, rate, LoRA rank and checkpoint interval."""
    args = parse(search.recipe_flags(drop_conversion=False))
    assert (args.feature_map, args.feature_dim, args.untie_qk, args.window) == ("hedgehog", 64, True, 0)
    assert (args.batch_size, args.seq_len, args.ce_weight, args.distill_weight) == (4, 512, 0.0, 1.0)
    assert args.distill_data and len(args.data) == 4


def test_a_variant_carries_no_conversion_flag(search) -> None:
    """prepare_student refuses a converted model given any conversion flag: all must be unset. The
    distillation's adapters are the variant's alone (not the recipe's --full or LoRA rank)."""
    for flags in search.VARIANTS.values():
        args = parse(["--model", "converted", *search.recipe_flags(drop_conversion=True), *flags])
        conversion = (args.feature_map, args.feature_dim, args.window, args.half_life, args.sinks, args.linear_heads)
        assert conversion == (None,) * 6 and not args.untie_qk
        assert args.full == ("--full" in flags)
        rank = int(flags[flags.index("--lora-rank") + 1]) if "--lora-rank" in flags else TrainConfig().lora_rank
        assert args.lora_rank == rank
        assert args.data == parse(search.recipe_flags(drop_conversion=False)).data


def test_the_report_puts_each_row_beside_the_teacher(search, tmp_path: Path, monkeypatch) -> None:
    """x teacher is the row's held-out perplexity over the teacher's on the same text; one line a row."""
    monkeypatch.setattr(search, "ROOT", tmp_path)
    point = {"stage": "finetune", "steps": 50, "top1": 0.5, "kl": 0.9}
    held_out = {"perplexity": 40.0, "top1_agreement": 0.5, "kl": 0.9}
    result = {
        "text": "first half of Dorian Gray (pg174)", "tokens": 8192, "transfer_steps": 200, "distill_steps": 50,
        "teacher": {"perplexity": 20.0},
        "transfer": {"seconds": 600.0, "curve": [point], "held_out": {**held_out, "perplexity": 50.0}},
        "rows": {"lora8": {"seconds": 120.0, "curve": [point], "held_out": held_out}},
    }  # fmt: skip
    search.report(result)
    text = (tmp_path / "BENCHMARKS.md").read_text()
    assert "| transfer only, 200 steps | 10.0 | 2.500 | 0.500 | 0.900 | 50: 0.500 |" in text
    assert "| + distillation 50 steps, lora8 | 2.0 | 2.000 | 0.500 | 0.900 | 50: 0.500 |" in text
