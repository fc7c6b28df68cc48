"""Where t2r keeps what it makes once and reuses: `$T2R_CACHE_DIR`, else `$XDG_CACHE_HOME/t2r`, else
`~/.cache/t2r`. Each folder's contents are described by the module that writes them."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    if os.environ.get("T2R_CACHE_DIR"):
        return Path(os.environ["T2R_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "t2r"


def compiled_steps_folder() -> Path:
    """Where `--compile` keeps decode steps compiled ahead of time (t2r.modeling.step_artifacts)."""
    return cache_root() / "compiled-steps"


def decode_weights_folder() -> Path:
    """Where generate and serve keep models made ready for decoding (t2r.modeling.decode_weights)."""
    return cache_root() / "decode-weights"
