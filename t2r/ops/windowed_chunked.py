"""Chunked hybrid attention: exact, memory O(T * (C + W)) for chunk size C and window W.

Slots are numbered as in the reference (`ops.windowed`): the state's W window slots, then the T
new tokens; the query of new token t sits at slot W + t and its window is slots (t, W + t]. For a
chunk of C queries (slots W + nC .. W + nC + C - 1), every slot before nC is older than all their
windows, so it is read through a linear state (the initial state plus an exclusive prefix sum of
per-chunk states); the C + W slots nC .. nC + C + W - 1 are scored locally, each either in the
query's window (softmax), older (linear) or in its future (masked). Same signature as the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from t2r.ops.windowed import (
    FeatureMapFn,
    combine,
    key_features,
    masked_softmax_weights,
    repeat_heads,
)
from t2r.state import HybridAttentionState, LinearAttentionState


def _blocks(x: torch.Tensor, size: int, step: int) -> torch.Tensor:
    """[B, H, S, X] -> [B, H, N, size, X]: overlapping blocks of slots, `step` apart."""
    return x.unfold(2, size, step).transpose(-1, -2)


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
    chunk_size: int = 64,
) -> tuple[torch.Tensor, HybridAttentionState]:
    """Shapes as in `ops.windowed.windowed_attention`; returns out [B, H, T, D] and the final state."""
    state = initial_state
    batch, heads, length, head_dim = q.shape
    window, size = state.window, chunk_size
    chunks = -(-length // size)
    pad = chunks * size - length  # slots added after the last token: invalid, so they add nothing

    def slots(before: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        return F.pad(torch.cat([before, new.to(before.dtype)], dim=2), (0, 0, 0, pad))

    keys = slots(state.keys, k)  # [B, G, W + NC, D]
    values = slots(state.values, v)
    all_linear_keys = slots(state.linear_keys, linear_keys)
    all_valid = F.pad(torch.cat([state.valid, valid.bool()], dim=1), (0, pad))  # [B, W + NC]
    values_h = repeat_heads(values, heads).float()  # [B, H, W + NC, D]
    phi_k = key_features(all_linear_keys, all_valid, feature_map_k, heads)  # [B, H, W + NC, F]
    feature_dim = phi_k.shape[-1]

    # Linear state before each chunk's local block: initial + slots [0, nC) (exclusive prefix sum).
    leading_phi = phi_k[:, :, : chunks * size].reshape(batch, heads, chunks, size, feature_dim)
    leading_v = values_h[:, :, : chunks * size].reshape(batch, heads, chunks, size, head_dim)
    chunk_kv = torch.einsum("bhncf,bhncd->bhnfd", leading_phi, leading_v)
    chunk_k_sum = leading_phi.sum(3)
    kv_before = state.linear.kv.unsqueeze(2) + F.pad(chunk_kv.cumsum(2), (0, 0, 0, 0, 1, -1))
    k_sum_before = state.linear.k_sum.unsqueeze(2) + F.pad(chunk_k_sum.cumsum(2), (0, 0, 1, -1))

    # Local blocks of C + W slots starting at nC: [B, H, N, C + W, X].
    local_keys = _blocks(repeat_heads(keys, heads).float(), size + window, size)
    local_values = _blocks(values_h, size + window, size)
    local_phi = _blocks(phi_k, size + window, size)
    local_valid = all_valid.unfold(1, size + window, size)  # [B, N, C + W]

    def per_chunk(x: torch.Tensor) -> torch.Tensor:
        return F.pad(x.float(), (0, 0, 0, pad)).view(batch, heads, chunks, size, x.shape[-1])

    qc, phi_qc = per_chunk(q), per_chunk(phi_q)  # [B, H, N, C, D], [B, H, N, C, F]
    c = torch.arange(size, device=q.device)[:, None]  # query index in its chunk
    slot = torch.arange(size + window, device=q.device)[None, :]  # key index in the local block
    in_window = (slot > c) & (slot <= c + window)  # [C, C + W]
    older = slot <= c

    scores = torch.einsum("bhncd,bhnsd->bhncs", qc, local_keys) * scale
    soft = masked_softmax_weights(scores, in_window & local_valid[:, None, :, None, :])
    lin = torch.einsum("bhncf,bhnsf->bhncs", phi_qc, local_phi) * older
    out = combine(
        soft @ local_values,
        soft.sum(-1),
        lin @ local_values + torch.einsum("bhncf,bhnfd->bhncd", phi_qc, kv_before),
        lin.sum(-1) + torch.einsum("bhncf,bhnf->bhnc", phi_qc, k_sum_before),
        window_share,
        eps,
    )
    out = out.reshape(batch, heads, chunks * size, head_dim)[:, :, :length]

    # Slots [0, T) leave the window; slots [T, T + W) are the new window.
    leaving = slice(0, length)
    kept = slice(length, length + window)
    final_state = HybridAttentionState(
        linear=LinearAttentionState(
            kv=state.linear.kv + torch.einsum("bhsf,bhsd->bhfd", phi_k[:, :, leaving], values_h[:, :, leaving]),
            k_sum=state.linear.k_sum + phi_k[:, :, leaving].sum(2),
        ),
        keys=keys[:, :, kept],
        values=values[:, :, kept],
        linear_keys=all_linear_keys[:, :, kept],
        valid=all_valid[:, kept],
    )
    return out.to(v.dtype), final_state
