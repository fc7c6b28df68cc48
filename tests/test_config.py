"""T2RConfig: what the flags mean once they reach the model."""

from __future__ import annotations

import math

import pytest

from t2r.errors import UsageError
from t2r.modeling.config import DEFAULT_HALF_LIFE, T2RConfig
from t2r.modeling.convert import convert
from tests.conftest import tiny_model


@pytest.mark.parametrize("half_life", [1, 7, 128, 512])
def test_a_half_life_of_n_tokens_is_a_per_token_factor_that_halves_in_n(half_life: int) -> None:
    """decay = 2^(-1/N): after N tokens a key's weight is exactly half (not e^(-1/N), not 1 - 1/N)."""
    config = T2RConfig(window=4, half_life=half_life)
    assert math.isclose(config.decay() ** half_life, 0.5, rel_tol=1e-12)
    assert math.isclose(config.decay() ** (2 * half_life), 0.25, rel_tol=1e-12)
    model = convert(tiny_model("llama"), config)
    assert [attention.decay for attention in model.attentions] == [config.decay()] * len(model.attentions)


def test_forgetting_defaults_and_its_absence() -> None:
    assert T2RConfig(window=4).half_life == DEFAULT_HALF_LIFE
    assert math.isclose(T2RConfig(window=4).decay() ** DEFAULT_HALF_LIFE, 0.5, rel_tol=1e-12)
    assert T2RConfig(window=4, half_life=0).decay() is None  # never forgets
    assert T2RConfig(window=0).decay() is None  # pure linear attention keeps every token
    model = convert(tiny_model("llama"), T2RConfig(window=4, half_life=0))
    assert all(attention.decay is None for attention in model.attentions)


def test_linear_heads_are_checked() -> None:
    assert T2RConfig().linear_heads == "query"
    assert T2RConfig.from_dict({"window": 5}).linear_heads == "query"  # folders saved before the option
    with pytest.raises(UsageError, match="needs a window"):
        T2RConfig(window=0, linear_heads="kv")
    with pytest.raises(UsageError, match="unknown linear heads"):
        T2RConfig(linear_heads="value")
