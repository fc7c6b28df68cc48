"""Hybrid (sliding-window softmax + linear) ops: reference == chunked == recurrent step loop, for
outputs, final state and gradients; and the reference against the formula written out per token."""

from __future__ import annotations

import functools

import pytest
import torch

from t2r.modeling.feature_maps import build_feature_map, map_query_heads
from t2r.ops.state import HybridAttentionState, LinearAttentionState, RingWindow
from t2r.ops.windowed import repeat_heads, windowed_attention
from t2r.ops.windowed_chunked import chunked_windowed_attention
from t2r.ops.windowed_ring import windowed_ring_step_
from t2r.ops.windowed_step import recurrent_windowed_attention
from tests.test_ops import assert_close

B, H, G, D = 2, 4, 2, 12  # GQA: 4 query heads read 2 key/value heads
SCALE = D**-0.5
DECAY = torch.tensor([0.9, 0.7, 0.99, 1.0])  # per head, one of them not forgetting at all
# The linear state per query head (L = H, DECAY per head) or per key/value head (L = G).
LINEAR_HEADS = {"query": (H, DECAY), "kv": (G, torch.tensor([0.7, 1.0]))}


def make_case(length: int, window: int, seed: int = 0, sinks: int = 0, linear_heads: str = "query"):
    """Inputs as the attention module makes them, a non-empty initial state, padding in row 1.

    With sinks, row 0 already holds one sink and row 1 none: the new tokens fill the rest (in row 1
    after its padding). linear_heads "kv": the feature map and the linear state have G heads."""
    generator = torch.Generator().manual_seed(seed)
    heads = LINEAR_HEADS[linear_heads][0]
    phi = build_feature_map("hedgehog", heads, D, 6, generator)
    with torch.no_grad():
        for parameter in phi.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.3)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    valid = torch.ones(B, length, dtype=torch.bool)
    valid[1, : length // 3] = False  # left padding
    window_valid = torch.ones(B, window, dtype=torch.bool)
    window_valid[0, :1] = False  # an empty slot, as after fewer than W tokens
    prefix_k = phi(randn(B, heads, 5, D)).detach()
    state_parts = [
        torch.einsum("bhtf,bhtd->bhfd", prefix_k, randn(B, heads, 5, D)),
        prefix_k.sum(2),
        randn(B, G, window, D),
        randn(B, G, window, D),
        randn(B, G, window, D),
        randn(B, G, sinks, D),
        randn(B, G, sinks, D),
    ]
    sink_valid = torch.zeros(B, sinks, dtype=torch.bool)
    sink_valid[0, :1] = True
    with torch.no_grad():  # an empty sink slot holds zeros (the ops add the new sinks into it)
        for part in state_parts[-2:]:
            part.mul_(sink_valid[:, None, :, None])
    tensors = [randn(B, H, length, D), randn(B, G, length, D), randn(B, G, length, D)]
    linear_q, linear_k = randn(B, H, length, D), randn(B, G, length, D)
    share = torch.rand(H, generator=generator) * 0.8 + 0.1
    leaves = [x.clone().requires_grad_(True) for x in [*tensors, linear_q, linear_k, *state_parts, share]]
    return phi, leaves, valid, (window_valid, sink_valid)


def initial_state(leaves, valids) -> HybridAttentionState:
    kv, k_sum, keys, values, linear_keys, sink_keys, sink_values = leaves[5:12]
    window_valid, sink_valid = valids
    no_cache = keys[:, :, :0].detach()  # no global cache (tests/test_global_cache.py has them)
    return HybridAttentionState(
        LinearAttentionState(kv, k_sum), keys, values, linear_keys, window_valid, sink_keys, sink_values, sink_valid,
        no_cache, no_cache, no_cache, window_valid[:, :0],
    )  # fmt: skip


def run(op, case, decay: torch.Tensor | None = None):
    phi, leaves, valid, valids = case
    q, k, v, linear_q, linear_k, *_, share = leaves
    state = initial_state(leaves, valids)
    out, final = op(
        q, k, v, map_query_heads(phi, linear_q), linear_k, valid, state,
        feature_map_k=phi, window_share=share, scale=SCALE, decay=decay,
    )  # fmt: skip
    weights = torch.linspace(-1, 1, out.numel()).view_as(out)
    loss = (out * weights).sum() + final.linear.kv.mean() + (final.linear.k_sum + 1).log().sum()
    loss = loss + (final.keys * 0.5 + final.values * 0.25 + final.linear_keys).sum()
    loss = loss + (final.sink_keys * 0.3 - final.sink_values * 0.7).sum()
    parameters = list(phi.parameters())
    grads = torch.autograd.grad(loss, [*leaves, *parameters], allow_unused=True, materialize_grads=True)
    states = [final.linear.kv, final.linear.k_sum, final.keys, final.values, final.linear_keys]
    states += [final.sink_keys, final.sink_values]
    return out.detach(), [s.detach() for s in states], (final.valid, final.sink_valid), grads


FORMS = {
    "chunked-8": functools.partial(chunked_windowed_attention, chunk_size=8),
    "chunked-64": functools.partial(chunked_windowed_attention, chunk_size=64),
    "recurrent": recurrent_windowed_attention,
}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("window", [1, 4, 64])
@pytest.mark.parametrize("length", [0, 1, 7, 63, 65, 150])
@pytest.mark.parametrize("decay", [False, True], ids=["no-decay", "decay"])
@pytest.mark.parametrize("sinks", [0, 3], ids=["no-sinks", "sinks"])
@pytest.mark.parametrize("linear_heads", LINEAR_HEADS)
def test_forms_match_reference(form: str, window: int, length: int, decay: bool, sinks: int, linear_heads: str) -> None:
    rates = LINEAR_HEADS[linear_heads][1] if decay else None
    expected = run(windowed_attention, make_case(length, window, sinks=sinks, linear_heads=linear_heads), rates)
    got = run(FORMS[form], make_case(length, window, sinks=sinks, linear_heads=linear_heads), rates)
    assert_close(got[0], expected[0], "output")
    names = ["kv", "k_sum", "keys", "values", "linear_keys", "sink_keys", "sink_values"]
    for name, a, b in zip(names, got[1], expected[1], strict=True):
        assert_close(a, b, f"final {name}")
    assert all(torch.equal(a, b) for a, b in zip(got[2], expected[2], strict=True))
    for index, (a, b) in enumerate(zip(got[3], expected[3], strict=True)):
        assert_close(a, b, f"gradient {index}", tolerance=1e-4)


def test_the_chunked_form_goes_parallel_where_its_scores_are_no_larger(monkeypatch) -> None:
    """ops.dispatch: a hybrid input whose parallel scores, T x (W + T), are no larger than the
    chunked blocks, ceil(T / C) x C x (C + W), goes through the parallel form (the same maths in
    fewer operations, within the chunked form's memory bound); a longer one is chunked. C = 8,
    W = 4: 12 tokens (12 x 16 = 192 <= 2 x 8 x 12 = 192) parallel, 13 (221 > 192) chunked."""
    import t2r.ops.dispatch as dispatch

    parallel_calls = []

    def spy(*args, **kwargs):
        parallel_calls.append(args[0].shape[2])
        return windowed_attention(*args, **kwargs)

    monkeypatch.setattr(dispatch, "windowed_attention", spy)
    op = dispatch.attention_op("chunked", 8, hybrid=True)
    for length, expected_op in ((8, windowed_attention), (12, windowed_attention), (13, FORMS["chunked-8"])):
        got = run(op, make_case(length, 4, sinks=3), DECAY)
        expected = run(expected_op, make_case(length, 4, sinks=3), DECAY)
        assert torch.equal(got[0], expected[0])
        assert all(torch.equal(a, b) for a, b in zip(got[1], expected[1], strict=True))
    assert parallel_calls == [8, 12]


@pytest.mark.parametrize("empty", [2, 6], ids=["some-empty", "all-empty"])
@pytest.mark.parametrize("length", [1, 5, 9])
@pytest.mark.parametrize("decay", [False, True], ids=["no-decay", "decay"])
@pytest.mark.parametrize("linear_heads", LINEAR_HEADS)
def test_skipping_the_empty_window_slots_changes_nothing(
    empty: int, length: int, decay: bool, linear_heads: str
) -> None:
    """skip_empty leaves the window's leading slots that are empty in every row out of the scores:
    outputs, final state and gradients as without it (the skipped slots added exact zeros; only
    the sums' lengths differ, so the tolerance is the ops' own). Window 6, sinks, padding in row 1;
    a final window that still holds skipped slots (length 1) and one that does not (length 9)."""
    rates = LINEAR_HEADS[linear_heads][1] if decay else None

    def case():
        phi, leaves, valid, (window_valid, sink_valid) = make_case(length, 6, sinks=3, linear_heads=linear_heads)
        window_valid[:, :empty] = False
        return phi, leaves, valid, (window_valid, sink_valid)

    expected = run(windowed_attention, case(), rates)
    got = run(functools.partial(windowed_attention, skip_empty=True), case(), rates)
    assert_close(got[0], expected[0], "output")
    for index, (a, b) in enumerate(zip(got[1], expected[1], strict=True)):
        assert_close(a, b, f"final state {index}")
    assert all(torch.equal(a, b) for a, b in zip(got[2], expected[2], strict=True))
    for index, (a, b) in enumerate(zip(got[3], expected[3], strict=True)):
        assert_close(a, b, f"gradient {index}", tolerance=1e-4)


@pytest.mark.parametrize("op", [windowed_attention, *FORMS.values()])
def test_an_empty_sequence_returns_no_output_and_the_state_it_was_given(op) -> None:
    phi, leaves, valid, valids = make_case(0, 4, sinks=3)
    q, k, v, linear_q, linear_k, *_, share = (x.detach() for x in leaves)
    state = initial_state([x.detach() for x in leaves], valids)
    out, final = op(
        q, k, v, phi(linear_q), linear_k, valid, state, feature_map_k=phi, window_share=share, scale=SCALE, decay=DECAY
    )
    assert out.shape == (B, H, 0, D)
    for name in ("keys", "values", "linear_keys", "valid", "sink_keys", "sink_values", "sink_valid"):
        assert torch.equal(getattr(final, name), getattr(state, name)), name
    assert torch.equal(final.linear.kv, state.linear.kv) and torch.equal(final.linear.k_sum, state.linear.k_sum)


@pytest.mark.parametrize("decay", [None, DECAY], ids=["no-decay", "decay"])
@pytest.mark.parametrize("sinks", [0, 3], ids=["no-sinks", "sinks"])
def test_split_sequence_equals_whole(decay: torch.Tensor | None, sinks: int) -> None:
    """Prefill in pieces (chunked, then parallel) carries the window, sinks and linear state exactly."""
    phi, leaves, valid, valids = make_case(40, 6, sinks=sinks)
    leaves = [x.detach() for x in leaves]
    q, k, v, linear_q, linear_k, *_, share = leaves
    state = initial_state(leaves, valids)
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
    assert_close(end.sink_keys, whole_state.sink_keys, "sink keys")
    assert torch.equal(end.sink_valid, whole_state.sink_valid)


@torch.no_grad()
@pytest.mark.parametrize("decay", [False, True], ids=["no-decay", "decay"])
@pytest.mark.parametrize("sinks", [0, 2], ids=["no-sinks", "sinks"])
@pytest.mark.parametrize("linear_heads", LINEAR_HEADS)
def test_reference_matches_the_formula_token_by_token(decay: bool, sinks: int, linear_heads: str) -> None:
    """out_t = (g sum_soft a_s v_s + (1-g) sum_older lambda^(t-W-s) l_s v_s) / (the same without v),
    soft = the window and the first `sinks` tokens, from an empty state, written with Python loops
    over one head; with a linear state per key/value head, phi of query head h and of its keys is
    map head h // (H / G)."""
    window, length = 4, 11
    heads, rates = LINEAR_HEADS[linear_heads]
    rates = rates if decay else None
    phi, leaves, _, _ = make_case(length, window, linear_heads=linear_heads)
    q, k, v, linear_q, linear_k, *_, share = leaves
    valid = torch.ones(B, length, dtype=torch.bool)
    state = HybridAttentionState.zeros(B, heads, G, phi.out_dim, D, window, sinks=sinks)
    out, _ = windowed_attention(
        q, k, v, map_query_heads(phi, linear_q), linear_k, valid, state,
        feature_map_k=phi, window_share=share, scale=SCALE, decay=rates,
    )  # fmt: skip
    b, h = 1, 1  # head 1 forgets fastest (0.7; its map and state are head 0's with L = G)
    map_head = h // (H // heads)
    forget = 1.0 if rates is None else float(rates[map_head])
    kv_head = h // (H // G)
    for t in range(length):
        in_softmax = set(range(max(0, t - window + 1), t + 1)) | set(range(min(sinks, t + 1)))
        peak = max(float(q[b, h, t] @ k[b, kv_head, s]) * SCALE for s in in_softmax)
        numerator, denominator = torch.zeros(D), 0.0
        for s in range(t + 1):
            if s in in_softmax:
                weight = share[h] * torch.exp(q[b, h, t] @ k[b, kv_head, s] * SCALE - peak)
            else:
                query = linear_q[b : b + 1, h : h + 1, t : t + 1].expand(1, heads, 1, D)
                phi_q = phi(query)[0, map_head, 0]
                phi_k = phi(linear_k[b : b + 1, :, s : s + 1].repeat_interleave(heads // G, 1))[0, map_head, 0]
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


@pytest.mark.parametrize("op", [windowed_attention, *FORMS.values()])
def test_the_softmax_stabiliser_covers_the_sinks(op) -> None:
    """Sink scores hundreds above every window score (the teacher's attention sinks, exaggerated):
    one stabiliser over the window and the sinks keeps every weight finite; a window-only maximum
    would overflow exp() to inf and the output to NaN."""
    phi, leaves, valid, valids = make_case(20, 4, sinks=3)
    q, k, v, linear_q, linear_k, kv, k_sum, keys, values, window_keys, sink_keys, sink_values, share = (
        x.detach() for x in leaves
    )
    direction = torch.nn.functional.normalize(torch.ones(D), dim=0)
    q = q + 5 * direction  # every query leans one way, and the sink keys point that way, far out
    sink_keys = (200 * direction).expand(B, G, 3, D).clone()
    state = initial_state([q, k, v, linear_q, linear_k, kv, k_sum, keys, values, window_keys, sink_keys,
                           sink_values, share], valids)  # fmt: skip
    sink_scores = torch.einsum("bhtd,bhsd->bhts", q, repeat_heads(sink_keys, H)) * SCALE
    new_scores = torch.einsum("bhtd,bhsd->bhts", q, repeat_heads(k, H)) * SCALE
    assert (sink_scores[0, :, :, 0] - new_scores[0].amax(-1)).min() > 100  # exp(100) overflows fp32
    out, _ = op(q, k, v, phi(linear_q), linear_k, valid, state, feature_map_k=phi, window_share=share, scale=SCALE)
    expected, _ = windowed_attention(
        q, k, v, phi(linear_q), linear_k, valid, state, feature_map_k=phi, window_share=share, scale=SCALE
    )
    assert torch.isfinite(out).all() and torch.isfinite(expected).all()
    assert_close(out, expected, "output", tolerance=1e-4)  # scores in the hundreds: rounding grows


@pytest.mark.parametrize("window", [1, 4])
@pytest.mark.parametrize("decay", [False, True], ids=["no-decay", "decay"])
@pytest.mark.parametrize("sinks", [0, 3], ids=["no-sinks", "sinks"])
@pytest.mark.parametrize("linear_heads", LINEAR_HEADS)
def test_the_in_place_ring_step_matches_the_reference(window: int, decay: bool, sinks: int, linear_heads: str) -> None:
    """The decode path's form (`ops.windowed_ring`: a ring buffer written in place, token by token)
    against the parallel reference: every output and the final state, with sink queries of their own
    and soft-capping."""
    rates = LINEAR_HEADS[linear_heads][1] if decay else None
    length = 11
    phi, leaves, _, valids = make_case(length, window, sinks=sinks, linear_heads=linear_heads)
    q, k, v, linear_q, linear_k, *_, share = (x.detach() for x in leaves)
    valid = torch.ones(B, length, dtype=torch.bool)  # decoding: every new token is real
    sink_q = torch.randn(q.shape, generator=torch.Generator().manual_seed(9))
    settings = dict(feature_map_k=phi, window_share=share, scale=SCALE, decay=rates, softcap=5.0)
    with torch.no_grad():
        phi_q = map_query_heads(phi, linear_q)
        expected, final = windowed_attention(
            q, k, v, phi_q, linear_k, valid, initial_state(leaves, valids), sink_queries=sink_q, **settings
        )
        ring = RingWindow.from_hybrid(initial_state([x.detach() for x in leaves], valids))
        outputs = []
        for t in range(length):
            slot = torch.tensor([t % window])
            outputs.append(windowed_ring_step_(
                q[:, :, t], k[:, :, t], v[:, :, t], phi_q[:, :, t], linear_k[:, :, t], ring, slot,
                sink_queries=sink_q[:, :, t], **settings,
            ))  # fmt: skip
    assert_close(torch.stack(outputs, dim=2), expected, "output")  # TOLERANCE: 1e-5 of values of order 1
    got = ring.to_hybrid(length)
    for name in ("keys", "values", "linear_keys", "sink_keys", "sink_values"):
        assert_close(getattr(got, name), getattr(final, name), f"final {name}")
    assert_close(got.linear.kv, final.linear.kv, "final kv")
    assert_close(got.linear.k_sum, final.linear.k_sum, "final k_sum")
    assert torch.equal(got.valid, final.valid) and torch.equal(got.sink_valid, final.sink_valid)
