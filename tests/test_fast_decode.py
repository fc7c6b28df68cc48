"""The in-place decode path against the reference `model.step`: logits and state, every family."""

from __future__ import annotations

import pytest
import torch

from t2r.fast_decode import FastState, fast_step
from tests.conftest import FAMILIES, VOCAB
from tests.test_model import TOLERANCE, converted, left_padded_batch, state_tensors


@pytest.mark.parametrize("softmax_layers", [(), (1,)])
@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_fast_step_matches_reference_step(family: str, window: int, softmax_layers: tuple[int, ...]) -> None:
    model = converted(family, "hedgehog", tie_qk=False, window=window, softmax_layers=softmax_layers)
    for parameter in model.parameters():  # trained-looking maps and shares, not the identity init
        parameter.add_(torch.randn_like(parameter) * 0.02)
    ids, mask = left_padded_batch()
    _, state = model(ids[:, :17], mask[:, :17], form="chunked")
    fast = FastState.from_model_state(state)
    generator = torch.Generator().manual_seed(5)
    for _ in range(12):  # more steps than the window: the ring wraps around
        token = torch.randint(3, VOCAB, (2,), generator=generator)
        expected, state = model.step(token, state)
        got = fast_step(model, token, fast)
        assert (got - expected).abs().max() <= TOLERANCE
    for a, b in zip(fast.to_model_state().layers, state.layers, strict=True):
        for x, y in zip(state_tensors(a), state_tensors(b), strict=True):
            assert (x - y).abs().max() <= TOLERANCE * max(1.0, y.abs().max().item())
    assert torch.equal(fast.seen, state.seen)


@torch.no_grad()
def test_rows_leave_the_batch() -> None:
    """Dropping a finished row leaves the others decoding exactly as before."""
    model = converted("llama", "hedgehog", tie_qk=False, window=5)
    ids, mask = left_padded_batch()
    _, state = model(ids[:, :20], mask[:, :20], form="chunked")
    fast = FastState.from_model_state(state)
    fast_step(model, ids[:, 20], fast)
    alone = fast.select(torch.tensor([1]))
    for t in range(21, 30):
        got = fast_step(model, ids[1:, t], alone)
        expected = fast_step(model, ids[:, t], fast)[1:]
        assert (got - expected).abs().max() <= TOLERANCE


@torch.no_grad()
def test_generate_decodes_what_the_reference_step_decodes() -> None:
    from t2r.generate import Sampling, generate

    model = converted("qwen2", "hedgehog", tie_qk=False, window=5)
    for parameter in model.parameters():
        parameter.add_(torch.randn_like(parameter) * 0.02)
    prompt = torch.randint(3, VOCAB, (9,), generator=torch.Generator().manual_seed(3))
    result = generate(model, prompt, 20, Sampling(greedy=True))
    logits, state = model(prompt[None])
    tokens = []
    token = logits[:, -1].argmax(-1)
    for _ in range(20):
        tokens.append(int(token))
        step_logits, state = model.step(token, state)
        token = step_logits.argmax(-1)
    assert result.new_tokens == tokens
    assert result.state_bytes == model.init_state(1).nbytes()
