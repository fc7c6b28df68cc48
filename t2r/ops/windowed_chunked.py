"""Chunked hybrid attention: exact, memory O(T * (C + W)) for chunk size C and window W.

Slots are numbered as in the reference (`ops.windowed`): the state's W window slots, then the T
new tokens; the query of new token t sits at slot W + t and its window is slots (t, W + t]. For a
chunk of C queries (slots W + nC .. W + nC + C - 1), every slot before nC is older than all their
windows, so it is read through a linear state (the initial state plus an exclusive prefix sum of
per-chunk states); the C + W slots nC .. nC + C + W - 1 are scored locally, each either in the
query's window (softmax), older (linear) or in its future (masked). Same signature as the reference.
With a decay, chunk n's prefix state is the state after nC steps (P_n, built by a matrix over
chunks, O(N^2) in the number of chunks but tiny next to the rest), read by query c of the chunk
with weight decay^(c + 1); a local older slot j counts decay^(c - j). The S sinks are scored by
every query (masked until the sink's token has come), under the same stabiliser as the window.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from t2r.ops.reference import no_tokens
from t2r.ops.state import HybridAttentionState
from t2r.ops.windowed import (
    FeatureMapFn,
    capped,
    combine,
    decay_powers,
    decayed_final_linear,
    key_features,
    no_global_cache,
    per_query_head,
    repeat_heads,
    softmax_with_sinks,
    take_sinks,
)


def _blocks(x: torch.Tensor, size: int, step: int) -> torch.Tensor:
    """[B, H, S, X] -> [B, H, N, size, X]: overlapping blocks of slots, `step` apart (N = (S - size) // step + 1).

    Made of ceil(size / step) shifted non-overlapping views, concatenated: the same tensor as
    `x.unfold(2, size, step)`, but its backward is slicing and adding (unfold's backward took ~10 ms
    of a ~150 ms layer forward + backward in training here, 4 x 512 tokens, 9 heads).
    """
    count = (x.shape[2] - size) // step + 1
    pieces = -(-size // step)
    x = F.pad(x, (0, 0, 0, max(0, (count - 1 + pieces) * step - x.shape[2])))
    shifted = [x[:, :, j * step : (j + count) * step].unflatten(2, (count, step)) for j in range(pieces)]
    return torch.cat(shifted, dim=3)[:, :, :, :size]


def chunked_windowed_attention(
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
    chunk_size: int = 64,
    sink_queries: torch.Tensor | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, HybridAttentionState]:
    """Shapes as in `ops.windowed.windowed_attention`; returns out [B, H, T, D] and the final state."""
    state = initial_state
    no_global_cache(state)
    batch, heads, length, head_dim = q.shape
    if length == 0:
        return no_tokens(q, v), state
    window, size = state.window, chunk_size
    chunks = -(-length // size)
    pad = chunks * size - length  # slots added after the last token: invalid, so they add nothing

    def slots(before: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        return F.pad(torch.cat([before, new.to(before.dtype)], dim=2), (0, 0, 0, pad))

    sinks = take_sinks(state, k, v, valid.bool())
    keys = slots(state.keys, k)  # [B, G, W + NC, D]
    values = slots(state.values, v)
    all_linear_keys = slots(state.linear_keys, linear_keys)
    all_valid = F.pad(torch.cat([state.valid, sinks.window_valid], dim=1), (0, pad))  # [B, W + NC]
    values_h = repeat_heads(values, heads).float()  # [B, H, W + NC, D]
    linear_heads = state.linear.kv.shape[1]  # L: H, or G for a state per key/value head
    values_l = repeat_heads(values, linear_heads).float()  # [B, L, W + NC, D]
    phi_k = key_features(all_linear_keys, all_valid, feature_map_k, linear_heads)  # [B, L, W + NC, F]
    feature_dim = phi_k.shape[-1]

    # Linear state before each chunk's local block: initial + slots [0, nC) (exclusive prefix sum),
    # built at the state's L heads and read by the query heads.
    leading_phi = phi_k[:, :, : chunks * size].reshape(batch, linear_heads, chunks, size, feature_dim)
    leading_v = values_l[:, :, : chunks * size].reshape(batch, linear_heads, chunks, size, head_dim)
    if decay is None:
        chunk_kv = torch.einsum("bhncf,bhncd->bhnfd", leading_phi, leading_v)
        chunk_k_sum = leading_phi.sum(3)
        kv_before = state.linear.kv.unsqueeze(2) + F.pad(chunk_kv.cumsum(2), (0, 0, 0, 0, 1, -1))
        k_sum_before = state.linear.k_sum.unsqueeze(2) + F.pad(chunk_k_sum.cumsum(2), (0, 0, 1, -1))
    else:
        # Chunk m's own state after its last step (slot j counts decay^(C - 1 - j)), then
        # P_n = decay^(nC) S_0 + sum_{m < n} decay^((n - 1 - m) C) Q_m, as one matrix over chunks.
        within = decay_powers(decay, size - 1 - torch.arange(size, device=q.device))  # [H, C]
        weighted_phi = leading_phi * within[None, :, None, :, None]
        chunk_kv = torch.einsum("bhncf,bhncd->bhnfd", weighted_phi, leading_v)
        chunk_k_sum = weighted_phi.sum(3)
        n = torch.arange(chunks, device=q.device)
        gap = n[:, None] - 1 - n[None, :]  # [N, M]
        across = decay_powers(decay, gap * size) * (gap >= 0)  # [H, N, M]
        initial = decay_powers(decay, n * size)  # [H, N]
        kv_before = initial[None, :, :, None, None] * state.linear.kv.unsqueeze(2) + torch.einsum(
            "hnm,bhmfd->bhnfd", across, chunk_kv
        )
        k_sum_before = initial[None, :, :, None] * state.linear.k_sum.unsqueeze(2) + torch.einsum(
            "hnm,bhmf->bhnf", across, chunk_k_sum
        )

    kv_before, k_sum_before = repeat_heads(kv_before, heads), repeat_heads(k_sum_before, heads)
    read_decay = per_query_head(decay, heads)

    # Local blocks of C + W slots starting at nC: [B, H, N, C + W, X].
    local_keys = _blocks(repeat_heads(keys, heads).float(), size + window, size)
    local_values = _blocks(values_h, size + window, size)
    local_valid = all_valid.unfold(1, size + window, size)  # [B, N, C + W]
    # A local slot older than query c (slot <= c) lies in the block's first C slots, the chunk's own:
    # the linear part reads those alone, as non-overlapping views [B, H, N, C, X].
    own_phi = repeat_heads(phi_k, heads)[:, :, : chunks * size].unflatten(2, (chunks, size))
    own_values = values_h[:, :, : chunks * size].unflatten(2, (chunks, size))

    def per_chunk(x: torch.Tensor) -> torch.Tensor:
        return F.pad(x.float(), (0, 0, 0, pad)).view(batch, heads, chunks, size, x.shape[-1])

    qc, phi_qc = per_chunk(q), per_chunk(phi_q)  # [B, H, N, C, D], [B, H, N, C, F]
    c = torch.arange(size, device=q.device)[:, None]  # query index in its chunk
    slot = torch.arange(size + window, device=q.device)[None, :]  # key index in the local block
    in_window = (slot > c) & (slot <= c + window)  # [C, C + W]
    older = slot[:, :size] <= c  # [C, C]: of the chunk's own slots

    scores = capped(torch.einsum("bhncd,bhnsd->bhncs", qc, local_keys) * scale, softcap)
    sink_qc = qc if sink_queries is None else per_chunk(sink_queries)
    sink_scores = torch.einsum("bhncd,bhsd->bhncs", sink_qc, repeat_heads(sinks.keys, heads).float()) * scale
    sink_scores = capped(sink_scores, softcap)
    query_index = torch.arange(chunks * size, device=q.device).view(chunks, size)
    sink_ok = sinks.visible(query_index)[:, None]  # [B, 1, N, C, S]
    soft, soft_sink = softmax_with_sinks(scores, in_window & local_valid[:, None, :, None, :], sink_scores, sink_ok)
    lin = torch.einsum("bhncf,bhnsf->bhncs", phi_qc, own_phi) * older  # [B, H, N, C, C]
    from_prefix = torch.einsum("bhncf,bhnfd->bhncd", phi_qc, kv_before)
    from_prefix_den = torch.einsum("bhncf,bhnf->bhnc", phi_qc, k_sum_before)
    if read_decay is not None:
        lin = lin * decay_powers(read_decay, c - slot[:, :size])[None, :, None]  # [1, H, 1, C, C]
        # prefix_weight [1, H, 1, C]: query c of a chunk reads the prefix state with decay^(c + 1)
        prefix_weight = decay_powers(read_decay, torch.arange(1, size + 1, device=q.device))[None, :, None]
        from_prefix, from_prefix_den = from_prefix * prefix_weight[..., None], from_prefix_den * prefix_weight
    out = combine(
        soft @ local_values + soft_sink @ repeat_heads(sinks.values, heads).float()[:, :, None],
        soft.sum(-1) + soft_sink.sum(-1),
        lin @ own_values + from_prefix,
        lin.sum(-1) + from_prefix_den,
        window_share,
        eps,
    )
    out = out.reshape(batch, heads, chunks * size, head_dim)[:, :, :length]

    # Slots [0, T) leave the window; slots [T, T + W) are the new window.
    leaving = slice(0, length)
    kept = slice(length, length + window)
    final_state = HybridAttentionState(
        linear=decayed_final_linear(state.linear, phi_k[:, :, leaving], values_l[:, :, leaving], decay),
        keys=keys[:, :, kept],
        values=values[:, :, kept],
        linear_keys=all_linear_keys[:, :, kept],
        valid=all_valid[:, kept],
        sink_keys=sinks.keys,
        sink_values=sinks.values,
        sink_valid=sinks.valid,
        global_keys=state.global_keys,
        global_values=state.global_values,
        global_features=state.global_features,
        global_valid=state.global_valid,
    )
    return out.to(v.dtype), final_state
