"""Smaller weights for decoding: bf16, int8 or int4 weight-only; the state stays fp32.

Batch-1 decoding reads every weight once per token, so its speed is bounded by memory bandwidth
divided by the bytes of the weights: bf16 halves them, int8 quarters them, int4 takes an eighth
(plus a scale and a zero per group of 32). Only the big projections are replaced (attention
q/k/v/o, the MLP, the output head: every `nn.Linear`, and every transformers `Conv1D`, GPT-2's
transposed linear layer); the feature maps, the norms and the embedding lookup stay.
- `Int8Linear`: an int8 matrix and one scale per output row (w ~ scale * w_int8, round to nearest),
  multiplied by PyTorch's `_weight_int8pack_mm` CPU kernel, which reads the int8 weights directly.
- `Int4Linear`: 4-bit blocks of 32 inputs with a step and a minimum in fp16 (w ~ d * q + m, q in
  0..15; min/max per block): ggml's Q4_1, the format of the default model's GGUF, whose weights
  round-trip exactly. Multiplied by t2r's own AVX2 kernel (t2r.ops.int4_matmul: int8 activations,
  integer dot products: 1.35x PyTorch's `_weight_int4pack_mm_for_cpu` at batch 1 here, BENCHMARKS.md
  "int4-kernel"; the int8 activations cost some agreement with the fp32 model, measured there too).
The int8 kernel takes bf16 activations: its fp32-activation path is a slow one at batch 1
(BENCHMARKS.md, bench notes). Inputs are cast in and outputs back.
`with_dense_copies(model)` gives each quantised layer a dense copy of its dequantised weight for
many rows (a prefill, a big decode batch: t2r.ops.rows_matmul), what `t2r serve` decodes with.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from t2r.errors import UsageError
from t2r.modeling.config import WEIGHT_FORMATS
from t2r.ops.int4_matmul import GROUP as INT4_GROUP
from t2r.ops.int4_matmul import Int4Weight, dequantise_int4, kernel_available, quantise_int4
from t2r.ops.rows_matmul import dense_layout, int4_linear, int8_linear


class Int8Linear(nn.Module):
    """y = x @ (scale * w_int8).T + bias, for x [..., in] in fp32: weight int8 [out, in], scale [out]."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # [out]
        self.register_buffer("weight", torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale)
        self.register_buffer("scale_bf16", scale.to(torch.bfloat16))  # the kernel's bf16 path
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # with_dense_copies: the weight for dense_from rows or more (not saved: made again in a moment)
        self.register_buffer("dense", None, persistent=False)
        self.dense_from = 0

    def dequantised(self) -> torch.Tensor:
        """The weight the kernel multiplies by, [out, in] fp32."""
        return self.weight.float() * self.scale[:, None]

    def extra_repr(self) -> str:  # also what a compiled step is keyed on (step_artifacts.describe)
        return f"in={self.in_features}, out={self.out_features}, dense_from={self.dense_from}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        out = int8_linear(flat, self.weight, self.scale, self.scale_bf16, self.dense, self.dense_from)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features).to(x.dtype)


class Int4Linear(nn.Module):
    """y = x @ w.T + bias with w [out, in] in 4-bit blocks of 32 inputs (GGUF Q4_1's grid), x [..., in].

    codes [out, in / 32, 16] uint8 (32 codes q in 0..15 a block), steps and minimums [out, in / 32]
    fp16: w = d * q + m (t2r.ops.int4_matmul). Activations are rounded to int8 per block of 32 on
    every path: decoding rows through t2r's AVX2 kernel, a prefill, another device or a CPU
    without the kernel through the PyTorch reference of the same arithmetic.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = quantise_int4(linear.weight)
        self.register_buffer("codes", weight.codes)
        self.register_buffer("steps", weight.steps)
        self.register_buffer("minimums", weight.minimums)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # with_dense_copies: the weight for dense_from rows or more (not saved: made again in a moment)
        self.register_buffer("dense", None, persistent=False)
        self.dense_from = 0
        kernel_available()  # built (or found wanting) now, not inside a compiled graph

    @staticmethod
    def fits(linear: nn.Linear) -> bool:
        """Whether the blocks take this shape (whole blocks of 32 inputs)."""
        return linear.weight.shape[1] % INT4_GROUP == 0

    def dequantised(self) -> torch.Tensor:
        """The weight the kernel multiplies by, [out, in] fp32."""
        return dequantise_int4(self.weight_int4)

    def extra_repr(self) -> str:  # also what a compiled step is keyed on (step_artifacts.describe)
        return f"in={self.in_features}, out={self.out_features}, dense_from={self.dense_from}"

    @property
    def weight_int4(self) -> Int4Weight:
        """The buffers as the ops take them."""
        return Int4Weight(self.codes, self.steps, self.minimums)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = int4_linear(x.reshape(-1, self.in_features), self.weight_int4, self.dense, self.dense_from)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features).to(x.dtype)


def _replaceable(name: str, module: nn.Module) -> bool:
    return isinstance(module, nn.Linear | Conv1D) and "feature_map" not in name


def as_linear(module: nn.Linear | Conv1D) -> nn.Linear:
    """The nn.Linear that computes what `module` does. A Conv1D computes x @ W + b with W [in, out]:
    the transposed weight of a Linear."""
    if isinstance(module, nn.Linear):
        return module
    in_features, out_features = module.weight.shape
    linear = nn.Linear(in_features, out_features, bias=module.bias is not None, device=module.weight.device)
    with torch.no_grad():
        linear.weight.copy_(module.weight.T)
        if module.bias is not None:
            linear.bias.copy_(module.bias)
    return linear


def with_weights(model: nn.Module, weight_format: str) -> nn.Module:
    """A copy of `model` whose projections are stored in `weight_format` (the original is untouched).

    fp32 returns the model itself; bf16 casts every parameter (the decode state stays fp32);
    int8 / int4 replace each big nn.Linear (or Conv1D) by an Int8Linear / Int4Linear (quantised once, here;
    with int4, the output head and any projection whose shape the int4 kernel does not take are
    int8).
    """
    if weight_format not in WEIGHT_FORMATS:
        raise UsageError(f"unknown weight format {weight_format!r}; choose one of {', '.join(WEIGHT_FORMATS)}")
    if weight_format == "fp32":
        return model
    if weight_format == "bf16":
        return copy.deepcopy(model).to(torch.bfloat16)
    replaced = copy.deepcopy(model)
    heads = [m.get_output_embeddings() for m in replaced.modules() if hasattr(m, "get_output_embeddings")]
    targets = [(name, module) for name, module in replaced.named_modules() if _replaceable(name, module)]
    for name, module in targets:
        linear = as_linear(module)
        # int4: the output head stays 8-bit (the GGUF's token embedding is Q8_0; at 4 bits the
        # converted model's top-1 agreement with the teacher fell: BENCHMARKS.md, int4 notes).
        four_bits = weight_format == "int4" and all(module is not h for h in heads) and Int4Linear.fits(linear)
        parent_name, _, child = name.rpartition(".")
        parent = replaced.get_submodule(parent_name) if parent_name else replaced
        setattr(parent, child, Int4Linear(linear) if four_bits else Int8Linear(linear))
    return replaced


def with_dense_copies(model: nn.Module) -> str | None:
    """Give every Int4Linear / Int8Linear of `model` (in place) a dense copy of its dequantised
    weight, which their products take from `dense_from` rows on (t2r.ops.rows_matmul.dense_layout:
    bf16 from 12 rows where the CPU has AMX tiles). The copies are not kept with the decode weights
    (dequantising is quick). Returns a line saying what was added, or None if nothing was quantised."""
    layers = [module for module in model.modules() if isinstance(module, Int4Linear | Int8Linear)]
    if not layers:
        return None
    dtype, dense_from = dense_layout(next(layers[0].buffers()).device)
    total = 0
    for layer in layers:
        with torch.no_grad():
            layer.dense = layer.dequantised().to(dtype).contiguous()
        layer.dense_from = dense_from
        total += layer.dense.nbytes
    name = str(dtype).removeprefix("torch.")
    return f"{name} copies of the quantised weights ({total / 2**20:.0f} MiB) for {dense_from} rows or more"
