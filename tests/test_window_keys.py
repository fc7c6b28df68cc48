"""The hybrid's window keeps its keys once: the linear part's pre-rotary keys are turned back from
the rotated ones (t2r.modeling.window_keys), exact to fp32 rounding, and a model whose state keeps
no copy decodes as one whose state keeps it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from t2r.modeling.fast_decode import FastState, fast_step
from t2r.modeling.window_keys import inverse_rotary, window_positions
from t2r.ops.state import HybridAttentionState, ModelState
from tests.conftest import FAMILIES, MORE_FAMILIES
from tests.test_model import converted, left_padded_batch, trained_looking_model

# A turn and its inverse are each a few fp32 products per element: keys of norm ~1-10 come back to
# within a few ulps (~1e-6 relative); 1e-5 absolute leaves a margin for the angles' own rounding.
TURN_TOLERANCE = 1e-5
# Logits of the tiny models are O(1)-O(10); the same model with the keys turned back instead of
# stored differs by the turn's rounding, compounded over layers: 1e-4 as in tests/test_model.py.
TOLERANCE = 1e-4
ROTARY_FAMILIES = [f for f in (*FAMILIES, *MORE_FAMILIES) if f not in ("gpt2", "opt", "opt_post_norm")]


def test_the_inverse_turn_recovers_the_keys_even_when_cos_and_sin_are_scaled() -> None:
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(2, 3, 7, 64, generator=generator) * 4
    angles = torch.rand(2, 7, 32, generator=generator) * 5000  # positions up to ~5k at the fastest rate
    angles = torch.cat([angles, angles], -1)
    for scale in (1.0, 1.3):  # 1.3: a YaRN-style attention factor on cos and sin
        cos, sin = angles.cos() * scale, angles.sin() * scale
        _, turned = apply_rotary_pos_emb(keys, keys, cos, sin)
        _, back = apply_rotary_pos_emb(turned, turned, *inverse_rotary((cos, sin)))
        assert (back - keys).abs().max() <= TURN_TOLERANCE * 4
    per_type = inverse_rotary({"local": (cos, sin), "global": (cos, sin)})
    assert set(per_type) == {"local", "global"}


def test_window_positions_count_real_tokens_only() -> None:
    # Row 0: 3 slots empty, then 5 real tokens (positions 10..14 after seen 15); row 1: a pad hole.
    valid = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [1, 1, 0, 0, 1, 1, 0, 1]], dtype=torch.bool)
    positions = window_positions(torch.tensor([15, 9]), valid)
    assert positions[0, 3:].tolist() == [10, 11, 12, 13, 14]
    assert positions[1][valid[1]].tolist() == [4, 5, 6, 7, 8]


def with_stored_linear_keys(model: torch.nn.Module, state: ModelState) -> ModelState:
    """`state` with a copy of the pre-rotary keys in every hybrid layer (the layout before they were
    turned back): what the ops take as the specification."""
    layers = []
    for attention, layer in zip(model.attentions, state.layers, strict=True):
        if isinstance(layer, HybridAttentionState) and attention.feature_dim:
            shape = attention.shape
            copy = torch.zeros(layer.keys.shape[0], shape.kv_heads, layer.window, shape.head_dim)
            layer = dataclasses.replace(layer, linear_keys=copy)
        layers.append(layer)
    return ModelState(tuple(layers), state.seen)


@pytest.mark.parametrize("family", ROTARY_FAMILIES)
@torch.no_grad()
def test_a_state_without_a_copy_of_its_keys_decodes_as_one_with_it(family: str) -> None:
    """Prefill 17 tokens (the window of 5 overflows: keys leave it turned back), decode the rest one
    step at a time and with the in-place fast step, left padding and sinks in the batch: the logits
    equal those of the same model whose state stores the pre-rotary keys, and the state is smaller
    by exactly that copy."""
    torch.manual_seed(0)
    model = trained_looking_model(converted(family, "hedgehog", rotary_features=False))
    ids, mask = left_padded_batch()
    runs = {}
    for stored in (False, True):
        state = model.init_state(2)
        state = with_stored_linear_keys(model, state) if stored else state
        logits, state = model(ids[:, :17], mask[:, :17], state, form="chunked")
        fast = FastState.from_model_state(state)
        steps, fast_steps = [], []
        for t in range(17, ids.shape[1]):
            step_logits, state = model.step(ids[:, t], state, mask[:, t])
            steps.append(step_logits)
            fast_steps.append(fast_step(model, ids[:, t], fast))
        runs[stored] = (logits, torch.stack(steps, 1), torch.stack(fast_steps, 1), state)
    kept = mask.bool()
    assert (runs[False][0] - runs[True][0])[kept[:, :17]].abs().max() <= TOLERANCE
    assert (runs[False][1] - runs[True][1]).abs().max() <= TOLERANCE
    assert (runs[False][2] - runs[True][1]).abs().max() <= TOLERANCE
    without, with_copy = runs[False][3], runs[True][3]
    copy_bytes = sum(layer.linear_keys.nbytes for layer in with_copy.layers if isinstance(layer, HybridAttentionState))
    assert copy_bytes > 0
    assert without.nbytes() == with_copy.nbytes() - copy_bytes
