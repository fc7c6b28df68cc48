"""A state with a global cache over a sequence: the prefill's form of the cached hybrid.

Which keys a global cache holds depends on every earlier choice (`ops.global_cache`), so a state
with one advances token by token in every form. The reference is the step loop
(`ops.windowed_step.recurrent_windowed_attention`); here is the same loop made for prefill: what
does not depend on the cache is made once for the sequence, and each step is the exchange, the
eviction and the read of `ops.global_cache` and `ops.windowed_step`, nothing re-derived. Tested
against the reference (outputs and final state); `ops.dispatch` sends the parallel and chunked
forms of a cached state here.
"""

from __future__ import annotations

import torch

from t2r.ops.global_cache import exchange
from t2r.ops.reference import no_tokens
from t2r.ops.state import HybridAttentionState, LinearAttentionState
from t2r.ops.windowed import FeatureMapFn, take_sinks
from t2r.ops.windowed_step import evict_into_linear_, hybrid_read


def scanned_windowed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    phi_q: torch.Tensor,
    linear_keys: torch.Tensor,
    valid: torch.Tensor,
    initial_state: HybridAttentionState,
    *,
    feature_map_k: FeatureMapFn,
    window_share: torch.Tensor,
    scale: float,
    eps: float = 1e-6,
    decay: torch.Tensor | None = None,
    sink_queries: torch.Tensor | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, HybridAttentionState]:
    """A state with a global cache over a sequence, token by token: the prefill's form of the
    reference step loop (`ops.windowed_step.recurrent_windowed_attention`), shapes as in
    `ops.windowed`. The same exchange, eviction and read per token, but what does not depend on the
    cache is made once for the sequence (the sinks, every slot's key and value, the window as a
    slice of them), so a step is the exchange and the read alone. Returns out [B, H, T, D] and the
    final state."""
    state = initial_state
    length, window = q.shape[2], state.window
    if length == 0:
        return no_tokens(q, v), state
    sinks = take_sinks(state, k, v, valid.bool())
    keys = torch.cat([state.keys, k.to(state.keys.dtype)], dim=2)  # [B, G, W + T, D]: slot t leaves at step t
    values = torch.cat([state.values, v.to(state.values.dtype)], dim=2)
    all_linear_keys = torch.cat([state.linear_keys, linear_keys.to(state.linear_keys.dtype)], dim=2)
    slot_valid = torch.cat([state.valid, sinks.window_valid], dim=1)  # [B, W + T]
    sink_allowed = sinks.visible(torch.arange(length, device=q.device))  # [B, T, S]
    linear = LinearAttentionState(state.linear.kv.clone(), state.linear.k_sum.clone())
    cache = (state.global_keys, state.global_values, state.global_features, state.global_valid)
    outputs = []
    for t in range(length):
        swap = exchange(
            *cache, keys[:, :, t], values[:, :, t], all_linear_keys[:, :, t], slot_valid[:, t], linear,
            feature_map_k=feature_map_k, eps=eps,
        )  # fmt: skip
        evict_into_linear_(linear, swap.phi, swap.value, decay)
        cache = (swap.keys, swap.values, swap.features, swap.valid)
        in_window = slice(t + 1, t + 1 + window)  # the window after token t came: slots t+1 .. W+t
        out = hybrid_read(
            q[:, :, t],
            torch.cat([sinks.keys, swap.keys, keys[:, :, in_window]], 2),
            torch.cat([sinks.values, swap.values, values[:, :, in_window]], 2),
            torch.cat([sink_allowed[:, t], swap.valid, slot_valid[:, in_window]], 1),
            sinks.keys.shape[2], phi_q[:, :, t], linear,
            window_share=window_share, scale=scale, eps=eps, softcap=softcap,
            sink_queries=None if sink_queries is None else sink_queries[:, :, t],
        )  # fmt: skip
        outputs.append(out.to(v.dtype))
    kept = slice(length, length + window)
    final_state = HybridAttentionState(
        linear, keys[:, :, kept], values[:, :, kept], all_linear_keys[:, :, kept], slot_valid[:, kept],
        sinks.keys, sinks.values, sinks.valid, *cache,
    )  # fmt: skip
    return torch.stack(outputs, dim=2), final_state
