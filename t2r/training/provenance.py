"""Where a run came from, for its manifest: the git commit of the code and the library versions."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch


def git_commit() -> str | None:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() or None


def versions() -> dict[str, str]:
    import accelerate
    import peft
    import safetensors
    import transformers

    import t2r

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "peft": peft.__version__,
        "safetensors": safetensors.__version__,
        "t2r": t2r.__version__,
    }
