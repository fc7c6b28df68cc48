"""Op level: reference (parallel) == chunked == recurrent, for outputs, final state and gradients."""

from __future__ import annotations

import pytest
import torch

from t2r.modeling.feature_maps import build_feature_map
from t2r.ops.chunked import chunked_linear_attention
from t2r.ops.reference import causal_linear_attention, linear_attention_step, recurrent_linear_attention
from t2r.ops.state import LinearAttentionState

B, H, D = 2, 3, 16
# Relative to max(1, |expected|): the ops sum O(T) products of O(1) values in fp32 (rounding ~1e-7
# per term); 1e-5 is 100x a 64-term sum's worst case and still catches a wrong mask or decay (>= 1e-2).
TOLERANCE = 1e-5


def inputs(length: int, feature_map: str, seed: int = 0):
    """Feature-mapped q, k (as the model makes them), v and a non-empty initial state; all leaves."""
    generator = torch.Generator().manual_seed(seed)
    phi = build_feature_map(feature_map, H, D, None, generator)
    q = torch.randn(B, H, length, D, generator=generator)
    k = torch.randn(B, H, length, D, generator=generator)
    v = torch.randn(B, H, length, D, generator=generator)
    with torch.no_grad():
        phi_q, phi_k = phi(q), phi(k)
        prefix_k = phi(torch.randn(B, H, 5, D, generator=generator))
    prefix_v = torch.randn(B, H, 5, D, generator=generator)
    state = LinearAttentionState(kv=torch.einsum("bhtf,bhtd->bhfd", prefix_k, prefix_v), k_sum=prefix_k.sum(2))
    leaves = [x.clone().requires_grad_(True) for x in (phi_q, phi_k, v, state.kv, state.k_sum)]
    return leaves


def run(op, leaves, **kwargs):
    q, k, v, kv, k_sum = leaves
    out, final = op(q, k, v, initial_state=LinearAttentionState(kv, k_sum), **kwargs)
    # A loss that touches the output and both parts of the final state.
    weights = torch.linspace(-1, 1, out.numel()).view_as(out)
    loss = (out * weights).sum() + final.kv.mean() + (final.k_sum + 1).log().sum()
    grads = torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)  # T = 0: q, k, v unused
    return out.detach(), final, grads


def assert_close(a: torch.Tensor, b: torch.Tensor, what: str, tolerance: float = TOLERANCE) -> None:
    """max-abs <= tolerance, on values scaled so that the largest reference entry is at most 1.

    Outputs are convex mixtures of v (order 1), so for them this is a plain max-abs. States are sums
    over T tokens and reach the hundreds, where one fp32 rounding step is already ~3e-5: those are
    compared after dividing by their largest entry.
    """
    assert a.shape == b.shape, f"{what}: shapes {tuple(a.shape)} and {tuple(b.shape)}"
    if b.numel() == 0:  # e.g. the sink slots of a model without sinks
        return
    scale = max(1.0, b.abs().max().item())
    error = (a - b).abs().max().item() / scale
    assert error <= tolerance, f"{what}: scaled max-abs {error:.3g} (largest value {scale:.3g})"


FORMS = {
    "chunked-16": lambda q, k, v, **kw: chunked_linear_attention(q, k, v, chunk_size=16, **kw),
    "chunked-50": lambda q, k, v, **kw: chunked_linear_attention(q, k, v, chunk_size=50, **kw),
    "chunked-64": lambda q, k, v, **kw: chunked_linear_attention(q, k, v, chunk_size=64, **kw),
    "recurrent": recurrent_linear_attention,
}


@pytest.mark.parametrize("feature_map", ["elu", "rfa", "t2r", "hedgehog"])
@pytest.mark.parametrize("length", [0, 1, 7, 63, 64, 65, 300])
def test_forms_match_reference(feature_map: str, length: int) -> None:
    leaves = inputs(length, feature_map)
    ref_out, ref_state, ref_grads = run(causal_linear_attention, leaves)
    for name, op in FORMS.items():
        out, state, grads = run(op, leaves)
        assert_close(out, ref_out, f"{name} output")
        assert_close(state.kv, ref_state.kv, f"{name} final kv")
        assert_close(state.k_sum, ref_state.k_sum, f"{name} final k_sum")
        for grad, ref_grad, leaf in zip(grads, ref_grads, ["q", "k", "v", "kv0", "k_sum0"], strict=True):
            assert_close(grad, ref_grad, f"{name} grad {leaf}")


@pytest.mark.parametrize("op", [causal_linear_attention, *FORMS.values()])
def test_an_empty_sequence_returns_no_output_and_the_state_it_was_given(op) -> None:
    q, k, v, kv0, k_sum0 = (x.detach() for x in inputs(0, "t2r"))
    out, state = op(q, k, v, initial_state=LinearAttentionState(kv0, k_sum0))
    assert out.shape == (*v.shape[:2], 0, v.shape[-1]) and out.dtype == v.dtype
    assert torch.equal(state.kv, kv0) and torch.equal(state.k_sum, k_sum0)


def test_reference_matches_softmax_free_definition() -> None:
    """The parallel reference against the formula written as a double loop, with an initial state."""
    q, k, v, kv0, k_sum0 = (x.detach() for x in inputs(9, "t2r"))
    out, _ = causal_linear_attention(q, k, v, LinearAttentionState(kv0, k_sum0))
    expected = torch.empty_like(out)
    for t in range(9):
        numerator = torch.einsum("bhf,bhfd->bhd", q[:, :, t], kv0)
        denominator = torch.einsum("bhf,bhf->bh", q[:, :, t], k_sum0)
        for s in range(t + 1):
            weight = (q[:, :, t] * k[:, :, s]).sum(-1)
            numerator = numerator + weight[..., None] * v[:, :, s]
            denominator = denominator + weight
        expected[:, :, t] = numerator / (denominator[..., None] + 1e-6)
    assert_close(out, expected, "reference vs loop")


def test_split_sequence_equals_whole() -> None:
    """Prefill in two pieces through the state == one pass (the state carries everything)."""
    q, k, v, kv0, k_sum0 = (x.detach() for x in inputs(100, "hedgehog"))
    state = LinearAttentionState(kv0, k_sum0)
    whole, final = chunked_linear_attention(q, k, v, state, chunk_size=32)
    first, middle = chunked_linear_attention(q[:, :, :37], k[:, :, :37], v[:, :, :37], state, chunk_size=32)
    second, final2 = causal_linear_attention(q[:, :, 37:], k[:, :, 37:], v[:, :, 37:], middle)
    assert_close(torch.cat([first, second], 2), whole, "split output")
    assert_close(final2.kv, final.kv, "split state")


def test_zero_denominator_gives_zero_not_nan() -> None:
    """All-zero features (e.g. relu of a padded or dead key) give output 0, never 0/0 or inf."""
    q = torch.zeros(1, 1, 4, 8)
    k = torch.zeros(1, 1, 4, 8)
    v = torch.randn(1, 1, 4, 8)
    for op in (causal_linear_attention, chunked_linear_attention, recurrent_linear_attention):
        out, state = op(q, k, v)
        assert torch.isfinite(out).all() and (out == 0).all()
    state = LinearAttentionState.zeros(1, 1, 8, 8)
    out, _ = linear_attention_step(torch.zeros(1, 1, 8), torch.zeros(1, 1, 8), torch.ones(1, 1, 8), state)
    assert (out == 0).all()


def test_half_precision_inputs_accumulate_in_fp32() -> None:
    q, k, v, kv0, k_sum0 = (x.detach() for x in inputs(70, "elu"))
    ref_out, _ = causal_linear_attention(q, k, v, LinearAttentionState(kv0, k_sum0))
    out, state = chunked_linear_attention(
        q.bfloat16(), k.bfloat16(), v.bfloat16(), LinearAttentionState(kv0, k_sum0), chunk_size=16
    )
    assert out.dtype == torch.bfloat16 and state.kv.dtype == torch.float32
    assert_close(out.float(), ref_out, "bf16 output", tolerance=5e-2)
