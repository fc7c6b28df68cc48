"""A global cache chosen by the prompt's last queries (t2r.ops.global_select, SnapKV): the scores
and the state written out per row and head, the prefill form against the reference forms it is
made of, what it keeps, and the model's setting."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

from t2r.errors import UsageError
from t2r.modeling.config import T2RConfig
from t2r.modeling.feature_maps import build_feature_map, map_query_heads
from t2r.ops import global_select
from t2r.ops.dispatch import attention_op
from t2r.ops.global_select import POOL, observation_scores, prompt_selected_attention
from t2r.ops.state import HybridAttentionState
from t2r.ops.windowed import repeat_heads, windowed_attention
from t2r.ops.windowed_chunked import chunked_windowed_attention
from t2r.ops.windowed_step import recurrent_windowed_attention
from tests.test_global_cache import with_cache
from tests.test_model import converted, trained_looking_model
from tests.test_ops import assert_close
from tests.test_windowed_ops import LINEAR_HEADS, SCALE, B, D, G, H, initial_state, make_case

# The ops' default observation window is 32 queries; these cases are shorter, so they pass their own.
OBSERVE = 5
HYBRID_FORMS = {"parallel": windowed_attention, "chunked": functools.partial(chunked_windowed_attention, chunk_size=8)}


def test_observation_scores_are_the_softmax_weights_summed_and_pooled() -> None:
    """Per row, key/value head and candidate, written out: each valid observation query's softmax
    over the keys it sees, summed over queries and the group's query heads, then the max over
    POOL neighbouring candidates; -inf where no query sees the candidate."""
    generator = torch.Generator().manual_seed(2)
    observed, keys_count, candidates = 3, 14, 10
    queries = torch.randn(B, H, observed, D, generator=generator)
    keys = torch.randn(B, G, keys_count, D, generator=generator)
    allowed = torch.rand(B, observed, keys_count, generator=generator) > 0.3
    allowed[1, :, 4] = False  # a candidate nobody sees
    query_valid = torch.tensor([[True, True, True], [False, True, True]])
    got, own = observation_scores(queries, query_valid, keys, allowed, candidates, SCALE, 5.0)
    group = H // G
    for b in range(B):
        for g in range(G):
            attention = torch.zeros(candidates)
            for head in range(g * group, (g + 1) * group):
                for o in range(observed):
                    if not query_valid[b, o]:
                        continue
                    scores = 5.0 * torch.tanh(keys[b, g] @ queries[b, head, o] * SCALE / 5.0)
                    weights = scores.masked_fill(~allowed[b, o], float("-inf")).softmax(-1)
                    attention += weights[:candidates]
            for c in range(candidates):
                if not allowed[b, :, c].any():
                    assert got[b, g, c] == own[b, g, c] == float("-inf")
                    continue
                assert abs(float(own[b, g, c]) - float(attention[c])) <= 1e-5  # TOLERANCE: as below
                near = attention[max(0, c - POOL // 2) : c + POOL // 2 + 1]
                # TOLERANCE: 1e-5 on sums of at most 6 softmax weights (each <= 1)
                assert abs(float(got[b, g, c]) - float(near.max())) <= 1e-5


def reference_final_linear(start: HybridAttentionState, phi, keys_l, values, slot_valid, chosen, decay, steps: int):
    """The linear state after `steps` slots left the window, written out per row and linear head:
    the start decayed `steps` times plus each leaving valid slot s that its key/value head did not
    cache, decayed steps - 1 - s times."""
    kv, k_sum = start.linear.kv.clone(), start.linear.k_sum.clone()
    heads = kv.shape[1]
    group = heads // G if heads >= G else 1
    for b in range(B):
        for head in range(heads):
            rate = 1.0 if decay is None else float(decay[head])
            kv[b, head] *= rate**steps
            k_sum[b, head] *= rate**steps
            g = head // group
            for s in range(steps):
                if not slot_valid[b, s] or s in chosen[b][g]:
                    continue
                f = phi(keys_l[b, g, s].view(1, 1, 1, -1).expand(1, heads, 1, -1))[0, head, 0]
                kv[b, head] += rate ** (steps - 1 - s) * torch.outer(f, values[b, g, s])
                k_sum[b, head] += rate ** (steps - 1 - s) * f
    return kv, k_sum


@pytest.mark.parametrize("linear_heads", LINEAR_HEADS)
@pytest.mark.parametrize("form", ["parallel", "chunked"])
def test_a_prompt_chosen_cache_is_the_hybrid_then_the_choice_then_the_step_loop(
    form: str, linear_heads: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The prefill form composed of its parts, each against its reference: the first T - O outputs
    are the hybrid's with no cache (`windowed_attention`); the cache holds, per row and key/value
    head, the slots with the best observation scores (written out: `observation_scores` over the
    slots that left, the sinks and the window); the linear state is the one written out without
    them; the last O outputs and the final state are the reference step loop's from there. With
    sinks filling, left padding, decay, soft-capping and sink queries of their own."""
    length, window, slots = 16, 4, 3
    phi, leaves, valid, valids = make_case(length, window, sinks=3, linear_heads=linear_heads)
    q, k, v, linear_q, linear_k, *_, share = (x.detach() for x in leaves)
    decay = LINEAR_HEADS[linear_heads][1]
    sink_q = torch.randn(q.shape, generator=torch.Generator().manual_seed(9))
    settings = dict(feature_map_k=phi, window_share=share, scale=SCALE, decay=decay, softcap=5.0)
    start = initial_state([x.detach() for x in leaves], valids)
    cached_start = with_cache(start, slots)
    empty = dataclasses.replace(
        cached_start,
        global_keys=torch.zeros_like(cached_start.global_keys),
        global_values=torch.zeros_like(cached_start.global_values),
        global_features=torch.zeros_like(cached_start.global_features),
        global_valid=torch.zeros_like(cached_start.global_valid),
    )
    prefix = length - OBSERVE
    handed = {}  # the state the prefill form hands to its step loop, right after the choice
    scan = global_select.scanned_windowed_attention

    def watched_scan(*args, **kwargs):
        handed["state"] = args[6]
        return scan(*args, **kwargs)

    monkeypatch.setattr(global_select, "scanned_windowed_attention", watched_scan)
    with torch.no_grad():
        phi_q = map_query_heads(phi, linear_q)
        got, final = prompt_selected_attention(
            HYBRID_FORMS[form], q, k, v, phi_q, linear_k, valid, empty, sink_queries=sink_q, observe=OBSERVE,
            **settings,
        )  # fmt: skip
        selected = handed["state"]
        # 1. the prefix: the hybrid with no cache
        head_out, _ = windowed_attention(
            q[:, :, :prefix], k[:, :, :prefix], v[:, :, :prefix], phi_q[:, :, :prefix], linear_k[:, :, :prefix],
            valid[:, :prefix], start, sink_queries=sink_q[:, :, :prefix], **settings,
        )  # fmt: skip
        # 2. the choice: slots 0 .. prefix-1 left; each observation query sees the later slots up
        # to its own and the sinks (the first real tokens: row 0 has one, the new tokens add two)
        slot_keys = torch.cat([start.keys, k], 2)
        slot_values = torch.cat([start.values, v], 2)
        slot_linear = torch.cat([start.linear_keys, linear_k], 2)
        rank = start.sink_valid.sum(1, keepdim=True) + valid.long().cumsum(1)
        is_sink = valid & (rank <= 3)
        slot_valid = torch.cat([start.valid, valid & ~is_sink], 1)
        sink_index = [torch.nonzero(is_sink[b]).flatten().tolist() for b in range(B)]
        chosen = []
        for b in range(B):
            sinks_k = [start.sink_keys[b, :, 0]] if start.sink_valid[b, 0] else []
            sinks_k += [k[b, :, t] for t in sink_index[b]]
            per_head = []
            for g in range(G):
                scores = torch.zeros(prefix)
                for head in range(g * (H // G), (g + 1) * (H // G)):
                    for t in range(prefix, length):
                        if not valid[b, t]:
                            continue
                        seen = [s for s in range(window + t + 1) if slot_valid[b, s]]
                        seen_sinks = (1 if start.sink_valid[b, 0] else 0) + sum(i <= t for i in sink_index[b])
                        keys_seen = torch.stack(
                            [slot_keys[b, g, s] for s in seen] + [x[g] for x in sinks_k[:seen_sinks]]
                        )
                        raw = 5.0 * torch.tanh(keys_seen @ q[b, head, t] * SCALE / 5.0)
                        weights = raw.softmax(-1)
                        for i, s in enumerate(seen):
                            if s < prefix:
                                scores[s] += weights[i]
                pooled = torch.stack(
                    [scores[max(0, c - POOL // 2) : c + POOL // 2 + 1].max() for c in range(prefix)]
                ).masked_fill(~slot_valid[b, :prefix], float("-inf"))
                own = scores.masked_fill(~slot_valid[b, :prefix], float("-inf"))
                order = sorted(range(prefix), key=lambda c: (-float(pooled[c]), -float(own[c]), c))
                per_head.append([c for c in order[:slots] if slot_valid[b, c]])
            chosen.append(per_head)
        for b in range(B):
            for g in range(G):
                held = [int(i) for i in torch.nonzero(
                    (selected.global_keys[b, g][:, None] == slot_keys[b, g, :prefix][None]).all(-1).any(0)
                ).flatten()]  # fmt: skip
                assert sorted(held) == sorted(chosen[b][g]), (b, g)
                assert int(selected.global_valid[b].sum()) == len(chosen[b][g])
        kv, k_sum = reference_final_linear(start, phi, slot_linear, slot_values, slot_valid, chosen, decay, prefix)
        assert_close(selected.linear.kv, kv, "linear kv after the choice")
        assert_close(selected.linear.k_sum, k_sum, "linear k_sum after the choice")
        # 3. the rest: the reference step loop from the chosen state
        tail_out, tail_final = recurrent_windowed_attention(
            q[:, :, prefix:], k[:, :, prefix:], v[:, :, prefix:], phi_q[:, :, prefix:], linear_k[:, :, prefix:],
            valid[:, prefix:], selected, sink_queries=sink_q[:, :, prefix:], **settings,
        )  # fmt: skip
    # TOLERANCE: 1e-5 on outputs of order 1; the same products, other reduction orders
    assert_close(got[:, :, :prefix], head_out, "prefix output")
    assert_close(got[:, :, prefix:], tail_out, "observation output")
    for name in ("keys", "values", "sink_keys", "global_keys", "global_values", "global_features"):
        assert_close(getattr(final, name), getattr(tail_final, name), f"final {name}")
    assert_close(final.linear.kv, tail_final.linear.kv, "final kv")
    for name in ("valid", "sink_valid", "global_valid"):
        assert torch.equal(getattr(final, name), getattr(tail_final, name)), name


def test_a_cache_that_holds_every_key_makes_the_last_queries_exact_softmax() -> None:
    """From an empty state with more slots than keys, the choice moves every key that left into the
    cache: the linear state is empty again and the observation queries' outputs are the causal
    softmax over every real key, as the teacher's (the linear part adds eps: within 1e-4)."""
    length, window = 17, 4
    phi, leaves, valid, _ = make_case(length, window)
    q, k, v, linear_q, linear_k, *_, share = (x.detach() for x in leaves)
    empty = HybridAttentionState.zeros(B, H, G, phi.out_dim, D, window, global_slots=length)
    with torch.no_grad():
        out, final = prompt_selected_attention(
            HYBRID_FORMS["chunked"], q, k, v, map_query_heads(phi, linear_q), linear_k, valid, empty,
            observe=OBSERVE, feature_map_k=phi, window_share=share, scale=SCALE,
        )  # fmt: skip
        scores = torch.einsum("bhtd,bhsd->bhts", q, repeat_heads(k, H)) * SCALE
        allowed = torch.ones(length, length, dtype=torch.bool).tril() & valid[:, None, None, :]
        teacher = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ repeat_heads(v, H)
    last = slice(length - OBSERVE, length)
    assert (out - teacher)[:, :, last].abs().max() <= 1e-4
    # TOLERANCE: absolute, near zero: the state made again from no key at all is exactly zero
    assert torch.equal(final.linear.kv, torch.zeros_like(final.linear.kv))


def test_the_last_queries_choose_the_key_they_look_for(monkeypatch: pytest.MonkeyPatch) -> None:
    """One far-back key matches what the last queries ask (its key is their mean direction, large):
    the one-slot cache the choice makes holds it in every key/value head (its neighbours score as
    much after pooling; its own score breaks the tie), and the linear state holds it no more."""
    generator = torch.Generator().manual_seed(7)
    length, window, planted, observe = 40, 4, 6, 4
    phi = build_feature_map("hedgehog", G, D, 6, generator)
    q = torch.randn(B, H, length, D, generator=generator)
    k = 0.3 * torch.randn(B, G, length, D, generator=generator)
    v = torch.randn(B, G, length, D, generator=generator)
    asked = q[:, :, -observe:].mean(2).reshape(B, G, H // G, D).mean(2)  # [B, G, D]
    k[:, :, planted] = 4 * asked / asked.norm(dim=-1, keepdim=True)
    empty = HybridAttentionState.zeros(B, G, G, phi.out_dim, D, window, global_slots=1)
    handed = {}  # the state right after the choice (the last queries' steps exchange by recall)
    scan = global_select.scanned_windowed_attention

    def watched_scan(*args, **kwargs):
        handed["state"] = args[6]
        return scan(*args, **kwargs)

    monkeypatch.setattr(global_select, "scanned_windowed_attention", watched_scan)
    valid = torch.ones(B, length, dtype=torch.bool)
    settings = dict(feature_map_k=phi, window_share=torch.full((H,), 0.5), scale=SCALE)
    with torch.no_grad():
        prompt_selected_attention(
            windowed_attention, q, k, v, map_query_heads(phi, q), k, valid, empty, observe=observe, **settings
        )
        without = torch.ones(B, length, dtype=torch.bool)
        without[:, planted] = False  # the planted key never reaches the linear state
        _, reference = windowed_attention(
            q[:, :, :-observe], k[:, :, :-observe], v[:, :, :-observe], map_query_heads(phi, q)[:, :, :-observe],
            k[:, :, :-observe], without[:, :-observe], HybridAttentionState.zeros(B, G, G, phi.out_dim, D, window),
            **settings,
        )  # fmt: skip
    chosen = handed["state"]
    assert torch.equal(chosen.global_keys[:, :, 0], k[:, :, planted])
    assert torch.equal(chosen.global_values[:, :, 0], v[:, :, planted])
    assert_close(chosen.linear.kv, reference.linear.kv, "linear kv without the chosen key")


def test_a_state_whose_cache_holds_keys_goes_token_by_token() -> None:
    """A later turn (the cache already holds keys) is the token-by-token scan: the reference step loop."""
    phi, leaves, valid, valids = make_case(12, 4, sinks=2)
    q, k, v, linear_q, linear_k, *_, share = (x.detach() for x in leaves)
    settings = dict(feature_map_k=phi, window_share=share, scale=SCALE, decay=LINEAR_HEADS["query"][1])
    start = with_cache(initial_state([x.detach() for x in leaves], valids), 3)
    with torch.no_grad():
        args = (q, k, v, map_query_heads(phi, linear_q), linear_k, valid, start)
        expected, _ = recurrent_windowed_attention(*args, **settings)
        got, _ = attention_op("chunked", 8, hybrid=True, global_select="prompt")(*args, **settings)
    assert_close(got, expected, "output")  # TOLERANCE: 1e-5, the same products in the same order


def test_the_selection_is_a_setting_of_the_model() -> None:
    with pytest.raises(UsageError, match="global cache selection"):
        T2RConfig(global_select="attention")
    with pytest.raises(UsageError, match="global cache selection"):
        attention_op("chunked", hybrid=True, global_select="attention")
    model = trained_looking_model(converted("llama", "hedgehog", window=4))
    with pytest.raises(UsageError, match="--global-cache N"):
        model.with_global_cache(0, "prompt")
    model.with_global_cache(8, "prompt")
    assert model.config.global_select == "prompt" and model.config.global_cache == 8
    assert all(a.global_select == "prompt" for a in model.attentions if hasattr(a, "global_select"))
    model.with_global_cache(4)  # None keeps the selection
    assert model.config.global_select == "prompt"


@pytest.mark.parametrize("form", ["parallel", "chunked"])
def test_a_model_prefill_reads_no_cache_before_its_last_queries(form: str) -> None:
    """Through the model: the logits before the last OBSERVE positions are the model's without a
    cache (every layer's first outputs are the hybrid's own), and the prompt leaves a full cache."""
    model = trained_looking_model(converted("llama", "hedgehog", window=4))
    ids = torch.randint(0, 100, (2, global_select.OBSERVE + 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain, _ = model(ids, form=form)
        model.with_global_cache(3, "prompt")
        chosen, state = model(ids, form=form)
    before = ids.shape[1] - global_select.OBSERVE
    # TOLERANCE: 1e-4 on logits of O(1)-O(10): the same ops over a shorter sequence (other matmul
    # shapes, so other reduction orders) through a few layers, as in tests/test_model.py
    assert_close(chosen[:, :before], plain[:, :before], "logits", tolerance=1e-4)
    assert not torch.allclose(chosen[:, before:], plain[:, before:])
    assert all(layer.global_valid.all() for layer in state.layers if hasattr(layer, "global_valid"))
