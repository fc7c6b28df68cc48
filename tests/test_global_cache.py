"""The sparse global cache (t2r.ops.global_cache, LoLA): the choice written out per row and head,
every form that advances a state with a cache against the reference step, what the cache keeps,
and the model's paths (prefill, step, fast step, joined batches) with one."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from t2r.errors import UsageError
from t2r.modeling.config import T2RConfig
from t2r.modeling.fast_decode import FastState, fast_step
from t2r.modeling.feature_maps import build_feature_map, map_query_heads
from t2r.ops.dispatch import attention_op
from t2r.ops.global_cache import exchange
from t2r.ops.state import HybridAttentionState, LinearAttentionState, RingWindow
from t2r.ops.windowed import repeat_heads
from t2r.ops.windowed_ring import windowed_ring_step_
from t2r.ops.windowed_step import recurrent_windowed_attention
from tests.test_model import converted, left_padded_batch, trained_looking_model
from tests.test_ops import assert_close
from tests.test_windowed_ops import LINEAR_HEADS, SCALE, B, D, G, H, initial_state, make_case

# Logits of the tiny models are O(1)-O(10): paths that differ only in reduction order agree to
# 1e-4 after a few layers, as in tests/test_model.py.
LOGITS_TOLERANCE = 1e-4


def with_cache(state: HybridAttentionState, slots: int, seed: int = 1) -> HybridAttentionState:
    """`state` with a global cache of `slots`: row 0 holds min(2, slots) keys (slots fill in order),
    row 1 none (empty slots hold zeros, as a fresh state's do)."""
    generator = torch.Generator().manual_seed(seed)
    valid = torch.zeros(B, slots, dtype=torch.bool)
    valid[0, : min(2, slots)] = True

    def cached(heads: int = G, size: int = D) -> torch.Tensor:
        return torch.randn(B, heads, slots, size, generator=generator) * valid[:, None, :, None]

    _, linear_heads, features, _ = state.linear.kv.shape
    return dataclasses.replace(
        state,
        global_keys=cached(),
        global_values=cached(),
        global_features=cached(linear_heads, features).abs(),  # features are non-negative
        global_valid=valid,
    )


def test_the_exchange_evicts_the_candidate_the_linear_state_recalls_best() -> None:
    """The choice written out per row and key/value head: each candidate's recall phi(k) . kv /
    (phi(k) . k_sum + eps) against its value, squared error summed over the heads that share the
    cache; the lowest goes to the linear state, the leaving key takes its slot."""
    generator = torch.Generator().manual_seed(3)
    for heads in (H, G):  # a linear state per query head (errors summed over a group) or per kv head
        phi = build_feature_map("hedgehog", heads, D, 6, generator)
        slots = 4
        linear = LinearAttentionState(
            torch.rand(B, heads, 12, D, generator=generator), torch.rand(B, heads, 12, generator=generator) + 0.5
        )
        keys, values = (torch.randn(B, G, slots, D, generator=generator) for _ in range(2))
        valid = torch.tensor([[True] * slots, [True, True, False, False]])
        cache_features = torch.rand(B, heads, slots, phi.out_dim, generator=generator) * valid[:, None, :, None]
        leaving = [torch.randn(B, G, D, generator=generator) for _ in range(3)]
        with torch.no_grad():
            swap = exchange(
                keys, values, cache_features, valid, *leaving, torch.ones(B, dtype=torch.bool), linear,
                feature_map_k=phi, eps=1e-6,
            )  # fmt: skip
            leaving_features = phi(repeat_heads(leaving[2][:, :, None], heads))  # [B, L, 1, F]
            features = torch.cat([leaving_features, cache_features], 2)  # [B, L, N + 1, F]
            candidates_v = torch.cat([leaving[1][:, :, None], values], 2)
        group = heads // G
        for b in range(B):
            for g in range(G):
                errors = []
                for c in range(slots + 1):
                    if c and not valid[b, c - 1]:
                        errors.append(float("-inf"))
                        continue
                    error = 0.0
                    for head in range(g * group, (g + 1) * group):
                        f = features[b, head, c]
                        recall = (f @ linear.kv[b, head]) / (f @ linear.k_sum[b, head] + 1e-6)
                        error += float(((recall - candidates_v[b, g, c]) ** 2).sum())
                    errors.append(error)
                chosen = min(range(slots + 1), key=lambda c: (errors[c], c))
                for head in range(g * group, (g + 1) * group):
                    assert_close(
                        swap.phi[b, head], features[b, head, chosen] * (chosen == 0 or valid[b, chosen - 1]), "phi"
                    )
                    assert_close(swap.value[b, head], candidates_v[b, g, chosen], "value")
                if chosen:  # the leaving key takes the evicted one's slot, the rest stay
                    assert torch.equal(swap.keys[b, g, chosen - 1], leaving[0][b, g])
                    for head in range(g * group, (g + 1) * group):
                        assert torch.equal(swap.features[b, head, chosen - 1], leaving_features[b, head, 0])
                others = [s for s in range(slots) if s != chosen - 1]
                assert torch.equal(swap.keys[b, g, others], keys[b, g, others])
        # Row 1 has empty slots: the leaving key fills the first one, in every head alike.
        assert swap.valid[1].tolist() == [True, True, True, False]


def test_an_invalid_leaving_slot_passes_to_the_linear_state_as_zero() -> None:
    generator = torch.Generator().manual_seed(4)
    phi = build_feature_map("hedgehog", G, D, 6, generator)
    linear = LinearAttentionState(torch.rand(B, G, 12, D), torch.rand(B, G, 12) + 0.5)
    cache = [torch.randn(B, G, 3, D, generator=generator) for _ in range(2)] + [torch.rand(B, G, 3, phi.out_dim)]
    valid = torch.tensor([[True, False, False], [True, True, True]])
    leaving = [torch.randn(B, G, D, generator=generator) for _ in range(3)]
    with torch.no_grad():
        swap = exchange(*cache, valid, *leaving, torch.zeros(B, dtype=torch.bool), linear, feature_map_k=phi, eps=1e-6)
    assert torch.equal(swap.phi, torch.zeros_like(swap.phi))
    assert torch.equal(swap.keys, cache[0]) and torch.equal(swap.valid, valid)


CASES = [
    pytest.param(window, sinks, decay, linear_heads, slots, id=f"w{window}-s{sinks}-{decay}-{linear_heads}-n{slots}")
    for window, sinks, decay, linear_heads, slots in [
        (1, 0, False, "query", 1),
        (4, 3, True, "query", 3),
        (4, 0, True, "kv", 2),
        (4, 3, False, "kv", 5),
    ]
]


@pytest.mark.parametrize("window,sinks,decay,linear_heads,slots", CASES)
def test_the_in_place_ring_step_with_a_cache_matches_the_reference(
    window: int, sinks: int, decay: bool, linear_heads: str, slots: int
) -> None:
    """The decode path's in-place ring with a global cache against the reference step loop: every
    output and the final state (window, sinks, cache), soft-capped, with sink queries of their own."""
    rates = LINEAR_HEADS[linear_heads][1] if decay else None
    length = 13
    phi, leaves, _, valids = make_case(length, window, sinks=sinks, linear_heads=linear_heads)
    q, k, v, linear_q, linear_k, *_, share = (x.detach() for x in leaves)
    valid = torch.ones(B, length, dtype=torch.bool)  # decoding: every new token is real
    sink_q = torch.randn(q.shape, generator=torch.Generator().manual_seed(9))
    settings = dict(feature_map_k=phi, window_share=share, scale=SCALE, decay=rates, softcap=5.0)
    start = with_cache(initial_state([x.detach() for x in leaves], valids), slots)
    with torch.no_grad():
        phi_q = map_query_heads(phi, linear_q)
        expected, final = recurrent_windowed_attention(
            q, k, v, phi_q, linear_k, valid, start, sink_queries=sink_q, **settings
        )
        ring = RingWindow.from_hybrid(start)
        outputs = []
        for t in range(length):
            outputs.append(windowed_ring_step_(
                q[:, :, t], k[:, :, t], v[:, :, t], phi_q[:, :, t], linear_k[:, :, t], ring,
                torch.tensor([t % window]), sink_queries=sink_q[:, :, t], **settings,
            ))  # fmt: skip
    # TOLERANCE: 1e-5 of values of order 1 (the same products, views instead of copies)
    assert_close(torch.stack(outputs, dim=2), expected, "output")
    got = ring.to_hybrid(length)
    assert final.global_valid.all()  # the cache filled and then exchanged keys
    for name in ("keys", "values", "sink_keys", "sink_values", "global_keys", "global_values", "global_features"):
        assert_close(getattr(got, name), getattr(final, name), f"final {name}")
    assert_close(got.linear.kv, final.linear.kv, "final kv")
    assert_close(got.linear.k_sum, final.linear.k_sum, "final k_sum")
    for name in ("valid", "sink_valid", "global_valid"):
        assert torch.equal(getattr(got, name), getattr(final, name)), name


@pytest.mark.parametrize("form", ["parallel", "chunked"])
@pytest.mark.parametrize("linear_heads", LINEAR_HEADS)
def test_the_prefill_scan_of_a_cached_state_matches_the_reference(form: str, linear_heads: str) -> None:
    """A cache's content depends on every earlier choice: the parallel and chunked forms of a state
    with one run the prefill scan (`ops.windowed_scan`), which must equal the reference step loop:
    outputs and final state, with padding, sinks filling, decay and sink queries of their own."""
    phi, leaves, valid, valids = make_case(20, 4, sinks=3, linear_heads=linear_heads)
    q, k, v, linear_q, linear_k, *_, share = (x.detach() for x in leaves)
    sink_q = torch.randn(q.shape, generator=torch.Generator().manual_seed(9))
    settings = dict(feature_map_k=phi, window_share=share, scale=SCALE, decay=LINEAR_HEADS[linear_heads][1])
    start = with_cache(initial_state([x.detach() for x in leaves], valids), 3)
    with torch.no_grad():
        phi_q = map_query_heads(phi, linear_q)
        args = (q, k, v, phi_q, linear_k, valid, start)
        expected, final = recurrent_windowed_attention(*args, sink_queries=sink_q, softcap=5.0, **settings)
        got, got_final = attention_op(form, 8, hybrid=True)(*args, sink_queries=sink_q, softcap=5.0, **settings)
    assert_close(got, expected, "output")  # TOLERANCE: 1e-5, the same products in the same order
    for name in ("keys", "values", "linear_keys", "sink_keys", "global_keys", "global_values", "global_features"):
        assert_close(getattr(got_final, name), getattr(final, name), f"final {name}")
    assert_close(got_final.linear.kv, final.linear.kv, "final kv")
    for name in ("valid", "sink_valid", "global_valid"):
        assert torch.equal(getattr(got_final, name), getattr(final, name)), name
    with pytest.raises(ValueError, match="one token at a time"):
        from t2r.ops.windowed import windowed_attention

        windowed_attention(*args, **settings)


def test_while_every_key_fits_the_cache_and_window_the_hybrid_is_exact_softmax() -> None:
    """From an empty state with N >= T cache slots no key ever reaches the linear state: the output
    is the causal softmax over every real key, as the teacher's. The linear part then adds only eps
    to the normaliser (>= share * 1, the peak's weight): 1e-6 / 0.1 relative, within 1e-4."""
    length = 17
    phi, leaves, valid, _ = make_case(length, 4)
    q, k, v, linear_q, linear_k, *_, share = (x.detach() for x in leaves)
    empty = HybridAttentionState.zeros(B, H, G, phi.out_dim, D, 4, global_slots=length)
    with torch.no_grad():
        out, final = recurrent_windowed_attention(
            q, k, v, map_query_heads(phi, linear_q), linear_k, valid, empty,
            feature_map_k=phi, window_share=share, scale=SCALE,
        )  # fmt: skip
        scores = torch.einsum("bhtd,bhsd->bhts", q, repeat_heads(k, H)) * SCALE
        allowed = torch.ones(length, length, dtype=torch.bool).tril() & valid[:, None, None, :]
        teacher = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ repeat_heads(v, H)
    real = valid[:, None, :, None].expand_as(out)
    assert (out - teacher)[real].abs().max() <= 1e-4
    assert torch.equal(final.linear.kv, torch.zeros_like(final.linear.kv))


def test_a_cache_keeps_the_key_the_linear_state_cannot_recall() -> None:
    """Keys and values alike but one far-off pair: long after it left the window, the one-slot cache
    still holds it (every other key is recalled well by a state of its like)."""
    generator = torch.Generator().manual_seed(5)
    length, window, odd = 40, 4, 6
    phi = build_feature_map("hedgehog", G, D, 6, generator)
    common_k, common_v = torch.randn(D, generator=generator), torch.randn(D, generator=generator)
    k = common_k + 0.05 * torch.randn(B, G, length, D, generator=generator)
    v = common_v + 0.05 * torch.randn(B, G, length, D, generator=generator)
    k[:, :, odd], v[:, :, odd] = -3 * common_k, 10 * torch.randn(D, generator=generator)
    q = torch.randn(B, H, length, D, generator=generator)
    empty = HybridAttentionState.zeros(B, G, G, phi.out_dim, D, window, global_slots=1)
    with torch.no_grad():
        _, final = recurrent_windowed_attention(
            q, k, v, map_query_heads(phi, q), k, torch.ones(B, length, dtype=torch.bool), empty,
            feature_map_k=phi, window_share=torch.full((H,), 0.5), scale=SCALE,
        )  # fmt: skip
    assert torch.equal(final.global_keys[:, :, 0], k[:, :, odd])
    assert torch.equal(final.global_values[:, :, 0], v[:, :, odd])


def test_a_global_cache_needs_a_window_and_a_linear_part() -> None:
    with pytest.raises(UsageError, match="global-cache"):
        T2RConfig(window=0, global_cache=4)
    with pytest.raises(UsageError, match="global-cache"):
        T2RConfig(feature_map="none", window=8, global_cache=4)
    with pytest.raises(UsageError, match=">= 0"):
        T2RConfig(window=8, global_cache=-1)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@torch.no_grad()
def test_a_model_with_a_cache_prefills_steps_and_fast_steps_alike(family: str) -> None:
    """Prefill 17 tokens (window 5: keys leave it and compete for 3 cache slots), then decode one
    step at a time with `model.step` and the in-place `fast_step` (left padding and sinks in the
    batch): logits agree, the chunked prefill equals the recurrent one, and the state is larger
    than without a cache by exactly the cache's bytes."""
    torch.manual_seed(0)
    model = trained_looking_model(converted(family, "hedgehog", rotary_features=False)).with_global_cache(3)
    ids, mask = left_padded_batch()
    state = model.init_state(2)
    logits, state = model(ids[:, :17], mask[:, :17], state, form="chunked")
    recurrent_logits, _ = model(ids[:, :17], mask[:, :17], model.init_state(2), form="recurrent")
    assert (logits - recurrent_logits).abs().max() <= LOGITS_TOLERANCE
    fast = FastState.from_model_state(state)
    for t in range(17, ids.shape[1]):
        step_logits, state = model.step(ids[:, t], state, mask[:, t])
        assert (fast_step(model, ids[:, t], fast) - step_logits).abs().max() <= LOGITS_TOLERANCE
    assert all(layer.global_valid.all() for layer in state.layers if isinstance(layer, HybridAttentionState))
    cache_bytes = sum(
        layer.global_keys.nbytes * 2 + layer.global_features.nbytes + layer.global_valid.nbytes
        for layer in state.layers
        if isinstance(layer, HybridAttentionState)
    )
    assert state.nbytes() == model.with_global_cache(0).init_state(2).nbytes() + cache_bytes
    assert model.config.global_cache == 0 and model.init_state(1).layers[0].global_slots == 0


@torch.no_grad()
def test_joined_rows_with_a_cache_decode_as_they_would_alone() -> None:
    """Continuous batching: two sequences prefilled apart (their rings at different pointers) and
    joined decode as each does alone."""
    torch.manual_seed(0)
    model = trained_looking_model(converted("llama", "hedgehog", rotary_features=False)).with_global_cache(2)
    ids, _ = left_padded_batch()
    alone, states = [], []
    for row, length, extra in ((0, 19, 1), (1, 22, 2)):
        _, state = model(ids[row : row + 1, :length], torch.ones(1, length, dtype=torch.long), model.init_state(1))
        fast = FastState.from_model_state(state)
        for t in range(extra):  # the two rings' pointers end apart
            fast_step(model, ids[row, length + t : length + t + 1], fast)
        states.append(fast)
        solo, start = copy.deepcopy(fast), length + extra
        alone.append([fast_step(model, ids[row, start + t : start + t + 1], solo) for t in range(6)])
    joined = FastState.join(states)
    for t in range(6):
        both = fast_step(model, torch.stack([ids[0, 20 + t], ids[1, 24 + t]]), joined)
        assert (both[0] - alone[0][t][0]).abs().max() <= LOGITS_TOLERANCE
        assert (both[1] - alone[1][t][0]).abs().max() <= LOGITS_TOLERANCE


@torch.no_grad()
def test_the_compiled_decode_step_takes_a_cache() -> None:
    """The decode step through torch.compile (aot_eager: the same capture as inductor, no code
    generation) with a global cache: the exchange's argmin, gathers and in-place writes are captured,
    and the logits equal the eager step's."""
    from t2r.modeling.fast_decode import Decoder

    torch.manual_seed(0)
    model = trained_looking_model(converted("llama", "hedgehog", rotary_features=False)).with_global_cache(2)
    ids, _ = left_padded_batch()
    _, state = model(ids[:1, :20], torch.ones(1, 20, dtype=torch.long), model.init_state(1))
    eager, compiled = FastState.from_model_state(state), FastState.from_model_state(state)
    decoder = Decoder(compile=True, backend="aot_eager")
    for t in range(20, 26):
        expected = fast_step(model, ids[:1, t], eager)
        assert (decoder(model, ids[:1, t], compiled) - expected).abs().max() <= LOGITS_TOLERANCE


def test_requests_joining_a_running_batch_with_a_cache_decode_what_they_decode_alone() -> None:
    """The server's scheduler (state slots, rows joining and leaving) on a model with a cache."""
    from t2r.inference.generate import generate
    from t2r.inference.sampling import Sampling
    from t2r.inference.scheduler import Request, Scheduler
    from tests.test_scheduler import prompts

    torch.manual_seed(0)
    model = trained_looking_model(converted("llama", "hedgehog", window=5)).with_global_cache(2)
    greedy = Sampling(greedy=True)
    requests = [Request(p, budget, greedy) for p, budget in zip(prompts(5), [12, 5, 9, 14, 7], strict=True)]
    scheduler = Scheduler(model, max_batch=3)
    arrivals, steps = {0: requests[:2], 3: requests[2:]}, 0
    while scheduler.busy or arrivals:
        for request in arrivals.pop(steps, []):
            scheduler.submit(request)
        scheduler.step()
        steps += 1
    for request in requests:
        assert request.tokens == generate(model, request.prompt, request.max_new_tokens, greedy).new_tokens


def test_transformers_generate_carries_a_cache_in_its_state(tmp_path) -> None:
    """A folder saved with a global cache, loaded by transformers: `generate()` (T2RCache) emits
    what t2r's own generate emits."""
    from transformers import AutoModelForCausalLM

    from t2r.inference.generate import generate_batch
    from t2r.inference.sampling import Sampling
    from tests.test_transformers_model import PROMPTS, batch, saved_model

    model = AutoModelForCausalLM.from_pretrained(saved_model(tmp_path / "cached", global_cache=2))
    assert model.t2r.config.global_cache == 2
    ids, mask = batch()
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    expected = generate_batch(model.t2r, [torch.tensor(p) for p in PROMPTS], 24, Sampling(greedy=True))
    assert out[:, ids.shape[1] :].tolist() == [result.new_tokens for result in expected]
