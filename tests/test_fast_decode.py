"""The in-place decode path against the reference `model.step`: logits and state, every family."""

from __future__ import annotations

import pytest
import torch

from t2r.fast_decode import Decoder, FastState, fast_step
from tests.conftest import FAMILIES, VOCAB
from tests.test_model import (
    ROTARY_FAMILIES,
    SHORT_CONTEXT,
    TOLERANCE,
    converted,
    left_padded_batch,
    state_tensors,
    with_teacher_context,
)


def trained_looking(model: torch.nn.Module) -> torch.nn.Module:
    """Perturb every parameter: maps and shares that are not the identity init."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    return model


def assert_fast_path_matches_reference(model: torch.nn.Module, step, steps: int = 12, prefix: int = 17) -> None:
    """`step(model, ids, fast_state)` against `model.step` from a prefilled, left-padded batch.

    The padded row has prefix - 13 real tokens: 17 fills the tiny models' 3 sinks in the prefill."""
    ids, mask = left_padded_batch()
    with torch.no_grad():
        _, state = model(ids[:, :prefix], mask[:, :prefix], form="chunked")
        fast = FastState.from_model_state(state)
        generator = torch.Generator().manual_seed(5)
        for _ in range(steps):
            token = torch.randint(3, VOCAB, (2,), generator=generator)
            expected, state = model.step(token, state)
            got = step(model, token, fast)
            assert (got - expected).abs().max() <= TOLERANCE
    for a, b in zip(fast.to_model_state().layers, state.layers, strict=True):
        for x, y in zip(state_tensors(a), state_tensors(b), strict=True):
            assert (x - y).abs().max() <= TOLERANCE * max(1.0, y.abs().max().item())
    assert torch.equal(fast.seen, state.seen)


@pytest.mark.parametrize("softmax_layers", [(), (1,)])
@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize("family", FAMILIES)
def test_fast_step_matches_reference_step(family: str, window: int, softmax_layers: tuple[int, ...]) -> None:
    model = converted(family, "hedgehog", tie_qk=False, window=window, softmax_layers=softmax_layers)
    assert_fast_path_matches_reference(trained_looking(model), fast_step)  # 12 steps > window: the ring wraps


def test_fast_step_fills_the_sinks_a_short_prompt_left_empty() -> None:
    """Row 1 has one real token after the prefill: its next two tokens become sinks in the fast step."""
    model = trained_looking(converted("llama", "hedgehog", tie_qk=False, window=5))
    assert_fast_path_matches_reference(model, fast_step, prefix=14)


@pytest.mark.parametrize("family", ROTARY_FAMILIES)
def test_fast_step_crosses_the_teacher_context(family: str) -> None:
    """Row 0 goes from position 17 to 29 past a context of 24: the sinks' capped scores switch on."""
    model = with_teacher_context(trained_looking(converted(family, "hedgehog", tie_qk=False)), SHORT_CONTEXT)
    assert_fast_path_matches_reference(model, fast_step)


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


@pytest.mark.parametrize(
    "backend",
    [
        "aot_eager",  # the captured, functionalised graph, run eagerly: seconds
        pytest.param("inductor", marks=pytest.mark.slow),  # generated C++ kernels: minutes cold
    ],
)
def test_compiled_step_matches_reference_step(backend: str) -> None:
    """torch.compile of the fast step: same logits and state as `model.step`, through a ring wrap
    and a batch that shrinks (the recompile for a new batch size)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = trained_looking(converted("llama", "hedgehog", tie_qk=False, window=5))
    decoder = Decoder(compile=True, backend=backend)
    assert_fast_path_matches_reference(model, decoder)
    # Crossing the teacher's context mid-decode: the step specialises again, still exact.
    assert_fast_path_matches_reference(with_teacher_context(model, SHORT_CONTEXT), decoder)
    ids, mask = left_padded_batch()
    with torch.no_grad():
        _, state = model(ids[:, :20], mask[:, :20], form="chunked")
        alone = FastState.from_model_state(state).select(torch.tensor([1]))
        for t in range(20, 27):
            expected, state = model.step(ids[:, t], state)
            assert (decoder(model, ids[1:, t], alone) - expected[1:]).abs().max() <= TOLERANCE


@pytest.mark.parametrize("weights", ["bf16", "int8"])
def test_smaller_weights_keep_the_fast_path_exact(weights: str) -> None:
    """With bf16 or int8 projections, the fast step still equals the reference step of that same
    model (the state stays fp32); int8 logits stay close to the fp32 model's."""
    from t2r.quantize import Int8Linear, with_weights

    torch.manual_seed(0)
    model = trained_looking(converted("qwen2", "hedgehog", tie_qk=False, window=5))
    smaller = with_weights(model, weights)
    if weights == "int8":
        linears = [m for m in smaller.modules() if isinstance(m, Int8Linear)]
        assert len(linears) == 2 * 4 + 2 * 3 + 1  # q/k/v/o + gate/up/down per layer, and the head
        assert_fast_path_matches_reference(smaller, fast_step)
        ids, mask = left_padded_batch()
        with torch.no_grad():
            full, _ = model(ids, mask)
            quantised, _ = smaller(ids, mask)
        assert (quantised - full)[mask.bool()].abs().max() <= 0.05 * full.abs().max()
    else:
        ids, mask = left_padded_batch()
        with torch.no_grad():
            _, state = smaller(ids[:, :17], mask[:, :17], form="chunked")
            fast = FastState.from_model_state(state)
            for t in range(17, 29):
                expected, state = smaller.step(ids[:, t], state)
                got = fast_step(smaller, ids[:, t], fast)
                assert (got.float() - expected.float()).abs().max() <= 0.05 * expected.float().abs().max()
        assert all(layer.kv.dtype == torch.float32 for layer in fast.layers)


def test_int8_linear_is_its_dequantised_matrix() -> None:
    from t2r.quantize import Int8Linear

    linear = torch.nn.Linear(96, 40)
    quantised = Int8Linear(linear)
    x = torch.randn(3, 5, 96)
    dequantised = quantised.weight.float() * quantised.scale[:, None]
    expected = x @ dequantised.T + linear.bias
    assert (quantised(x) - expected).abs().max() <= 1e-4
    assert (dequantised - linear.weight).abs().max() <= quantised.scale.max() / 2 + 1e-7


@torch.no_grad()
def test_batched_generation_equals_one_prompt_at_a_time() -> None:
    """Prompts of different lengths decode together (left padding); rows that stop leave the
    batch; every row emits exactly what it emits alone."""
    from t2r.generate import Sampling, generate, generate_batch

    torch.manual_seed(0)
    model = trained_looking(converted("llama", "hedgehog", tie_qk=False, window=5))
    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, VOCAB, (n,), generator=generator) for n in (9, 4, 15)]
    alone = [generate(model, p, 12, Sampling(greedy=True)).new_tokens for p in prompts]
    stop = frozenset({alone[1][5]})  # row 1 stops early (at its first occurrence of that token)
    batched = generate_batch(model, prompts, 12, Sampling(greedy=True), stop_ids=stop)
    for tokens, result in zip(alone, batched, strict=True):
        expected = tokens[: tokens.index(next(iter(stop)))] if next(iter(stop)) in tokens else tokens
        assert result.new_tokens == expected
    assert len(batched[1].new_tokens) <= 5
