"""The hybrid one token at a time: how a query reads its state and how the state takes a token.

`ops.windowed` is the specification (its parallel form and its helpers); here are its step forms,
which every one-token path shares: `hybrid_read` (the softmax part over the sinks and the window
plus the linear part, combined by the per-head share) and `evict_into_linear_` (the linear state
decays once and takes the key that leaves the window). `windowed_attention_step` (functional, a
new state per token) and `recurrent_windowed_attention` (it looped over a sequence) are tested
against the parallel form; the decode path's in-place ring (`ops.windowed_ring`) reads and evicts
through the same two functions.
"""

from __future__ import annotations

import torch

from t2r.ops.global_cache import exchange
from t2r.ops.reference import no_tokens, read_linear_state
from t2r.ops.state import HybridAttentionState, LinearAttentionState
from t2r.ops.windowed import (
    FeatureMapFn,
    capped,
    combine,
    key_features,
    masked_softmax_weights,
    repeat_heads,
    take_sinks,
)


def grouped_scores(q: torch.Tensor, keys: torch.Tensor, scale: float, softcap: float | None) -> torch.Tensor:
    """One query token's scores: q [B, H, D], keys [B, G, S, D] -> [B, G, H / G, S] (query heads
    grouped by their key/value head: GQA without repeating the keys), capped, fp32."""
    batch, heads, head_dim = q.shape
    kv_heads = keys.shape[1]
    grouped = q.float().reshape(batch, kv_heads, heads // kv_heads, head_dim)
    return capped(torch.matmul(grouped, keys.float().transpose(-1, -2)) * scale, softcap)


def softmax_read(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    allowed: torch.Tensor,
    sinks: int,
    scale: float,
    softcap: float | None,
    sink_queries: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One query token's softmax part: q [B, H, D]; keys, values [B, G, S + W, D] with the S sink
    slots first; allowed [B, S + W]; sink_queries [B, H, D] score the sinks (None: q).

    Returns the unnormalised numerator [B, H, D] and normaliser [B, H] (one stabiliser for all).
    """
    batch, heads, head_dim = q.shape
    if sink_queries is not None and sinks:
        scores = torch.cat(
            [
                grouped_scores(sink_queries, keys[:, :, :sinks], scale, softcap),
                grouped_scores(q, keys[:, :, sinks:], scale, softcap),
            ],
            dim=-1,
        )
    else:
        scores = grouped_scores(q, keys, scale, softcap)
    weights = masked_softmax_weights(scores, allowed[:, None, None, :])  # [B, G, H / G, S + W]
    numerator = torch.matmul(weights, values.float()).reshape(batch, heads, head_dim)
    return numerator, weights.sum(-1).reshape(batch, heads)


def hybrid_read(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    allowed: torch.Tensor,
    sinks: int,
    phi_q: torch.Tensor,
    linear: LinearAttentionState,
    *,
    window_share: torch.Tensor,
    scale: float,
    eps: float,
    sink_queries: torch.Tensor | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """One query token of the hybrid, given its state: the softmax part over the sinks and the
    window (`softmax_read`'s arguments) and the linear part read from `linear` (L heads) by
    phi_q [B, H, F], combined by the per-head share. Returns out [B, H, D] fp32. Every step form
    (`windowed_attention_step`, the decode path's `ops.windowed_ring`) reads through this."""
    window_num, window_den = softmax_read(q, keys, values, allowed, sinks, scale, softcap, sink_queries)
    linear_num, linear_den = read_linear_state(phi_q, linear.kv, linear.k_sum)
    return combine(window_num, window_den, linear_num, linear_den, window_share, eps)


def evict_into_linear_(
    linear: LinearAttentionState, phi_leaving: torch.Tensor, value_leaving: torch.Tensor, decay: torch.Tensor | None
) -> None:
    """One step of the linear state, in place: it decays once (decay [L], or None), then takes the
    key leaving the window: phi_leaving [B, L, F] (zero for an invalid slot), value_leaving [B, L, D]."""
    if decay is not None:
        linear.kv.mul_(decay.view(1, -1, 1, 1))
        linear.k_sum.mul_(decay.view(1, -1, 1))
    linear.kv.addcmul_(phi_leaving.unsqueeze(-1), value_leaving.unsqueeze(-2))
    linear.k_sum.add_(phi_leaving)


def windowed_attention_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    phi_q: torch.Tensor,
    linear_keys: torch.Tensor,
    valid: torch.Tensor,
    state: HybridAttentionState,
    *,
    feature_map_k: FeatureMapFn,
    window_share: torch.Tensor,
    scale: float,
    eps: float = 1e-6,
    decay: torch.Tensor | None = None,
    sink_queries: torch.Tensor | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, HybridAttentionState]:
    """One token: q [B, H, D], k, v, linear_keys [B, G, D], phi_q [B, H, F], valid [B].

    The new token pushes the oldest slot out of the window into the linear state (only that one
    key goes through the feature map; the state decays once first), then the query reads both.
    With a global cache (`state.global_slots` > 0) the oldest slot first competes with the cached
    keys (`ops.global_cache.exchange`): the one the linear state recalls best enters it instead,
    and the query's softmax part reads the sinks, the cache and the window.
    Returns out [B, H, D] and the next state.
    """
    linear_heads = state.linear.kv.shape[1]
    sinks = take_sinks(state, k[:, :, None], v[:, :, None], valid.bool()[:, None])
    linear = LinearAttentionState(state.linear.kv.clone(), state.linear.k_sum.clone())
    cache = (state.global_keys, state.global_values, state.global_features, state.global_valid)
    if state.global_slots:  # the oldest slot competes with the global cache (`ops.global_cache`)
        swap = exchange(
            *cache, state.keys[:, :, 0], state.values[:, :, 0], state.linear_keys[:, :, 0], state.valid[:, 0],
            state.linear, feature_map_k=feature_map_k, eps=eps,
        )  # fmt: skip
        leaving, leaving_value = swap.phi, swap.value
        cache = (swap.keys, swap.values, swap.features, swap.valid)
    else:
        leaving = key_features(state.linear_keys[:, :, :1], state.valid[:, :1], feature_map_k, linear_heads)[:, :, 0]
        leaving_value = repeat_heads(state.values[:, :, :1], linear_heads)[:, :, 0].float()  # [B, L, D]
    evict_into_linear_(linear, leaving, leaving_value, decay)
    keys = torch.cat([state.keys[:, :, 1:], k[:, :, None].to(state.keys.dtype)], dim=2)  # [B, G, W, D]
    values = torch.cat([state.values[:, :, 1:], v[:, :, None].to(state.values.dtype)], dim=2)
    window_valid = torch.cat([state.valid[:, 1:], sinks.window_valid], dim=1)  # [B, W]
    new_linear_keys = linear_keys[:, :, None].to(state.linear_keys.dtype)
    next_state = HybridAttentionState(
        linear,
        keys,
        values,
        torch.cat([state.linear_keys[:, :, 1:], new_linear_keys], dim=2),
        window_valid,
        sinks.keys,
        sinks.values,
        sinks.valid,
        *cache,
    )
    global_keys, global_values, _, global_valid = cache
    out = hybrid_read(
        q, torch.cat([sinks.keys, global_keys, keys], 2), torch.cat([sinks.values, global_values, values], 2),
        torch.cat([sinks.valid, global_valid, window_valid], 1), sinks.keys.shape[2], phi_q, linear,
        window_share=window_share, scale=scale, eps=eps, sink_queries=sink_queries, softcap=softcap,
    )  # fmt: skip
    return out.to(v.dtype), next_state


def recurrent_windowed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    phi_q: torch.Tensor,
    linear_keys: torch.Tensor,
    valid: torch.Tensor,
    initial_state: HybridAttentionState,
    sink_queries: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, HybridAttentionState]:
    """The recurrent form over a sequence: `windowed_attention_step` looped over time."""
    state = initial_state
    outputs = []
    for t in range(q.shape[2]):
        sink_q = None if sink_queries is None else sink_queries[:, :, t]
        out, state = windowed_attention_step(
            q[:, :, t], k[:, :, t], v[:, :, t], phi_q[:, :, t], linear_keys[:, :, t], valid[:, t], state,
            sink_queries=sink_q, **kwargs,
        )  # fmt: skip
        outputs.append(out)
    return (torch.stack(outputs, dim=2) if outputs else no_tokens(q, v)), state
