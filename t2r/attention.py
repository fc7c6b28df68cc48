"""The drop-in attention module: the teacher's projections, a feature map, linear attention.

`LinearAttention.forward(hidden, rotary, mask, state, op)` runs any of the three forms of
`t2r.ops` (parallel, chunked, recurrent) with the same weights: prefill, scoring and decoding are
the same maths. The state goes in and comes out; the module holds none.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from t2r.adapters.base import Adapter, HeadShape
from t2r.feature_maps import FeatureMap
from t2r.ops import AttentionOp
from t2r.state import LinearAttentionState


class LinearAttention(nn.Module):
    """Replaces one softmax attention layer.

    projections: the teacher's attention module, kept whole; the adapter reads its q/k/v/o
        projections, so those weights are the teacher's own tensors.
    feature_map_q: phi for queries; feature_map_k: phi for keys, or None when tied (phi_q is used).
    """

    def __init__(
        self,
        projections: nn.Module,
        adapter: Adapter,
        shape: HeadShape,
        feature_map_q: FeatureMap,
        feature_map_k: FeatureMap | None,
        eps: float,
    ) -> None:
        super().__init__()
        self.projections = projections
        self.feature_map_q = feature_map_q
        self.feature_map_k = feature_map_k
        self.adapter = adapter
        self.shape = shape
        self.eps = eps

    @property
    def feature_dim(self) -> int:
        return self.feature_map_q.out_dim

    def init_state(self, batch: int, device: torch.device | str = "cpu") -> LinearAttentionState:
        return LinearAttentionState.zeros(batch, self.shape.query_heads, self.feature_dim, self.shape.head_dim, device)

    def forward(
        self,
        hidden: torch.Tensor,
        rotary: Any,
        mask: torch.Tensor,
        state: LinearAttentionState,
        op: AttentionOp,
    ) -> tuple[torch.Tensor, LinearAttentionState]:
        """hidden [B, T, E], mask [B, T] (1 = real token, 0 = padding) -> out [B, T, E], next state."""
        q, k, v = self.adapter.project(self.projections, hidden, rotary)
        groups = self.shape.query_heads // self.shape.kv_heads
        if groups > 1:  # GQA: query head h reads key/value head h // groups, as in the teacher
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        phi_q = self.feature_map_q(q)  # [B, H, T, F]
        # A padded key leaves the numerator and the normaliser: zero its features.
        feature_map_k = self.feature_map_q if self.feature_map_k is None else self.feature_map_k
        phi_k = feature_map_k(k) * mask[:, None, :, None].to(k.dtype)
        out, next_state = op(phi_q, phi_k, v, initial_state=state, eps=self.eps)  # [B, H, T, D]
        out = out.transpose(1, 2).reshape(*hidden.shape[:-1], -1)
        return self.adapter.output(self.projections, out), next_state
