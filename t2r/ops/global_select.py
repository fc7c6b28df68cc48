"""A global cache chosen by the prompt's last queries (SnapKV, Li et al. 2024, arXiv 2404.14469;
training-free): the prefill's alternative to filling it token by token by self-recall error.

A prompt usually ends with what it asks (a question, an instruction): the keys those last queries
attend to are the ones the answer needs. So a fresh prompt (a state whose cache is still empty) is
prefilled in two parts:

1. every token but the last `observe` goes through the hybrid's own parallel or chunked form, no
   cache read, as the model was trained (keys leave the window into the linear state);
2. the last `observe` queries (SnapKV's observation window) score every key that has left the
   window by then (softmax over those keys, per query head, summed over the observation queries
   and the query heads of a key/value head, max-pooled over `POOL` neighbouring positions so that
   a kept token brings its phrase), and the N best per key/value head move from the linear state
   into the cache: the linear state is made again without them (`ops.windowed.decayed_final_linear`,
   the same decay they would have had);
3. the last `observe` tokens go token by token (`ops.windowed_scan`), reading the cache; keys that
   leave the window from then on compete with it by self-recall error (`ops.global_cache`), as in
   decoding.

A state whose cache already holds keys (a later turn of a session) is prefilled token by token
(`ops.windowed_scan`): its cache's keys would have to be read by the first part too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F

from t2r.ops.state import HybridAttentionState
from t2r.ops.windowed import (
    FeatureMapFn,
    capped,
    decayed_final_linear,
    key_features,
    masked_softmax_weights,
    repeat_heads,
    take_sinks,
)
from t2r.ops.windowed_scan import scanned_windowed_attention

OBSERVE = 32  # SnapKV's observation window: the prompt's last 32 queries choose
POOL = 7  # SnapKV's pooling kernel: a chosen key's neighbours within 3 positions score as it does


def observation_scores(
    queries: torch.Tensor,
    query_valid: torch.Tensor,
    keys: torch.Tensor,
    allowed: torch.Tensor,
    candidates: int,
    scale: float,
    softcap: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """How much attention the observation queries give each candidate key, as SnapKV scores them:
    under the softmax of full causal attention, so that a query that looks at its neighbours adds
    little to any old key, and one that looks far back (a question) adds much to what it finds.

    queries [B, H, O, D], query_valid [B, O] (a padded query chooses nothing), keys [B, G, K, D]
    (positions applied; the first `candidates` C are the candidates, in time order), allowed
    [B, O, K]: what each query sees -> (pooled, own) [B, G, C] fp32: own, per query head and
    query the softmax weight of each key, summed over the O queries and the H / G query heads of
    each key/value head; pooled, its max over POOL neighbouring candidates. -inf for a candidate no
    query sees.
    """
    batch, heads, observed, head_dim = queries.shape
    kv_heads = keys.shape[1]
    grouped = queries.float().reshape(batch, kv_heads, heads // kv_heads, observed, head_dim)
    scores = capped(torch.matmul(grouped, keys.float()[:, :, None].transpose(-1, -2)) * scale, softcap)
    weights = masked_softmax_weights(scores, allowed[:, None, None])  # [B, G, H / G, O, K]
    weights = weights[..., :candidates] / weights.sum(-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)
    attention = (weights * query_valid[:, None, None, :, None]).sum((2, 3))  # [B, G, C]
    pooled = F.max_pool1d(attention, POOL, stride=1, padding=POOL // 2) if candidates else attention
    unseen = ~allowed[:, None, :, :candidates].any(2)
    return pooled.masked_fill(unseen, float("-inf")), attention.masked_fill(unseen, float("-inf"))


def top_slots(pooled: torch.Tensor, own: torch.Tensor, slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """pooled, own [B, G, C] (`observation_scores`) -> the `slots` best candidates per key/value
    head by pooled score, index [B, G, N] (best first), and whether slot n holds an allowed key,
    valid [B, N] (the same for every head: each row has as many allowed candidates for all of its
    heads, and those come first). Pooling makes exact ties (a peak and its neighbours): the
    candidate's own score breaks them, then its position (stable sorts: the same on every machine)."""
    batch, kv_heads, candidates = pooled.shape
    taken = min(slots, candidates)
    by_own = own.argsort(dim=-1, descending=True, stable=True)
    best, then = pooled.gather(-1, by_own).sort(dim=-1, descending=True, stable=True)
    best, index = best[..., :taken], by_own.gather(-1, then[..., :taken])
    valid = torch.isfinite(best[:, 0]) if taken else best.new_zeros(batch, 0, dtype=torch.bool)
    if taken < slots:  # fewer candidates than slots: the rest stay empty
        index = torch.cat([index, index.new_zeros(batch, kv_heads, slots - taken)], -1)
        valid = torch.cat([valid, valid.new_zeros(batch, slots - taken)], -1)
    return index, valid


def select_into_cache(
    state: HybridAttentionState,
    before: HybridAttentionState,
    keys: torch.Tensor,
    values: torch.Tensor,
    linear_keys: torch.Tensor,
    slot_valid: torch.Tensor,
    observation: torch.Tensor,
    observation_valid: torch.Tensor,
    seen_keys: torch.Tensor,
    seen: torch.Tensor,
    *,
    feature_map_k: FeatureMapFn,
    scale: float,
    decay: torch.Tensor | None,
    softcap: float | None,
) -> HybridAttentionState:
    """The state after a prefix with the cache chosen by the observation queries.

    state: after the prefix of P tokens, made with no cache; before: the state before it (its cache
    empty; what its shape gives the result); keys, values, linear_keys [B, G, P, D], slot_valid
    [B, P]: the P slots that left the window during the prefix, oldest first (the old window's,
    then the prefix's own); observation [B, H, O, D], observation_valid [B, O]: the queries that
    choose; seen_keys [B, G, K, D], seen [B, O, K]: the other keys they see (the normaliser).
    """
    slots, linear_heads = before.global_slots, before.linear.kv.shape[1]
    index, valid = top_slots(
        *observation_scores(
            observation,
            observation_valid,
            torch.cat([keys, seen_keys], 2),
            torch.cat([slot_valid[:, None].expand(-1, seen.shape[1], -1), seen], 2),
            keys.shape[2],
            scale,
            softcap,
        ),
        slots,
    )
    positions = torch.arange(keys.shape[2], device=keys.device)
    kept = ((index[..., None] == positions) & valid[:, None, :, None]).any(2)  # [B, G, P]
    kept_l = repeat_heads(kept[..., None], linear_heads)[..., 0]  # [B, L, P]

    def gather(x: torch.Tensor) -> torch.Tensor:
        return x.gather(2, index[..., None].expand(-1, -1, -1, x.shape[-1]))

    phi = key_features(linear_keys, slot_valid, feature_map_k, linear_heads)  # [B, L, P, F]
    values_l = repeat_heads(values, linear_heads).float()
    linear = decayed_final_linear(before.linear, phi * ~kept_l[..., None], values_l, decay)
    features = key_features(gather(linear_keys), valid, feature_map_k, linear_heads)  # [B, L, N, F]
    return dataclasses.replace(
        state,
        linear=linear,
        global_keys=gather(keys).to(before.global_keys.dtype) * valid[:, None, :, None],
        global_values=gather(values).to(before.global_values.dtype) * valid[:, None, :, None],
        global_features=features,
        global_valid=valid,
    )


def without_cache(state: HybridAttentionState) -> HybridAttentionState:
    """The state with no cache slots (N = 0): what the parallel and chunked forms take."""
    return dataclasses.replace(
        state,
        global_keys=state.global_keys[:, :, :0],
        global_values=state.global_values[:, :, :0],
        global_features=state.global_features[:, :, :0],
        global_valid=state.global_valid[:, :0],
    )


def prompt_selected_attention(
    op: Callable[..., tuple[torch.Tensor, HybridAttentionState]],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    phi_q: torch.Tensor,
    linear_keys: torch.Tensor,
    valid: torch.Tensor,
    initial_state: HybridAttentionState,
    *,
    sink_queries: torch.Tensor | None = None,
    observe: int = OBSERVE,
    **kwargs,
) -> tuple[torch.Tensor, HybridAttentionState]:
    """A prompt through a state with a global cache, the cache chosen by its last `observe` queries
    (the module's docstring): `op` is the hybrid's parallel or chunked form (`ops.windowed`'s
    signature; kwargs: its feature_map_k, window_share, scale, eps, decay, softcap). A state whose
    cache holds keys already, or a prompt of at most `observe` tokens, goes token by token
    (`ops.windowed_scan`). Returns out [B, H, T, D] and the final state."""
    length = q.shape[2]
    if initial_state.global_valid.any() or length <= observe:
        return scanned_windowed_attention(
            q, k, v, phi_q, linear_keys, valid, initial_state, sink_queries=sink_queries, **kwargs
        )
    prefix = length - observe

    def head(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x[:, :, :prefix]

    def tail(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x[:, :, prefix:]

    start = without_cache(initial_state)
    out_prefix, middle = op(
        q[:, :, :prefix], k[:, :, :prefix], v[:, :, :prefix], head(phi_q), head(linear_keys), valid[:, :prefix],
        start, sink_queries=head(sink_queries), **kwargs,
    )  # fmt: skip
    # Slot s of the old window and the new tokens leaves the window at step s: the first `prefix`
    # left during the prefix (the candidates); each observation query also sees the sinks and the
    # slots after the candidates up to its own.
    state = initial_state
    sinks = take_sinks(state, k, v, valid.bool())
    slots = torch.cat([state.keys, k.to(state.keys.dtype)], 2)  # [B, G, W + T, D]
    slot_valid = torch.cat([state.valid, sinks.window_valid], 1)  # [B, W + T]
    observers = torch.arange(prefix, length, device=q.device)  # the observation queries' indices
    causal = torch.arange(slots.shape[2] - prefix, device=q.device) <= observers[:, None] + state.window - prefix
    seen = torch.cat([causal & slot_valid[:, None, prefix:], sinks.visible(observers)], 2)  # [B, O, W + O + S]
    chosen = select_into_cache(
        middle,
        state,
        slots[:, :, :prefix],
        torch.cat([state.values, v.to(state.values.dtype)], 2)[:, :, :prefix],
        torch.cat([state.linear_keys, head(linear_keys).to(state.linear_keys.dtype)], 2)[:, :, :prefix],
        slot_valid[:, :prefix],
        tail(q),
        valid[:, prefix:].bool(),
        torch.cat([slots[:, :, prefix:], sinks.keys], 2),
        seen,
        feature_map_k=kwargs["feature_map_k"],
        scale=kwargs["scale"],
        decay=kwargs.get("decay"),
        softcap=kwargs.get("softcap"),
    )
    out_rest, final_state = scanned_windowed_attention(
        tail(q), tail(k), tail(v), tail(phi_q), tail(linear_keys), valid[:, prefix:], chosen,
        sink_queries=tail(sink_queries), **kwargs,
    )  # fmt: skip
    return torch.cat([out_prefix, out_rest], 2), final_state
