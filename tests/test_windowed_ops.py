"""Hybrid (sliding-window softmax + linear) ops: reference == chunked == recurrent step loop, for
outputs, final state and gradients; and the reference against the formula written out per token."""

from __future__ import annotations

import functools

import pytest
import torch

from t2r.feature_maps import build_feature_map
from t2r.ops.windowed import recurrent_windowed_attention, windowed_attention
from t2r.ops.windowed_chunked import chunked_windowed_attention
from t2r.state import HybridAttentionState, LinearAttentionState
from tests.test_ops import assert_close

B, H, G, D = 2, 4, 2, 12  # GQA: 4 query heads read 2 key/value heads
SCALE = D**-0.5
DECAY = torch.tensor([0.9, 0.7, 0.99, 1.0])  # per head, one of them not forgetting at all


def make_case(length: int, window: int, seed: int = 0):
    """Inputs as the attention module makes them, a non-empty initial state, padding in row 1."""
    generator = torch.Generator().manual_seed(seed)
    phi = build_feature_map("hedgehog", H, D, 6, generator)
    with torch.no_grad():
        for parameter in phi.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.3)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    valid = torch.ones(B, length, dtype=torch.bool)
    valid[1, : length // 3] = False  # left padding
    window_valid = torch.ones(B, window, dtype=torch.bool)
    window_valid[0, :1] = False  # an empty slot, as after fewer than W tokens
    prefix_k = phi(randn(B, H, 5, D)).detach()
    state_parts = [
        torch.einsum("bhtf,bhtd->bhfd", prefix_k, randn(B, H, 5, D)),
        prefix_k.sum(2),
        randn(B, G, window, D),
        randn(B, G, window, D),
        randn(B, G, window, D),
    ]
    tensors = [randn(B, H, length, D), randn(B, G, length, D), randn(B, G, length, D)]
    linear_q, linear_k = randn(B, H, length, D), randn(B, G, length, D)
    share = torch.rand(H, generator=generator) * 0.8 + 0.1
    leaves = [x.clone().requires_grad_(True) for x in [*tensors, linear_q, linear_k, *state_parts, share]]
    return phi, leaves, valid, window_valid


def run(op, case, decay: torch.Tensor | None = None):
    phi, leaves, valid, window_valid = case
    q, k, v, linear_q, linear_k, kv, k_sum, keys, values, linear_keys, share = leaves
    state = HybridAttentionState(LinearAttentionState(kv, k_sum), keys, values, linear_keys, window_valid)
    out, final = op(
        q, k, v, phi(linear_q), linear_k, valid, state, feature_map_k=phi, window_share=share, scale=SCALE, decay=decay
    )
    weights = torch.linspace(-1, 1, out.numel()).view_as(out)
    loss = (out * weights).sum() + final.linear.kv.mean() + (final.linear.k_sum + 1).log().sum()
    loss = loss + (final.keys * 0.5 + final.values * 0.25 + final.linear_keys).sum()
    parameters = list(phi.parameters())
    grads = torch.autograd.grad(loss, [*leaves, *parameters])
    states = [final.linear.kv, final.linear.k_sum, final.keys, final.values, final.linear_keys]
    return out.detach(), [s.detach() for s in states], final.valid, grads


FORMS = {
    "chunked-8": functools.partial(chunked_windowed_attention, chunk_size=8),
    "chunked-64": functools.partial(chunked_windowed_attention, chunk_size=64),
    "recurrent": recurrent_windowed_attention,
}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("window", [1, 4, 64])
@pytest.mark.parametrize("length", [1, 7, 63, 65, 150])
@pytest.mark.parametrize("decay", [None, DECAY], ids=["no-decay", "decay"])
def test_forms_match_reference(form: str, window: int, length: int, decay: torch.Tensor | None) -> None:
    expected = run(windowed_attention, make_case(length, window), decay)
    got = run(FORMS[form], make_case(length, window), decay)
    assert_close(got[0], expected[0], "output")
    for name, a, b in zip(["kv", "k_sum", "keys", "values", "linear_keys"], got[1], expected[1], strict=True):
        assert_close(a, b, f"final {name}")
    assert torch.equal(got[2], expected[2])
    for index, (a, b) in enumerate(zip(got[3], expected[3], strict=True)):
        assert_close(a, b, f"gradient {index}", tolerance=1e-4)


@pytest.mark.parametrize("decay", [None, DECAY], ids=["no-decay", "decay"])
def test_split_sequence_equals_whole(decay: torch.Tensor | None) -> None:
    """Prefill in pieces (chunked, then parallel) carries the window and the linear state exactly."""
    phi, leaves, valid, window_valid = make_case(40, 6)
    q, k, v, linear_q, linear_k, kv, k_sum, keys, values, linear_keys, share = (x.detach() for x in leaves)
    state = HybridAttentionState(LinearAttentionState(kv, k_sum), keys, values, linear_keys, window_valid)
    kwargs = {"feature_map_k": phi, "window_share": share, "scale": SCALE, "decay": decay}
    phi_q = phi(linear_q)
    whole, whole_state = windowed_attention(q, k, v, phi_q, linear_k, valid, state, **kwargs)
    first, middle = chunked_windowed_attention(
        q[:, :, :23], k[:, :, :23], v[:, :, :23], phi_q[:, :, :23], linear_k[:, :, :23], valid[:, :23], state,
        chunk_size=5, **kwargs,
    )  # fmt: skip
    second, end = windowed_attention(
        q[:, :, 23:], k[:, :, 23:], v[:, :, 23:], phi_q[:, :, 23:], linear_k[:, :, 23:], valid[:, 23:], middle,
        **kwargs,
    )  # fmt: skip
    assert_close(torch.cat([first, second], 2).detach(), whole.detach(), "output")
    assert_close(end.linear.kv.detach(), whole_state.linear.kv.detach(), "kv")
    assert_close(end.linear.k_sum.detach(), whole_state.linear.k_sum.detach(), "k_sum")
    assert torch.equal(end.keys, whole_state.keys) and torch.equal(end.valid, whole_state.valid)


@torch.no_grad()
@pytest.mark.parametrize("decay", [None, DECAY], ids=["no-decay", "decay"])
def test_reference_matches_the_formula_token_by_token(decay: torch.Tensor | None) -> None:
    """out_t = (g sum_window a_s v_s + (1-g) sum_older lambda^(t-W-s) l_s v_s) / (the same without v),
    from an empty state, written with Python loops over one head."""
    window, length = 4, 11
    phi, leaves, _, _ = make_case(length, window)
    q, k, v, linear_q, linear_k, *_, share = leaves
    valid = torch.ones(B, length, dtype=torch.bool)
    state = HybridAttentionState.zeros(B, H, G, phi.out_dim, D, window)
    out, _ = windowed_attention(
        q, k, v, phi(linear_q), linear_k, valid, state, feature_map_k=phi, window_share=share, scale=SCALE, decay=decay
    )
    b, h = 1, 1  # head 1 forgets fastest (0.7)
    forget = 1.0 if decay is None else float(decay[h])
    kv_head = h // (H // G)
    for t in range(length):
        in_window = range(max(0, t - window + 1), t + 1)
        peak = max(float(q[b, h, t] @ k[b, kv_head, s]) * SCALE for s in in_window)
        numerator, denominator = torch.zeros(D), 0.0
        for s in range(t + 1):
            if s in in_window:
                weight = share[h] * torch.exp(q[b, h, t] @ k[b, kv_head, s] * SCALE - peak)
            else:
                phi_q = phi(linear_q[b : b + 1, :, t : t + 1])[0, h, 0]
                phi_k = phi(linear_k[b : b + 1, :, s : s + 1].repeat_interleave(H // G, 1))[0, h, 0]
                weight = (1 - share[h]) * (phi_q @ phi_k) * forget ** (t - window - s)
            numerator += weight * v[b, kv_head, s]
            denominator += weight
        assert_close(out[b, h, t], numerator / (denominator + 1e-6), f"token {t}")


@torch.no_grad()
def test_padded_rows_stay_finite_and_padding_is_masked() -> None:
    """A fully padded prefix yields zeros, not NaN; a padded key changes no real token's output."""
    phi, leaves, valid, _ = make_case(20, 4)
    q, k, v, linear_q, linear_k, *_, share = leaves
    state = HybridAttentionState.zeros(B, H, G, phi.out_dim, D, 4)
    kwargs = {"feature_map_k": phi, "window_share": share, "scale": SCALE}
    out, _ = windowed_attention(q, k, v, phi(linear_q), linear_k, valid, state, **kwargs)
    assert torch.isfinite(out).all()
    changed_k = k.clone()
    changed_k[1, :, 0] += 100.0  # a padded slot
    again, _ = windowed_attention(q, changed_k, v, phi(linear_q), linear_k, valid, state, **kwargs)
    assert torch.equal(out[:, :, :][valid[:, None].expand(B, H, 20)], again[valid[:, None].expand(B, H, 20)])
