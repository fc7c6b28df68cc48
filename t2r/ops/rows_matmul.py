"""A quantised layer's product, chosen at run time by how many rows x has.

A decode step of one row reads every weight once: the int4 / int8 GEMV kernels, which read the
small weights directly, are the fastest. Many rows (a prefill segment, a decode batch of 8 or
more) make it a GEMM: the kernels read the weights once per few rows (the int4 kernel's time grows
~linearly with rows), and the references dequantise the whole matrix on every call. So a layer may
keep a *dense copy* of its dequantised weight for many rows: bf16 where the CPU multiplies bf16 in
AMX tiles (flat in rows: a 32-row step of the default model's projections costs what a 4-row int4
one does, BENCHMARKS.md "serve"), else fp32 (more rows than the kernels take). With a dense copy
the many-row product is `x.to(dense.dtype) @ dense.T`: the dequantised weight's (bf16: rounded to
bf16, as `--weights bf16` is), no longer bit for bit the kernels' function.

The choice is made inside a custom op, opaque to `torch.compile`: one compiled step serves every
batch of 2 or more rows (no guard on the row count, no recompilation at a threshold).

    int4_linear(x, weight, dense, dense_from)      x [M, K] -> [M, N] fp32 (Int4Weight of N x K)
    int8_linear(x, weight, scale, scale_bf16, dense, dense_from)   weight int8 [N, K], scale [N]
    dense_layout(device)                           (dtype, dense_from) of a dense copy on a device
"""

from __future__ import annotations

import torch

from t2r.ops.int4_matmul import GEMV_ROWS, Int4Weight, int4_matmul, kernel_available

# With a bf16 dense copy in AMX tiles, from this many rows the copy wins over the int4 kernel: the
# shipped model's compiled step (`python scripts/step_rows_speed.py`) took 52 ms at 8 rows in int4
# and 56 with the copy (it reads 256 MB of bf16 weights, int4 70 MB), 87 against 68 at 16 rows.
AMX_DENSE_FROM = 12


def dense_layout(device: torch.device) -> tuple[torch.dtype, int]:
    """The dense copy a quantised layer keeps on `device` for many rows, and from how many rows it
    is used: bf16 from AMX_DENSE_FROM on a CPU with AMX tiles; fp32 beyond the kernels' GEMV_ROWS on
    another CPU (fp32 GEMM there loses to the kernels below it); bf16 from 1 row off the CPU (no kernel)."""
    if device.type != "cpu":
        return torch.bfloat16, 1
    if torch.cpu._is_amx_tile_supported():
        return torch.bfloat16, AMX_DENSE_FROM
    return torch.float32, GEMV_ROWS + 1


def dense_matmul(x: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ dense [N, K].T in the copy's dtype -> [M, N] fp32."""
    return (x.to(dense.dtype) @ dense.T).float()


def int4_by_rows(
    x: torch.Tensor,
    codes: torch.Tensor,
    steps: torch.Tensor,
    minimums: torch.Tensor,
    dense: torch.Tensor | None,
    dense_from: int,
) -> torch.Tensor:
    """The choice: the dense copy from `dense_from` rows (if the layer has one), else int4_matmul."""
    if dense is not None and x.shape[0] >= dense_from:
        return dense_matmul(x, dense)
    return int4_matmul(x, Int4Weight(codes, steps, minimums))


def int8_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, scale_bf16: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ (scale * weight).T -> [M, N] fp32 (scale_bf16: the same scale in bf16). Up to
    GEMV_ROWS rows PyTorch's int8 kernel (bf16 activations: its fp32 path is a slow one at batch 1);
    more (a prefill, compute-bound) or off the CPU: one dequantised matrix and a GEMM."""
    if x.shape[0] > GEMV_ROWS or x.device.type != "cpu":
        return x @ (weight.float() * scale[:, None]).T
    return torch._weight_int8pack_mm(x.to(torch.bfloat16), weight, scale_bf16).float()


def int8_by_rows(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    scale_bf16: torch.Tensor,
    dense: torch.Tensor | None,
    dense_from: int,
) -> torch.Tensor:
    """The choice: the dense copy from `dense_from` rows (if the layer has one), else int8_matmul."""
    if dense is not None and x.shape[0] >= dense_from:
        return dense_matmul(x, dense)
    return int8_matmul(x, weight, scale, scale_bf16)


# The same choices as custom ops, for a compiled step: the op is opaque to the compiler, so the row
# count is looked at when the step runs (a branch in traced code would guard the step to one side).
_int4_op = torch.library.custom_op("t2r_rows::int4_linear", int4_by_rows, mutates_args=())
_int8_op = torch.library.custom_op("t2r_rows::int8_linear", int8_by_rows, mutates_args=())


@_int4_op.register_fake
def _(x: torch.Tensor, codes: torch.Tensor, steps: torch.Tensor, minimums: torch.Tensor,
      dense: torch.Tensor | None, dense_from: int) -> torch.Tensor:  # fmt: skip
    return x.new_empty(x.shape[0], codes.shape[0], dtype=torch.float32)


@_int8_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, scale_bf16: torch.Tensor,
      dense: torch.Tensor | None, dense_from: int) -> torch.Tensor:  # fmt: skip
    return x.new_empty(x.shape[0], weight.shape[0], dtype=torch.float32)


def through_op(x: torch.Tensor) -> bool:
    """Whether the choice goes through its op: in a compiled step of more than one row (there the
    row count is symbolic). A step compiled for one row sees a plain 1 and chooses while it is traced:
    the op's Python dispatch costs ~50 us a call, a quarter of a 1-row step's time."""
    return torch.compiler.is_compiling() and x.shape[0] != 1


def int4_linear(x: torch.Tensor, weight: Int4Weight, dense: torch.Tensor | None, dense_from: int) -> torch.Tensor:
    """x [M, K] float -> [M, N] fp32 (`int4_by_rows`; through an op when compiled: the kernel's C++
    one where the layer has a dense copy and the kernel runs, else the Python one)."""
    x = x.float().contiguous()
    if not through_op(x):
        return int4_by_rows(x, *weight, dense, dense_from)
    if dense is not None and x.device.type == "cpu" and kernel_available():
        return torch.ops.t2r_int4.int4_linear_rows(x, *weight, dense, dense_from)
    return _int4_op(x, *weight, dense, dense_from)


def int8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    scale_bf16: torch.Tensor,
    dense: torch.Tensor | None,
    dense_from: int,
) -> torch.Tensor:
    """x [M, K] float -> [M, N] fp32 (`int8_by_rows`; through its op when compiled)."""
    x = x.float().contiguous()
    choose = _int8_op if through_op(x) else int8_by_rows
    return choose(x, weight, scale, scale_bf16, dense, dense_from)
