"""The in-place decode path against the reference `model.step`: logits and state, every family."""

from __future__ import annotations

import pytest
import torch

from t2r.modeling.fast_decode import Decoder, FastState, fast_step
from tests.conftest import FAMILIES, VOCAB
from tests.test_model import (
    ROTARY_FAMILIES,
    SHORT_CONTEXT,
    TOLERANCE,
    converted,
    left_padded_batch,
    state_tensors,
    trained_looking_model,
    with_teacher_context,
)

# bf16 activations (the int8 / int4 kernels) round each projection's input to 8 significant bits:
# two paths whose fp32 inputs differ in the last bits can round apart.
BF16_TOLERANCE = 2e-2
# int4 rounds activations to int8 per block of 32 (one step = max / 127): the reference step and the
# fast step round independently, and a 1e-6 difference in an activation can flip one rounding.
INT4_TOLERANCE = 5e-2


def quantised_tolerance(weights: str) -> float:
    return INT4_TOLERANCE if weights == "int4" else BF16_TOLERANCE


trained_looking = trained_looking_model


def assert_fast_path_matches_reference(
    model: torch.nn.Module, step, steps: int = 12, prefix: int = 17, tolerance: float = TOLERANCE
) -> None:
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
            assert (got - expected).abs().max() <= tolerance
    for a, b in zip(fast.to_model_state().layers, state.layers, strict=True):
        for x, y in zip(state_tensors(a), state_tensors(b), strict=True):
            assert (x - y).abs().max() <= tolerance * max(1.0, y.abs().max().item())
    assert torch.equal(fast.seen, state.seen)


@pytest.mark.parametrize("softmax_layers", [(), (1,)])
@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize("family", FAMILIES)
def test_fast_step_matches_reference_step(family: str, window: int, softmax_layers: tuple[int, ...]) -> None:
    model = converted(family, "hedgehog", tie_qk=False, window=window, softmax_layers=softmax_layers)
    assert_fast_path_matches_reference(trained_looking(model), fast_step)  # 12 steps > window: the ring wraps


@pytest.mark.parametrize("weights", ["fp32", "int4"])
@pytest.mark.parametrize("family", FAMILIES)
def test_fast_step_with_a_linear_state_per_kv_head_matches_reference_step(family: str, weights: str) -> None:
    from t2r.modeling.quantize import with_weights

    torch.manual_seed(0)
    model = trained_looking(converted(family, "hedgehog", tie_qk=False, linear_heads="kv"))
    tolerance = TOLERANCE if weights == "fp32" else quantised_tolerance(weights)
    assert_fast_path_matches_reference(with_weights(model, weights), fast_step, tolerance=tolerance)


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


@pytest.mark.parametrize(
    "settings",
    [dict(window=5), dict(window=5, softmax_layers=(1,)), dict(window=0)],
    ids=["hybrid", "hybrid+softmax-layer", "linear"],
)
@torch.no_grad()
def test_a_row_joins_a_running_batch(settings: dict) -> None:
    """A sequence prefilled alone joins a batch whose ring pointer is elsewhere: every row then
    decodes exactly as it would alone (continuous batching)."""
    model = trained_looking(converted("llama", "hedgehog", tie_qk=False, **settings))
    generator = torch.Generator().manual_seed(3)
    first, second = (
        torch.randint(3, VOCAB, (1, 31), generator=generator),
        torch.randint(3, VOCAB, (1, 19), generator=generator),
    )
    running = FastState.from_model_state(model(first[:, :23], form="chunked")[1])
    for t in range(23, 31):  # the running row moves its ring pointer
        fast_step(model, first[0, t : t + 1], running)
    newcomer = FastState.from_model_state(model(second, form="chunked")[1])
    if settings["window"]:
        assert int(running.next_slot) != int(newcomer.next_slot)
    alone = [FastState.join([running]), FastState.join([newcomer])]
    joined = FastState.join([running, newcomer])
    for _ in range(9):
        tokens = torch.randint(3, VOCAB, (2,), generator=generator)
        expected = torch.cat([fast_step(model, tokens[row : row + 1], alone[row]) for row in range(2)])
        assert (fast_step(model, tokens, joined) - expected).abs().max() <= TOLERANCE


@torch.no_grad()
def test_generate_decodes_what_the_reference_step_decodes() -> None:
    from t2r.inference.generate import generate
    from t2r.inference.sampling import Sampling

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


def test_inductor_step_matches_reference_step() -> None:
    """The path of every headline speed: the fast step compiled by inductor (generated C++ kernels)
    with int4 projections, equal to `model.step` of the same model through a ring wrap. One graph
    (one batch size, one context), so that it compiles once, in the default suite."""
    from t2r.modeling.quantize import with_weights

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = with_weights(trained_looking(converted("llama", "hedgehog", tie_qk=False, window=5)), "int4")
    assert_fast_path_matches_reference(model, Decoder(compile=True), tolerance=BF16_TOLERANCE)


@pytest.mark.parametrize("weights", ["bf16", "int8", "int4"])
def test_smaller_weights_keep_the_fast_path_exact(weights: str) -> None:
    """With bf16, int8 or int4 projections, the fast step still equals the reference step of that
    same model (the state stays fp32); int8 / int4 logits stay close to the fp32 model's."""
    from t2r.modeling.quantize import Int4Linear, Int8Linear, with_weights

    torch.manual_seed(0)
    model = trained_looking(converted("qwen2", "hedgehog", tie_qk=False, window=5))
    smaller = with_weights(model, weights)
    if weights in ("int8", "int4"):
        int4 = [m for m in smaller.modules() if isinstance(m, Int4Linear)]
        int8 = [m for m in smaller.modules() if isinstance(m, Int8Linear)]
        # q/k/v/o + gate/up/down per layer, and the head (8-bit in both formats)
        assert (len(int4), len(int8)) == ((0, 15) if weights == "int8" else (14, 1))
        assert smaller.base.get_output_embeddings() is int8[-1]
        assert_fast_path_matches_reference(smaller, fast_step, tolerance=quantised_tolerance(weights))
        ids, mask = left_padded_batch()
        with torch.no_grad():
            full, _ = model(ids, mask)
            quantised, _ = smaller(ids, mask)
        error = (quantised - full)[mask.bool()].abs().max() / full.abs().max()
        assert error <= (0.05 if weights == "int8" else 0.15)
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


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_gpt2_conv1d_projections_are_quantised_too(weights: str) -> None:
    """GPT-2's projections are transformers `Conv1D` (x @ W, W [in, out]), not nn.Linear: every one
    of them is replaced, and the quantised model still decodes like its reference step and near the
    fp32 logits."""
    from transformers.pytorch_utils import Conv1D

    from t2r.modeling.quantize import Int4Linear, Int8Linear, with_weights

    torch.manual_seed(0)
    model = trained_looking(converted("gpt2", "hedgehog", tie_qk=False, window=5))
    smaller = with_weights(model, weights)
    left = [n for n, m in smaller.named_modules() if isinstance(m, Conv1D | torch.nn.Linear) and "feature_map" not in n]
    assert not left, left
    quantised = [m for m in smaller.modules() if isinstance(m, Int4Linear | Int8Linear)]
    assert len(quantised) == 2 * 4 + 1  # c_attn, c_proj, c_fc, mlp c_proj per layer; the head
    assert_fast_path_matches_reference(smaller, fast_step, tolerance=quantised_tolerance(weights))
    ids, mask = left_padded_batch()
    with torch.no_grad():
        full, _ = model(ids, mask)
        small, _ = smaller(ids, mask)
    assert (small - full)[mask.bool()].abs().max() / full.abs().max() <= (0.05 if weights == "int8" else 0.15)


def test_int8_linear_is_its_dequantised_matrix() -> None:
    from t2r.modeling.quantize import Int8Linear

    linear = torch.nn.Linear(96, 40)
    quantised = Int8Linear(linear)
    x = torch.randn(3, 5, 96)
    dequantised = quantised.weight.float() * quantised.scale[:, None]
    expected = x @ dequantised.T + linear.bias
    assert (quantised(x) - expected).abs().max() <= 0.01 * expected.abs().max()  # bf16 activations
    assert (dequantised - linear.weight).abs().max() <= quantised.scale.max() / 2 + 1e-7


def test_int4_linear_is_its_dequantised_matrix_and_keeps_a_q4_grid() -> None:
    """Blocks of 32 inputs, w = d * q + m (fp16 d and m): within half a 4-bit step of the weight (and
    fp16 rounding); weights that already lie on a Q4_1 grid with fp16 d and m (the GGUF's) come back
    exactly."""
    from t2r.modeling.quantize import Int4Linear

    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 48)
    quantised = Int4Linear(linear)
    x = torch.randn(3, 5, 96)
    dequantised = quantised.dequantised()
    expected = x @ dequantised.T + linear.bias
    assert (quantised(x) - expected).abs().max() <= 0.02 * expected.abs().max()  # int8 activations
    grouped = linear.weight.view(48, 3, 32)
    step = (grouped.amax(-1) - grouped.amin(-1)) / 15
    fp16 = linear.weight.abs().max() / 1024  # d and m in fp16
    assert ((dequantised - linear.weight).abs().view(48, 3, 32) <= step[..., None] / 2 + fp16).all()
    # On a Q4_1 grid (codes 0..15 used in every block, d and m fp16 numbers): nothing is lost.
    codes = torch.randint(0, 16, (48, 3, 32)).float()
    codes[..., 0], codes[..., 1] = 0, 15
    d = (torch.rand(48, 3, 1) * 0.01 + 0.001).half().float()
    m = (torch.randn(48, 3, 1) * 0.05).half().float()
    grid = torch.nn.Linear(96, 48, bias=False)
    grid.weight.data = (codes * d + m).view(48, 96)
    assert torch.equal(Int4Linear(grid).dequantised(), grid.weight.data)


@torch.no_grad()
def test_batched_generation_equals_one_prompt_at_a_time() -> None:
    """Prompts of different lengths decode together (left padding); rows that stop leave the
    batch; every row emits exactly what it emits alone."""
    from t2r.inference.generate import generate, generate_batch
    from t2r.inference.sampling import Sampling

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
    # Timing bookkeeping: 12 tokens of one prompt = 1 from the prefill + 11 decode steps, the first
    # timed apart (a compiled step compiles there): 10 rows decoded after it.
    single = generate(model, prompts[0], 12, Sampling(greedy=True))
    assert single.later_step_rows == 10 and 0 < single.first_step_seconds <= single.decode_seconds
    # A row that stopped decoded its stop token too: n kept tokens took n steps (n - 1 at the budget;
    # none when the prefill gave the stop token).
    steps = [len(r.new_tokens) - (len(r.new_tokens) == 12) for r in batched]
    assert batched[0].later_step_rows == sum(max(n - 1, 0) for n in steps)


def test_compiled_step_is_kept_and_loaded_by_the_next_decoder(tmp_path) -> None:
    """`Decoder(compile=True, artifacts=folder)`: the first decoder compiles the step of batches of
    2 or more ahead of time and keeps it; a second decoder (a fresh compiler, as in a new process)
    loads the file instead of compiling, and it is still exact for a model of other weights (the
    file holds code, not weights) and for a batch of another size (its batch dimension is symbolic);
    a batch of 1 is a class of its own: its step is made and kept beside it, exact too."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = trained_looking(converted("llama", "hedgehog", tie_qk=False, window=5))
    assert_fast_path_matches_reference(model, Decoder(compile=True, backend="aot_eager", artifacts=tmp_path))
    kept = list(tmp_path.iterdir())
    assert len(kept) == 1 and kept[0].suffix == ".pt"
    torch._dynamo.reset()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    loaded = Decoder(compile=True, backend="aot_eager", artifacts=tmp_path)
    assert_fast_path_matches_reference(model, loaded)
    assert list(tmp_path.iterdir()) == kept and loaded._ahead_by_class[True] is not None
    ids, mask = left_padded_batch()
    three_ids, three_mask = torch.cat([ids, ids[:1]]), torch.cat([mask, mask[:1]])
    token = three_ids[:, 20].contiguous()  # as a server's tokens are (the steps were made for such)
    with torch.no_grad():
        _, state = model(three_ids[:, :20], three_mask[:, :20], form="chunked")
        three = FastState.from_model_state(state)
        assert loaded._ahead_by_class[True].guard_check(model, token, three)
        alone = three.select(torch.tensor([1]))
        expected, state = model.step(token, state)
        assert (loaded(model, token, three) - expected).abs().max() <= TOLERANCE
        assert (loaded(model, token[1:2].clone(), alone) - expected[1:2]).abs().max() <= TOLERANCE
    assert len(list(tmp_path.glob("*.pt"))) == 2 and loaded._ahead is not None  # batch 1: kept beside it


def test_a_growing_cache_is_not_compiled_ahead_of_time(tmp_path) -> None:
    """A layer kept as softmax grows its cache every step: no artifact (it would serve one step)."""
    torch._dynamo.reset()
    model = trained_looking(converted("llama", "hedgehog", tie_qk=False, window=5, softmax_layers=(1,)))
    assert_fast_path_matches_reference(model, Decoder(compile=True, backend="aot_eager", artifacts=tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_warm_up_makes_the_step_of_each_batch_class_before_any_request(tmp_path) -> None:
    """A server warms its decoder at start: the step of batch 1 and the step of larger batches are
    made (or loaded) then, and a server of one row needs only the first."""
    torch._dynamo.reset()
    model = trained_looking(converted("llama", "hedgehog", tie_qk=False, window=5))
    Decoder(compile=True, backend="aot_eager", artifacts=tmp_path / "one").warm_up(model, 1)
    assert len(list((tmp_path / "one").glob("*.pt"))) == 1
    decoder = Decoder(compile=True, backend="aot_eager", artifacts=tmp_path / "many")
    decoder.warm_up(model, 8)
    assert len(list((tmp_path / "many").glob("*.pt"))) == 2
    assert decoder._ahead_by_class[False] is not None and decoder._ahead_by_class[True] is not None
    assert_fast_path_matches_reference(model, decoder)  # and the warmed steps decode exactly
    Decoder(compile=False, artifacts=tmp_path / "eager").warm_up(model, 8)  # eager: nothing to make
    assert not (tmp_path / "eager").exists()
