"""The hybrid's one-token step in place, on a ring buffer: the decode path's form of `ops.windowed`.

`windowed_attention_step` builds a new state every token (it concatenates the window and copies the
linear state). Here the state (`RingWindow`) is allocated once and written in place: the oldest
window slot is overwritten by the new token (a pointer shared by the batch), the linear state
takes a rank-1 update, and GQA reads key/value heads through views. What a token does to the state
and how the query reads it are `ops.windowed_step`'s `evict_into_linear_` and `hybrid_read`: only
the ring's bookkeeping is written here. Tested against the reference over whole sequences.
"""

from __future__ import annotations

import torch

from t2r.ops.global_cache import exchange
from t2r.ops.state import RingWindow
from t2r.ops.windowed import FeatureMapFn, key_features, repeat_heads
from t2r.ops.windowed_step import evict_into_linear_, hybrid_read


def windowed_ring_step_(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    phi_q: torch.Tensor,
    linear_keys: torch.Tensor,
    ring: RingWindow,
    slot: torch.Tensor,
    *,
    feature_map_k: FeatureMapFn,
    window_share: torch.Tensor,
    scale: float,
    eps: float = 1e-6,
    decay: torch.Tensor | None = None,
    sink_queries: torch.Tensor | None = None,
    softcap: float | None = None,
    leaving_linear_key: torch.Tensor | None = None,
) -> torch.Tensor:
    """One token for every row: q, phi_q [B, H, D | F]; k, v, linear_keys [B, G, D]; `ring` is
    written in place; slot [1] long: its oldest window slot (the ring pointer mod its window).

    The oldest slot's key leaves the window into the linear state, the new token takes its slot
    (while a row has fewer than S sinks, the token is a sink instead: its window slot stays invalid,
    counted once, never evicted), then the query reads sinks, global cache, window and linear state.
    With a global cache the oldest slot competes with the cached keys first (`ops.global_cache`). Keyword
    arguments as in `ops.windowed`. A ring that keeps no linear keys (`ring.linear_keys` [B, G, W, 0])
    is given the oldest slot's as `leaving_linear_key` [B, G, D] (its window key before positions,
    `t2r.modeling.window_keys`). Returns out [B, H, D] in v's dtype.
    """
    sinks, linear_heads = ring.sinks, ring.kv.shape[1]
    window_slot = slot + ring.fixed_slots if ring.fixed_slots else slot  # the slot in keys / values / valid
    # 1. Evict: phi(oldest linear key) (x) its value into the linear state (zero for an invalid slot),
    # or, with a global cache, the one of it and the cached keys that the state recalls best.
    if leaving_linear_key is None:
        leaving_key = ring.linear_keys.index_select(2, slot).to(linear_keys.dtype)  # [B, G, 1, D]
    else:
        leaving_key = leaving_linear_key[:, :, None].to(linear_keys.dtype)
    leaving_valid = ring.valid.index_select(1, window_slot)  # [B, 1]
    if ring.global_slots:
        cached = slice(sinks, ring.fixed_slots)
        swap = exchange(
            ring.keys[:, :, cached], ring.values[:, :, cached], ring.global_features, ring.valid[:, cached],
            ring.keys.index_select(2, window_slot)[:, :, 0], ring.values.index_select(2, window_slot)[:, :, 0],
            leaving_key[:, :, 0], leaving_valid[:, 0], ring.linear, feature_map_k=feature_map_k, eps=eps,
        )  # fmt: skip
        leaving, leaving_value = swap.phi, swap.value
        for part, new in ((ring.keys[:, :, cached], swap.keys), (ring.values[:, :, cached], swap.values)):
            part.copy_(new)  # views: written in place
        ring.global_features.copy_(swap.features)
        ring.valid[:, cached].copy_(swap.valid)
    else:
        leaving = key_features(leaving_key, leaving_valid, feature_map_k, linear_heads)[:, :, 0]
        leaving_value = repeat_heads(ring.values.index_select(2, window_slot), linear_heads)[:, :, 0].float()
    evict_into_linear_(ring.linear, leaving, leaving_value, decay)
    # 2. The new token takes the slot, or a sink slot while a row has fewer than S sinks.
    ring.keys.index_copy_(2, window_slot, k[:, :, None])
    ring.values.index_copy_(2, window_slot, v[:, :, None])
    if ring.linear_keys.shape[-1]:  # a ring that keeps its linear keys (else they come from `keys`)
        ring.linear_keys.index_copy_(2, slot, linear_keys[:, :, None])
    if sinks:
        sink_valid = ring.valid[:, :sinks]  # a view: written in place
        filled = sink_valid.sum(1, keepdim=True)  # [B, 1]
        place = torch.arange(sinks, device=filled.device)[None, :] == filled  # [B, S]; none once full
        for part, new in ((ring.keys[:, :, :sinks], k), (ring.values[:, :, :sinks], v)):
            part.copy_(torch.where(place[:, None, :, None], new[:, :, None], part))
        sink_valid.logical_or_(place)
        ring.valid.index_copy_(1, window_slot, filled >= sinks)
    else:
        ring.valid.index_fill_(1, window_slot, True)
    # 3. The query reads the sinks, the window (the new token included) and the linear state.
    out = hybrid_read(
        q, ring.keys, ring.values, ring.valid, sinks, phi_q, ring.linear,
        window_share=window_share, scale=scale, eps=eps, sink_queries=sink_queries, softcap=softcap,
    )  # fmt: skip
    return out.to(v.dtype)
