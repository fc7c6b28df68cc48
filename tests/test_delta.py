"""A trained model as a delta from its untrained conversion, and the ready model shipped as one."""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path

import pytest
import safetensors.torch
import torch

from t2r.modeling.config import T2RConfig
from t2r.modeling.convert import convert
from t2r.modeling.delta import LEFT, RIGHT, apply_delta, make_delta, reconstruction_error

from .conftest import tiny_model

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = T2RConfig(feature_map="hedgehog", tie_qk=False, window=4, sinks=2, linear_heads="kv", feature_dim=8)


def as_if_trained(model: torch.nn.Module, rank: int = 2) -> torch.nn.Module:
    """What training does: new feature maps and shares, and each attention projection plus a
    rank-`rank` change merged into it (LoRA)."""
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "feature_map" in name or "window_logit" in name:
                parameter.add_(torch.randn(parameter.shape, generator=generator))
            elif "projections" in name and parameter.ndim == 2:
                left = torch.randn(parameter.shape[0], rank, generator=generator) * 0.05
                right = torch.randn(rank, parameter.shape[1], generator=generator) * 0.05
                parameter.add_(left @ right)
    return model


def test_the_delta_rebuilds_the_trained_model() -> None:
    trained = as_if_trained(convert(tiny_model("llama"), SETTINGS))
    untrained = convert(tiny_model("llama"), SETTINGS)
    delta = make_delta(untrained.state_dict(), trained.state_dict(), rank=2)
    factored = [name.removesuffix(LEFT) for name in delta if name.endswith(LEFT)]
    assert len(factored) == 2 * 4 and all(name + RIGHT in delta for name in factored)  # q, k, v, o of 2 layers
    assert all("feature_map" in name or "window_logit" in name for name in delta if not name.endswith((LEFT, RIGHT)))
    apply_delta(untrained, delta)
    assert reconstruction_error(untrained, trained.state_dict()) < 1e-6
    ids = torch.randint(0, 300, (2, 20))
    # The delta's factors rebuild each weight to ~1e-7 (reconstruction error above): logits move ~1e-6.
    torch.testing.assert_close(untrained(ids)[0], trained(ids)[0], rtol=1e-5, atol=1e-5)


def test_a_change_of_higher_rank_is_kept_whole() -> None:
    trained = as_if_trained(convert(tiny_model("llama"), SETTINGS), rank=12)
    delta = make_delta(convert(tiny_model("llama"), SETTINGS).state_dict(), trained.state_dict(), rank=2)
    assert not any(name.endswith(LEFT) for name in delta)


def test_a_delta_that_does_not_fit_is_refused() -> None:
    delta = {"base.model.layers.0.self_attn.window_logit": torch.zeros(99)}
    with pytest.raises(ValueError, match="does not fit"):
        apply_delta(convert(tiny_model("llama"), SETTINGS), delta)


def test_the_shipped_ready_model_is_intact() -> None:
    """The shipped delta is the file its record names, and a delta of the model its record describes."""
    from t2r.hub import READY

    for alias in READY:
        folder = Path(str(resources.files("t2r") / "ready"))
        record = json.loads((folder / f"{alias}.json").read_text())
        weights = folder / f"{alias}.safetensors"
        assert hashlib.sha256(weights.read_bytes()).hexdigest() == record["sha256"]
        assert weights.stat().st_size < 30 * 2**20 and record["max_abs_error"] < 1e-6
        delta = safetensors.torch.load_file(str(weights))
        # factored: the LoRA-adapted projections (none for a recipe without LoRA)
        assert record["tensors"]["factored"] == sum(name.endswith(LEFT) for name in delta)
        assert record["tensors"]["whole"] == len(delta) - 2 * record["tensors"]["factored"] > 0
        T2RConfig.from_dict(record["t2r_config"])  # settings this t2r reads


@pytest.mark.slow
def test_the_ready_model_is_the_recipes_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Made from the teacher and the delta, it equals the recipe's saved model (where that run is
    on this machine), and `t2r generate ALIAS` decodes from it."""
    from t2r.cli import main
    from t2r.hub import load_converted, ready_model_folder

    monkeypatch.setenv("T2R_CACHE_DIR", str(tmp_path))
    record = json.loads((ROOT / "t2r" / "ready" / "t2r-smollm2-135m.json").read_text())
    folder = ready_model_folder("t2r-smollm2-135m")
    assert main(["generate", "t2r-smollm2-135m", "--prompt", "The history of", "--max-new-tokens", "8"]) == 0
    source = ROOT / record["source_folder"]
    if not source.is_dir():
        pytest.skip("the recipe's run is not on this machine")
    assert hashlib.sha256((source / "model.safetensors").read_bytes()).hexdigest() == record["source_model_sha256"]
    made, _ = load_converted(folder)
    recipe, _ = load_converted(source)
    assert reconstruction_error(made, recipe.state_dict()) <= record["max_abs_error"] + 1e-9 < 1e-6


@pytest.mark.slow
@torch.no_grad()
def test_the_ready_model_is_the_teacher_while_a_context_fits_its_window(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shipped model trains no LoRA (README: "within its slots it *is* the teacher"): while a
    context fits in its sinks and window the linear state is empty and every layer is the teacher's
    softmax; past the window it is not."""
    from t2r.hub import load_converted, load_teacher, ready_model_folder

    monkeypatch.setenv("T2R_CACHE_DIR", str(tmp_path))
    record = json.loads((ROOT / "t2r" / "ready" / "t2r-smollm2-135m.json").read_text())
    assert record["training"]["settings"]["lora_rank"] == 0 and not record["training"]["settings"]["full"]
    model, tokenizer = load_converted(ready_model_folder("t2r-smollm2-135m"))
    teacher, _ = load_teacher(record["teacher"])
    text = " ".join(["The river ran past the old mill, and the miller's daughter watched the boats go by."] * 30)
    ids = torch.tensor([tokenizer(text).input_ids])
    fits = model.config.sinks + model.config.window
    assert ids.shape[1] > fits + 50
    converted_logits, teacher_logits = model(ids)[0][0], teacher(ids).logits[0].float()
    # The same products in another order (the window's softmax, fp32): logits of ~10-30 agree to
    # ~1e-5 per layer; 1e-3 absolute leaves room for 30 layers and another machine's kernels.
    assert (converted_logits[:fits] - teacher_logits[:fits]).abs().max() <= 1e-3
    assert (converted_logits[fits:] - teacher_logits[fits:]).abs().max() > 1e-2  # the linear part is at work
