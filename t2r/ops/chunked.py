"""Chunked causal linear attention: exact, memory O(T * C) for chunk size C.

The sequence is cut into N = ceil(T / C) chunks. Inside a chunk the quadratic form is used
([B, H, N, C, C] scores); across chunks each chunk reads the state summed over all earlier chunks
(an exclusive prefix sum of per-chunk states, [B, H, N, F, D]). Same signature as the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from t2r.ops.reference import _start, no_tokens
from t2r.ops.state import LinearAttentionState


def chunked_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    initial_state: LinearAttentionState | None = None,
    eps: float = 1e-6,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, LinearAttentionState]:
    """q, k: [B, H, T, F]; v: [B, H, T, D]. Returns out [B, H, T, D] (v's dtype), final state (fp32)."""
    state = _start(q, v, initial_state)
    batch, heads, length, feature_dim = q.shape
    head_dim = v.shape[-1]
    if length == 0:
        return no_tokens(q, v), state
    chunks = -(-length // chunk_size)
    pad = chunks * chunk_size - length
    # Zero padding at the end: a zero phi(k) adds nothing to any sum; padded outputs are dropped.
    qf, kf, vf = (F.pad(x.float(), (0, 0, 0, pad)) for x in (q, k, v))
    qc = qf.view(batch, heads, chunks, chunk_size, feature_dim)
    kc = kf.view(batch, heads, chunks, chunk_size, feature_dim)
    vc = vf.view(batch, heads, chunks, chunk_size, head_dim)

    chunk_kv = torch.einsum("bhncf,bhncd->bhnfd", kc, vc)  # [B, H, N, F, D]
    chunk_k_sum = kc.sum(3)  # [B, H, N, F]
    # State before each chunk = initial state + all earlier chunks (exclusive prefix sum).
    kv_before = state.kv.unsqueeze(2) + F.pad(chunk_kv.cumsum(2), (0, 0, 0, 0, 1, -1))
    k_sum_before = state.k_sum.unsqueeze(2) + F.pad(chunk_k_sum.cumsum(2), (0, 0, 1, -1))

    scores = torch.einsum("bhncf,bhnsf->bhncs", qc, kc).tril()  # [B, H, N, C, C]
    numerator = scores @ vc + torch.einsum("bhncf,bhnfd->bhncd", qc, kv_before)
    denominator = scores.sum(-1) + torch.einsum("bhncf,bhnf->bhnc", qc, k_sum_before)
    out = numerator / (denominator.unsqueeze(-1) + eps)
    out = out.reshape(batch, heads, chunks * chunk_size, head_dim)[:, :, :length]
    final_state = LinearAttentionState(
        kv=kv_before[:, :, -1] + chunk_kv[:, :, -1],
        k_sum=k_sum_before[:, :, -1] + chunk_k_sum[:, :, -1],
    )
    return out.to(v.dtype), final_state
