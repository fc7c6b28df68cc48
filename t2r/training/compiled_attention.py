"""Whether a training run sends its chunked attention through torch.compile, and turning it on.

The chunked (hybrid) attention is dozens of small einsums and elementwise steps per layer; inductor
fuses the elementwise ones, forward and backward. Measured here (2 cores, SmolLM2-135M, the default
window-64 hybrid, 4 x 512 tokens): 30 layers' attention forward + backward 3.57 -> 2.62 s, compiled
once for all layers (~5 s at the first step; inductor's cache keeps it for later processes). The
same maths (tested against the eager op); rounding differs at the level of fp32 reduction order.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch.nn as nn

from t2r.modeling.attention import LinearAttention
from t2r.ops.toolchain import cpp_compiler_missing


def why_not_compiled(device_type: str, processes: int) -> str | None:
    """Why a run cannot compile here (None where it can): T2R_NO_COMPILE set, a launch of several
    processes (distributed runs stay eager), or a CPU run without a C++ compiler."""
    if os.environ.get("T2R_NO_COMPILE"):
        return "T2R_NO_COMPILE is set"
    if processes > 1:
        return "a run of several processes stays eager"
    if device_type == "cpu":
        return cpp_compiler_missing()
    return None


def compile_attention(student: nn.Module, wanted: bool, accelerator: Any) -> bool:
    """Mark every linear/hybrid layer of `student` to run its chunked form compiled, if `wanted` and
    the machine can (`accelerator`: the run's, for its device and processes); returns whether it did
    (where it could not, the main process logs why)."""
    if not wanted:
        return False
    reason = why_not_compiled(accelerator.device.type, accelerator.num_processes)
    if reason is not None:
        if accelerator.is_main_process:
            logging.getLogger("t2r").info("attention not compiled: %s (--no-compile silences this)", reason)
        return False
    for module in student.modules():
        if isinstance(module, LinearAttention):
            module.compiled = True
    return True
