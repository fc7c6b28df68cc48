"""Recurrent state: the whole memory of a converted model, allocated, passed in and returned.

Its size depends on batch, heads and feature sizes only, never on how many tokens it has seen.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LinearAttentionState:
    """State of one linear-attention layer, always fp32.

    kv:    [B, H, F, D]  sum over seen tokens of phi(k_s) outer v_s
    k_sum: [B, H, F]     sum over seen tokens of phi(k_s) (the normaliser)
    """

    kv: torch.Tensor
    k_sum: torch.Tensor

    @classmethod
    def zeros(
        cls, batch: int, heads: int, feature_dim: int, head_dim: int, device: torch.device | str = "cpu"
    ) -> LinearAttentionState:
        return cls(
            kv=torch.zeros(batch, heads, feature_dim, head_dim, dtype=torch.float32, device=device),
            k_sum=torch.zeros(batch, heads, feature_dim, dtype=torch.float32, device=device),
        )

    def nbytes(self) -> int:
        return self.kv.nbytes + self.k_sum.nbytes

    def select(self, index: torch.Tensor) -> LinearAttentionState:
        """Keep the batch rows in `index` (a sequence leaving the batch)."""
        return LinearAttentionState(self.kv[index], self.k_sum[index])


@dataclass(frozen=True)
class ModelState:
    """State of a whole converted model.

    layers: one LinearAttentionState per layer.
    seen:   [B] int64, real (unpadded) tokens seen so far per sequence; the next position id.
    """

    layers: tuple[LinearAttentionState, ...]
    seen: torch.Tensor

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers) + self.seen.nbytes

    def select(self, index: torch.Tensor) -> ModelState:
        return ModelState(tuple(layer.select(index) for layer in self.layers), self.seen[index])
