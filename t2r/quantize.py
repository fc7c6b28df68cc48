"""Smaller weights for decoding: int8 weight-only (per output channel) or bf16; the state stays fp32.

Batch-1 decoding reads every weight once per token, so its speed is bounded by memory bandwidth
divided by the bytes of the weights: bf16 halves them, int8 quarters them. `Int8Linear` keeps an
int8 matrix and one fp32 scale per output row (w ~ scale * w_int8, round to nearest) and multiplies
through PyTorch's `_weight_int8pack_mm` CPU kernel, which reads the int8 weights directly. Only the
big projections are replaced (attention q/k/v/o, the MLP, the output head); the feature maps, the
norms and the embedding lookup stay as they are.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from t2r.config import WEIGHT_FORMATS
from t2r.errors import UsageError

GEMV_ROWS = 16  # up to this many rows (decode batches), the int8 kernel; more (a prefill), dequantise


class Int8Linear(nn.Module):
    """y = x @ (scale * w_int8).T + bias, for x [..., in] in fp32: weight int8 [out, in], scale [out]."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # [out]
        self.register_buffer("weight", torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).float()
        if flat.shape[0] > GEMV_ROWS:
            # A prefill is compute-bound: one dequantised matrix and a BLAS GEMM beat the int8 kernel.
            out = flat @ (self.weight.float() * self.scale[:, None]).T
        else:
            out = torch._weight_int8pack_mm(flat, self.weight, self.scale)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features).to(x.dtype)


def _replaceable(name: str, module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and "feature_map" not in name


def with_weights(model: nn.Module, weight_format: str) -> nn.Module:
    """A copy of `model` whose projections are stored in `weight_format` (the original is untouched).

    fp32 returns the model itself; bf16 casts every parameter (the decode state stays fp32);
    int8 replaces each big nn.Linear by an Int8Linear (quantised once, here).
    """
    if weight_format not in WEIGHT_FORMATS:
        raise UsageError(f"unknown weight format {weight_format!r}; choose one of {', '.join(WEIGHT_FORMATS)}")
    if weight_format == "fp32":
        return model
    if weight_format == "bf16":
        return copy.deepcopy(model).to(torch.bfloat16)
    replaced = copy.deepcopy(model)
    targets = [name for name, module in replaced.named_modules() if _replaceable(name, module)]
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = replaced.get_submodule(parent_name) if parent_name else replaced
        setattr(parent, child, Int8Linear(getattr(parent, child)))
    return replaced
