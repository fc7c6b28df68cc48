"""A sparse global cache: a third memory beside the window and the linear state (LoLA, McDermott et
al. 2025, arXiv 2505.23666; training-free).

A hybrid layer with N global slots per row and key/value head keeps, besides its sinks and window,
N of the keys and values that have left the window: the ones its linear state would recall worst.
When a key leaves the window it competes with the N cached ones; each candidate's *self-recall
error* under the current linear state is

    err(k, v) = || phi(k) . kv / (phi(k) . k_sum + eps) - v ||^2

(what the linear state would return for that key, against the value it stands for; summed over the
query heads that share a key/value head's cache when the linear state has a head per query head).
The candidate with the lowest error goes into the linear state (decayed from then on, like a key
that leaves the window without a cache); the others stay cached, scored by exact softmax together
with the sinks and the window under one stabiliser. An empty slot counts as error -inf (the first
N keys to leave are cached as they come, and every key/value head fills its slots in the same
order, so one validity per row holds for all heads); an invalid leaving slot (padding, a sink, an
empty window slot) counts -inf too and comes first, so it passes into the linear state as zero.

The cache's content at a token depends on every earlier choice, so a state with a cache is advanced
one token at a time in every form (`ops.windowed_step`, `ops.windowed_ring`): `exchange` below is
the one place that choice is made.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from t2r.ops.reference import read_linear_state
from t2r.ops.state import LinearAttentionState
from t2r.ops.windowed import FeatureMapFn, key_features, repeat_heads


def self_recall_error(
    linear: LinearAttentionState, phi_keys: torch.Tensor, values: torch.Tensor, eps: float
) -> torch.Tensor:
    """How badly the linear state recalls each value from its key: phi_keys [B, L, S, F] (zero for
    an empty slot), values [B, L, S, D] fp32 -> squared error [B, L, S] fp32."""
    batch, heads, slots, features = phi_keys.shape
    # Read the state as queries would (the read's formula, one place): slot s of state head l is
    # query head l * S + s, which `read_linear_state` sends to state head l.
    as_queries = phi_keys.reshape(batch, heads * slots, features)
    numerator, denominator = read_linear_state(as_queries, linear.kv, linear.k_sum)
    recall = (numerator / (denominator[..., None] + eps)).reshape(batch, heads, slots, -1)
    return (recall - values).square().sum(-1)


@dataclass(frozen=True)
class Exchange:
    """What one token's eviction does: the key that goes into the linear state and the cache after.

    phi [B, L, F], value [B, L, D]: the evicted key's features (zero when nothing real leaves) and
    its value; keys, values [B, G, N, D], features [B, L, N, F], valid [B, N]: the cache after.
    """

    phi: torch.Tensor
    value: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    features: torch.Tensor
    valid: torch.Tensor


def exchange(
    cache_keys: torch.Tensor,
    cache_values: torch.Tensor,
    cache_features: torch.Tensor,
    cache_valid: torch.Tensor,
    leaving_key: torch.Tensor,
    leaving_value: torch.Tensor,
    leaving_linear_key: torch.Tensor,
    leaving_valid: torch.Tensor,
    linear: LinearAttentionState,
    *,
    feature_map_k: FeatureMapFn,
    eps: float,
) -> Exchange:
    """The key leaving the window against the cache: the lowest self-recall error is evicted.

    cache_keys, cache_values [B, G, N, D] (positions applied), cache_features [B, L, N, F] (phi of
    the cached keys, zero in an empty slot), cache_valid [B, N]; leaving_key, leaving_value [B, G, D],
    leaving_linear_key [B, G, D'], leaving_valid [B]; `linear`: the state before this token's decay
    and update (decay scales kv and k_sum alike: the recall does not change).
    """
    batch, kv_heads = leaving_key.shape[:2]
    linear_heads = linear.kv.shape[1]
    candidates_valid = torch.cat([leaving_valid[:, None], cache_valid], 1)  # [B, N + 1], the leaving key first
    leaving_phi = key_features(leaving_linear_key[:, :, None], leaving_valid[:, None], feature_map_k, linear_heads)
    phi = torch.cat([leaving_phi, cache_features], 2)  # [B, L, N + 1, F]
    candidate_values = torch.cat([leaving_value[:, :, None].to(cache_values.dtype), cache_values], 2)
    values_l = repeat_heads(candidate_values, linear_heads).float()  # [B, L, N + 1, D]
    error = self_recall_error(linear, phi, values_l, eps)  # [B, L, N + 1]
    if linear_heads != kv_heads:  # a state per query head: the group's heads share one cache
        error = error.reshape(batch, kv_heads, linear_heads // kv_heads, -1).sum(2)
    error = error.masked_fill(~candidates_valid[:, None, :], float("-inf"))
    chosen = error.argmin(-1)  # [B, G]; ties go to the first: an invalid leaving key before an empty slot
    chosen_l = chosen.repeat_interleave(linear_heads // kv_heads, 1)[:, :, None, None]  # [B, L, 1, 1]
    evicted_phi = phi.gather(2, chosen_l.expand(-1, -1, 1, phi.shape[-1]))[:, :, 0]
    evicted_value = values_l.gather(2, chosen_l.expand(-1, -1, 1, values_l.shape[-1]))[:, :, 0]
    # The leaving key takes the evicted one's slot (none when it is evicted itself: chosen 0).
    place = chosen[:, :, None] - 1 == torch.arange(cache_valid.shape[1], device=chosen.device)  # [B, G, N]

    def placed(cache: torch.Tensor, new: torch.Tensor, where: torch.Tensor = place) -> torch.Tensor:
        return torch.where(where[..., None], new[:, :, None].to(cache.dtype), cache)

    place_l = place.repeat_interleave(linear_heads // kv_heads, 1)  # [B, L, N]: a key/value head's state heads
    return Exchange(
        phi=evicted_phi,
        value=evicted_value,
        keys=placed(cache_keys, leaving_key),
        values=placed(cache_values, leaving_value),
        features=placed(cache_features, leaving_phi[:, :, 0], place_l),
        valid=cache_valid | (place.any(1) & leaving_valid[:, None]),
    )
