"""Keep or recompute each layer's activations (t2r.training.activation_memory): the estimate, the
choice, the flags, and a resumed run that keeps its choice."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import t2r.training.activation_memory as activation_memory
from t2r.cli import build_parser
from t2r.cli.train import train_config
from t2r.training.activation_memory import (
    KEPT_BYTES_PER_OUTPUT,
    SHARE_OF_AVAILABLE,
    choose_recomputation,
    kept_activation_bytes,
    projection_outputs,
    recompute_layers,
)
from tests.conftest import tiny_model
from tests.test_train import tiny_trainer


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_projection_outputs_count_every_projection_but_the_head(family: str) -> None:
    model = tiny_model(family)
    config = model.config
    hidden = config.hidden_size
    if family == "llama":  # q, k, v, o, gate, up, down per layer
        kv = config.num_key_value_heads * (hidden // config.num_attention_heads)
        per_layer = hidden + 2 * kv + hidden + 2 * config.intermediate_size + hidden
    else:  # GPT-2's Conv1D: c_attn (3 hidden), c_proj, the MLP's c_fc (inner) and c_proj
        inner = config.n_inner or 4 * hidden
        per_layer = 3 * hidden + hidden + inner + hidden
    assert projection_outputs(model) == config.num_hidden_layers * per_layer


def test_the_choice_follows_the_estimate() -> None:
    model = tiny_model("llama")
    kept = kept_activation_bytes(model, 2048)
    assert kept == 2048 * projection_outputs(model) * KEPT_BYTES_PER_OUTPUT
    fits = int(kept / SHARE_OF_AVAILABLE) + 1
    assert recompute_layers(model, 2048, fits) is False
    assert recompute_layers(model, 2048, fits // 2) is True
    assert choose_recomputation(True, model, 2048, announce=False) is True  # a flag decides
    assert choose_recomputation(False, model, 2048, announce=False) is False


def test_the_constant_is_the_measured_figure() -> None:
    """benchmarks/train_memory.json (scripts/train_memory.py, the default model, 4 x 512 tokens): the
    peak with layers kept minus the peak with them recomputed, per token and projection output; the
    constant rounds it up (an estimate that errs towards recomputing)."""
    peaks = json.loads((Path(__file__).resolve().parents[1] / "benchmarks" / "train_memory.json").read_text())
    kept = peaks["peak_bytes"]["after, layers kept for backward"] - peaks["peak_bytes"]["after"]
    outputs = 30 * (576 + 2 * 192 + 576 + 2 * 1536 + 576)  # SmolLM2-135M: 30 layers of q, k, v, o, gate, up, down
    measured = kept / (4 * 512 * outputs)
    assert measured <= KEPT_BYTES_PER_OUTPUT <= 1.05 * measured


@pytest.mark.parametrize(("flags", "expected"), [([], None), (["--checkpoint-layers"], True),
                                                 (["--no-checkpoint-layers"], False)])  # fmt: skip
def test_the_flags(flags: list[str], expected: bool | None, tmp_path: Path) -> None:
    args = build_parser().parse_args(["train", "--out", str(tmp_path), *flags])
    assert train_config(args).checkpoint_layers is expected


def test_a_resumed_run_keeps_its_choice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = tiny_trainer(tmp_path / "run")
    assert first.recompute is False  # a tiny model's activations fit anywhere
    first.run(resume=False)
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["recompute_layers"] is False
    monkeypatch.setattr(activation_memory, "recompute_layers", lambda *args: True)  # less memory now
    again = tiny_trainer(tmp_path / "run")
    assert again.recompute is True
    again.run(resume=True)
    assert again.recompute is False  # the saved run's choice
    told = tiny_trainer(tmp_path / "run", checkpoint_layers=True)
    told.run(resume=True)
    assert told.recompute is True  # unless told
