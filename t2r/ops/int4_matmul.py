"""y = x @ w.T with w in 4-bit blocks (GGUF Q4_1's grid): the format, its reference and its CPU kernel.

A block holds 32 inputs of one output row: 32 codes q in 0..15 in 16 bytes (byte i: input i in the
low nibble, input i + 16 in the high one), a step d and a minimum m (fp16); w[i] = d * q[i] + m,
the grid the default model's GGUF stores its layers on (exactly). The three arrays are kept apart
(`Int4Weight`) so that the kernel loads two blocks' codes at once and converts eight steps at once.

    quantise_int4(weight)                  [N, K] float -> Int4Weight (codes [N, K / 32, 16] uint8,
                                           steps and minimums [N, K / 32] fp16)
    dequantise_int4(weight)                -> [N, K] fp32
    int4_matmul_reference(x, weight, ...)  the spec: fp32, dequantised weight; with
                                           `round_activations`, x rounded to int8 per block of 32 as
                                           the kernel does (scale max|x| / 127, round half to even)
    int4_matmul(x, weight)                 the kernel for up to GEMV_ROWS rows of x on an AVX2 CPU
                                           (int4_matmul.cpp, built once by torch.utils.cpp_extension),
                                           the rounding reference otherwise (a prefill, a GPU, no
                                           compiler): one function whichever path runs
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import NamedTuple

import torch

from t2r.ops.toolchain import cpp_compiler_missing

log = logging.getLogger(__name__)

GROUP = 32  # inputs per block
GEMV_ROWS = 16  # up to this many rows of x (decode batches) the kernel; more (a prefill): dequantise


class Int4Weight(NamedTuple):
    """codes [N, G, 16] uint8, steps [N, G] fp16, minimums [N, G] fp16 (G = K / 32)."""

    codes: torch.Tensor
    steps: torch.Tensor
    minimums: torch.Tensor


def quantise_int4(weight: torch.Tensor) -> Int4Weight:
    """[N, K] float (K a multiple of 32) -> Int4Weight: per block, the minimum m and the step
    d = (max - min) / 15 (both rounded to fp16), codes round((w - m) / d) in 0..15."""
    out_features, in_features = weight.shape
    if in_features % GROUP:
        raise ValueError(f"int4 blocks need inputs in multiples of {GROUP}, not {in_features}")
    if weight.is_meta:  # shapes only (a model built to be filled from a file): no arithmetic to trace
        groups = in_features // GROUP
        empty = [torch.empty(out_features, groups, *shape, dtype=dtype, device="meta")
                 for shape, dtype in (((16,), torch.uint8), ((), torch.float16), ((), torch.float16))]  # fmt: skip
        return Int4Weight(*empty)
    grouped = weight.detach().float().view(out_features, in_features // GROUP, GROUP)
    low = grouped.amin(-1).half()
    step = ((grouped.amax(-1) - low.float()) / 15).half()
    safe = step.float().clamp(min=torch.finfo(torch.float16).tiny)
    codes = torch.round((grouped - low.float()[..., None]) / safe[..., None]).clamp(0, 15).to(torch.uint8)
    nibbles = codes[..., :16] | (codes[..., 16:] << 4)  # [N, G, 16]
    return Int4Weight(nibbles.contiguous(), step.contiguous(), low.contiguous())


def unpacked_codes(weight: Int4Weight) -> torch.Tensor:
    """The 4-bit codes in input order: [N, G, 32] uint8, q in 0..15."""
    return torch.cat([weight.codes & 0x0F, weight.codes >> 4], -1)


def dequantise_int4(weight: Int4Weight) -> torch.Tensor:
    """Int4Weight -> w [N, G * 32] fp32."""
    full = unpacked_codes(weight).float() * weight.steps.float()[..., None] + weight.minimums.float()[..., None]
    return full.reshape(weight.codes.shape[0], -1)


def round_activations_int8(x: torch.Tensor) -> torch.Tensor:
    """x [M, K] fp32 as the kernel sees it: per block of 32, step = max|x| / 127, codes round(x / step)."""
    grouped = x.float().view(x.shape[0], -1, GROUP)
    step = grouped.abs().amax(-1, keepdim=True) / 127
    inverse = torch.where(step > 0, 1 / step, torch.zeros_like(step))
    return (torch.round(grouped * inverse) * step).view_as(x)


def int4_matmul_reference(x: torch.Tensor, weight: Int4Weight, round_activations: bool = False) -> torch.Tensor:
    """The spec. x [M, K], weight (N outputs, K inputs) -> [M, N] fp32.

    With `round_activations` the product is the kernel's: its int8 inputs times the weight, except that
    the kernel adds each block's m times the sum of the unrounded inputs (the offset term is exact).
    """
    x = x.float()
    if not round_activations:
        return x @ dequantise_int4(weight).to(x.device).T
    codes = unpacked_codes(weight).float().to(x.device)  # [N, G, 32]
    scaled = (codes * weight.steps.float().to(x.device)[..., None]).reshape(codes.shape[0], -1)  # d * q
    sums = x.view(x.shape[0], -1, GROUP).sum(-1)  # [M, G]
    return round_activations_int8(x) @ scaled.T + sums @ weight.minimums.float().to(x.device).T


_loaded: bool | None = None  # kernel_available()'s answer, once known
_build_error: str | None = None  # why a build on a machine that can build the kernel failed


def kernel_available() -> bool:
    """Whether the CPU kernel is built and loaded (once per process; the build is cached on disk).

    Call it eagerly (Int4Linear does, when it quantises) before a compiled graph reaches int4_matmul:
    a compiled graph then reads only the answer."""
    global _loaded
    if _loaded is None:
        _loaded = _load_kernel()
    return _loaded


def machine_lacks_kernel() -> str | None:
    """Why this machine cannot run the kernel (not Linux, no AVX2, no C++ compiler, turned off by
    T2R_NO_INT4_KERNEL), or None where it can: there, a kernel that is not available is a failed build."""
    if sys.platform != "linux":
        return f"the int4 kernel is built on Linux only, not {sys.platform}"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        return f"the int4 kernel needs AVX2; this CPU's capability is {capability}"
    if os.environ.get("T2R_NO_INT4_KERNEL"):
        return "T2R_NO_INT4_KERNEL is set"
    return cpp_compiler_missing()


def kernel_build_error() -> str | None:
    """On a machine that can build the kernel, why its build failed (None if it was built or not tried)."""
    return _build_error


def _load_kernel() -> bool:
    global _build_error
    if machine_lacks_kernel() is not None:
        return False
    from torch.utils import cpp_extension

    source = (Path(__file__).with_name("int4_matmul.cpp")).read_text()
    try:
        cpp_extension.load_inline(
            name="t2r_int4_matmul",
            cpp_sources=[source],
            extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
    except (RuntimeError, OSError, ImportError) as error:  # a failed build (the machine has what it needs)
        _build_error = str(error).strip() or type(error).__name__
        first_line = _build_error.splitlines()[0]
        log.warning("int4 kernel not built (%s); int4 layers run on the PyTorch reference", first_line)
        return False
    torch.library.register_fake("t2r_int4::int4_matmul")(_fake)
    torch.library.register_fake("t2r_int4::int4_linear_rows")(_fake_rows)
    return True


def _fake(x: torch.Tensor, codes: torch.Tensor, steps: torch.Tensor, minimums: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], codes.shape[0])


def _fake_rows(
    x: torch.Tensor, codes: torch.Tensor, steps: torch.Tensor, minimums: torch.Tensor, dense: torch.Tensor, _: int
) -> torch.Tensor:
    return x.new_empty(x.shape[0], codes.shape[0])


def int4_matmul(x: torch.Tensor, weight: Int4Weight) -> torch.Tensor:
    """x [M, K] float, weight (N outputs, K inputs) -> [M, N] fp32 (see the module docstring)."""
    if x.shape[0] <= GEMV_ROWS and x.device.type == "cpu" and kernel_available():
        return torch.ops.t2r_int4.int4_matmul(x.float().contiguous(), *weight)
    # The same arithmetic as the kernel's (activations rounded per block), so that a prefill, a
    # decode step and a machine without the kernel compute one function.
    return int4_matmul_reference(x, weight, round_activations=True)
