"""Feature maps phi: [B, H, T, D] -> [B, H, T, F], non-negative, one small module each.

Linear attention replaces exp(q . k / sqrt(D)) by phi(q) . phi(k). Every map here is
non-negative, so the normaliser sum_s phi(q) . phi(k_s) is >= 0 and `eps` keeps it positive.

- `elu`      ELU(x) + 1 (Katharopoulos et al. 2020); F = D; no parameters.
- `rfa`      positive random features exp(w . x' - |x'|^2 / 2) / sqrt(F), x' = x / D^(1/4)
             (Performer FAVOR+ / RFA): an unbiased estimate of exp(q . k / sqrt(D)). The draws
             w ~ N(0, I) are fixed, seeded, and saved with the model (a buffer, not trained).
- `t2r`      relu(W x + b), W [H, D, F] learned per head (Kasai et al. 2021).
- `hedgehog` [softmax(W x + b), softmax(-(W x + b))] over the feature axis, W initialised to the
             identity (Zhang et al. 2024); F = 2 * feature_dim.
- `none`     F = 0: no linear part (the sliding-window baseline); the linear state has no entries.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from t2r.errors import UsageError


class FeatureMap(nn.Module):
    """Base class: `out_dim` is F, the size of phi(x) per head."""

    out_dim: int

    def __init__(self, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = head_dim


class EluFeatureMap(FeatureMap):
    def __init__(self, heads: int, head_dim: int) -> None:
        super().__init__(heads, head_dim)
        self.out_dim = head_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.elu(x) + 1.0


class RandomFeatureMap(FeatureMap):
    def __init__(self, heads: int, head_dim: int, feature_dim: int, generator: torch.Generator) -> None:
        super().__init__(heads, head_dim)
        self.out_dim = feature_dim
        # Bounded: w . x' - |x'|^2 / 2 <= |w|^2 / 2 (about D / 2), so exp never overflows fp32.
        self.register_buffer("omega", torch.randn(heads, head_dim, feature_dim, generator=generator))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scaled = x.float() * self.head_dim**-0.25  # so that phi(q) . phi(k) ~ exp(q . k / sqrt(D))
        projected = torch.einsum("bhtd,hdf->bhtf", scaled, self.omega.to(scaled.dtype))
        squared_norm = scaled.square().sum(-1, keepdim=True) / 2
        return (torch.exp(projected - squared_norm) / math.sqrt(self.out_dim)).to(x.dtype)


class LearnedLinearMap(FeatureMap):
    """A per-head affine map x W + b, W [H, D, F], b [H, F]; subclasses add the nonlinearity."""

    def __init__(self, heads: int, head_dim: int, feature_dim: int, weight: torch.Tensor) -> None:
        super().__init__(heads, head_dim)
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(torch.zeros(heads, feature_dim))

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bhtd,hdf->bhtf", x, self.weight) + self.bias[:, None, :]


class T2RFeatureMap(LearnedLinearMap):
    def __init__(self, heads: int, head_dim: int, feature_dim: int, generator: torch.Generator) -> None:
        # nn.Linear's default init, U(-1/sqrt(D), 1/sqrt(D)), per head.
        bound = head_dim**-0.5
        weight = (torch.rand(heads, head_dim, feature_dim, generator=generator) * 2 - 1) * bound
        super().__init__(heads, head_dim, feature_dim, weight)
        with torch.no_grad():
            self.bias.copy_((torch.rand(heads, feature_dim, generator=generator) * 2 - 1) * bound)
        self.out_dim = feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.project(x))


class HedgehogFeatureMap(LearnedLinearMap):
    def __init__(self, heads: int, head_dim: int, feature_dim: int) -> None:
        weight = torch.eye(head_dim, feature_dim).expand(heads, head_dim, feature_dim).clone()
        super().__init__(heads, head_dim, feature_dim, weight)
        self.out_dim = 2 * feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        projected = self.project(x)
        return torch.cat([projected.softmax(-1), (-projected).softmax(-1)], dim=-1)


class NoFeatureMap(FeatureMap):
    """phi with no features: x [B, H, T, D] -> [B, H, T, 0], so the linear part adds nothing."""

    def __init__(self, heads: int, head_dim: int) -> None:
        super().__init__(heads, head_dim)
        self.out_dim = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., :0]


def map_query_heads(feature_map: FeatureMap, queries: torch.Tensor) -> torch.Tensor:
    """phi of queries [B, H, T, D] -> [B, H, T, F] by a map with H heads, or with L < H heads (one
    per key/value head): then query head h goes through map head h // (H / L), as GQA reads keys."""
    batch, heads, length, head_dim = queries.shape
    if heads == feature_map.heads:
        return feature_map(queries)
    grouped = queries.reshape(batch, feature_map.heads, (heads // feature_map.heads) * length, head_dim)
    return feature_map(grouped).reshape(batch, heads, length, feature_map.out_dim)


def default_feature_dim(name: str, head_dim: int) -> int:
    return {"elu": head_dim, "rfa": 64, "t2r": 32, "hedgehog": head_dim, "none": 0}[name]


def build_feature_map(
    name: str, heads: int, head_dim: int, feature_dim: int | None, generator: torch.Generator
) -> FeatureMap:
    """A fresh feature map by name; `generator` makes the initial parameters reproducible."""
    size = feature_dim if feature_dim is not None else default_feature_dim(name, head_dim)
    if name == "elu":
        return EluFeatureMap(heads, head_dim)
    if name == "rfa":
        return RandomFeatureMap(heads, head_dim, size, generator)
    if name == "t2r":
        return T2RFeatureMap(heads, head_dim, size, generator)
    if name == "hedgehog":
        return HedgehogFeatureMap(heads, head_dim, size)
    if name == "none":
        return NoFeatureMap(heads, head_dim)
    raise UsageError(f"unknown feature map {name!r}; choose one of elu, rfa, t2r, hedgehog, none")
