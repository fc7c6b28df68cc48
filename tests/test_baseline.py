"""The training-free sliding-window baseline (`feature_map="none"`): the teacher's own softmax over
S sinks + the last W tokens, in every form and the fast step, at a state size set by W alone."""

from __future__ import annotations

import copy

import pytest
import torch

from t2r.errors import UsageError
from t2r.inference.generate import generate
from t2r.inference.sampling import Sampling
from t2r.modeling.baseline import equal_memory_window, sliding_window_baseline, window_state_bytes
from t2r.modeling.config import T2RConfig
from t2r.modeling.convert import convert
from t2r.modeling.quantize import with_weights
from t2r.ops import FORMS
from tests.conftest import tiny_model


def streaming_mask(length: int, window: int, sinks: int) -> torch.Tensor:
    """[1, 1, T, T] additive mask: query t sees keys 0..S-1 and t-W+1..t (StreamingLLM)."""
    query = torch.arange(length)[:, None]
    key = torch.arange(length)[None, :]
    allowed = (key <= query) & ((key < sinks) | (key > query - window))
    return torch.zeros(length, length).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "gpt2"])
@pytest.mark.parametrize("form", FORMS)
def test_baseline_is_the_teacher_with_a_streaming_mask(family: str, form: str) -> None:
    teacher = tiny_model(family, seed=1)
    ids = torch.randint(3, 300, (2, 45), generator=torch.Generator().manual_seed(0))
    window, sinks = 9, 3
    expected = teacher(ids, attention_mask=streaming_mask(45, window, sinks)).logits
    assert (expected - teacher(ids).logits).abs().max() > 1e-2  # the mask drops something
    baseline = sliding_window_baseline(copy.deepcopy(teacher), window, sinks)
    out, _ = baseline(ids, form=form)
    # The teacher under a 4D mask vs t2r's windowed forms: the same softmax sums in another order; the
    # tiny model's logits are O(1), ~1e-6 apart.
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=0)
    # A window longer than the text is the teacher itself.
    full = sliding_window_baseline(copy.deepcopy(teacher), window=64, sinks=4)
    torch.testing.assert_close(full(ids, form=form)[0], teacher(ids).logits, atol=2e-5, rtol=0)


def test_state_holds_keys_and_values_only_and_never_grows() -> None:
    teacher = tiny_model("llama", seed=2)
    baseline = sliding_window_baseline(teacher, window=7, sinks=2)
    shape = baseline.attentions[0].shape
    expected = window_state_bytes(2, shape.kv_heads, shape.head_dim, 7, 2)
    assert baseline.init_state(1).nbytes() == expected
    _, state = baseline(torch.randint(3, 300, (1, 40)))
    assert state.nbytes() == expected
    assert sum(p.numel() for n, p in baseline.named_parameters() if "feature_map" in n) == 0


def test_fast_decode_matches_the_reference_step() -> None:
    teacher = tiny_model("llama", seed=3)
    baseline = sliding_window_baseline(teacher, window=6, sinks=2)
    prompt = torch.randint(3, 300, (11,), generator=torch.Generator().manual_seed(1))
    fast = generate(baseline, prompt, 16, Sampling(greedy=True)).new_tokens
    _, state = baseline(prompt[None])
    token, slow = None, []
    logits = baseline(prompt[None])[0][:, -1]
    for _ in range(16):
        token = logits.argmax(-1)
        slow.append(int(token))
        logits, state = baseline.step(token, state)
    assert fast == slow
    for weights in ("bf16", "int8", "int4"):
        assert len(generate(with_weights(baseline, weights), prompt, 4, Sampling(greedy=True)).new_tokens) == 4


def test_equal_memory_window_spends_the_converted_state() -> None:
    teacher = tiny_model("llama", seed=4)
    model = convert(copy.deepcopy(teacher), T2RConfig(feature_map="hedgehog", window=8, sinks=2))
    budget = model.init_state(1).nbytes()
    window = equal_memory_window(model, sinks=2)
    shape = model.attentions[0].shape
    size = (2, shape.kv_heads, shape.head_dim)
    assert window_state_bytes(*size, window, 2) <= budget < window_state_bytes(*size, window + 1, 2)
    baseline = sliding_window_baseline(teacher, window, sinks=2)
    assert baseline.init_state(1).nbytes() <= budget
    grows = convert(tiny_model("llama"), T2RConfig(window=8, softmax_layers=(1,)))
    with pytest.raises(UsageError, match="softmax layers"):
        equal_memory_window(grows)


def test_config_refuses_a_baseline_without_window_or_with_forgetting() -> None:
    with pytest.raises(UsageError, match="needs a window"):
        T2RConfig(feature_map="none", window=0)
    with pytest.raises(UsageError, match="linear part"):
        T2RConfig(feature_map="none", window=8, half_life=100)
    assert T2RConfig(feature_map="none", window=8).half_life == 0
