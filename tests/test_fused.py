"""Stacked projections (t2r.modeling.fused): the same model, fewer matrices, every family."""

from __future__ import annotations

import copy

import pytest
import torch

from t2r.modeling.fast_decode import FastState, fast_step
from t2r.modeling.fused import FusedGatedMLP, fuse_projections
from t2r.modeling.quantize import Int4Linear, with_weights
from tests.conftest import FAMILIES, MORE_FAMILIES
from tests.test_fast_decode import INT4_TOLERANCE, assert_fast_path_matches_reference
from tests.test_model import TOLERANCE, converted, left_padded_batch, trained_looking_model

LLAMA_SHAPED = [f for f in (*FAMILIES, *MORE_FAMILIES) if f not in ("gpt2", "gpt_neox", "opt", "opt_post_norm")]


@pytest.mark.parametrize("family", (*FAMILIES, *MORE_FAMILIES))
def test_fused_model_computes_what_the_separate_one_does(family: str) -> None:
    """Chunked forward and the fast step of the stacked model equal the separate model's; q/k/v
    and gate/up are one matrix each in every Llama-shaped family (Phi-3's own stack kept)."""
    torch.manual_seed(0)
    model = trained_looking_model(converted(family, "hedgehog", tie_qk=False, window=5))
    fused = fuse_projections(copy.deepcopy(model))
    names = {name.rsplit(".", 1)[-1] for name, _ in fused.named_modules()}
    if family in LLAMA_SHAPED:
        assert "qkv_proj" in names and not {"q_proj", "k_proj", "v_proj"} & names
        if family != "phi3":  # Phi-3's MLP stacks gate and up already (gate_up_proj)
            assert all(isinstance(layer.mlp, FusedGatedMLP) for layer in fused.adapter.layers(fused.base))
    ids, mask = left_padded_batch()
    with torch.no_grad():
        expected, state = model(ids[:, :20], mask[:, :20], form="chunked")
        got, fused_state = fuse_projections(copy.deepcopy(model))(ids[:, :20], mask[:, :20], form="chunked")
        assert (got - expected).abs().max() <= TOLERANCE
        fast = FastState.from_model_state(fused_state)
        for t in range(20, 28):
            expected, state = model.step(ids[:, t], state)
            assert (fast_step(fused, ids[:, t], fast) - expected).abs().max() <= TOLERANCE


def test_fused_int4_model_keeps_the_fast_path_exact() -> None:
    """int4 after stacking: q/k/v and gate/up are single int4 matrices, and the fast step equals
    the reference step of that same model."""
    torch.manual_seed(0)
    model = trained_looking_model(converted("qwen2", "hedgehog", tie_qk=False, window=5))
    smaller = with_weights(fuse_projections(model), "int4")
    int4 = [m for m in smaller.modules() if isinstance(m, Int4Linear)]
    assert len(int4) == 2 * 4  # per layer: qkv, o, gate_up, down
    assert_fast_path_matches_reference(smaller, fast_step, tolerance=INT4_TOLERANCE)
