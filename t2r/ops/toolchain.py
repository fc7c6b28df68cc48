"""What the machine needs to build native code at run time (the int4 kernel, torch.compile on CPU)."""

from __future__ import annotations

import os
import shutil


def cpp_compiler_missing() -> str | None:
    """Why no C++ compiler can be run (the one $CXX names, else `c++`), or None where one is on PATH."""
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler!r} is not on PATH)"
    return None
