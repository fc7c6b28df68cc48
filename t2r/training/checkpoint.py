"""Training checkpoints: atomic, complete or absent, the last K kept.

A checkpoint is a folder `checkpoint-{step:07d}` holding
    trainable.safetensors   every parameter that trains (feature maps, LoRA adapters, or all)
    optimizer.pt            optimizer state (tensors and numbers only: loaded with weights_only)
    trainer.json            step, stage, scheduler state, the losses so far, RNG states
    COMPLETE                written last; a folder without it is ignored (a half-written save)
It is written under a hidden name and renamed into place, so a crash mid-save leaves nothing that
`latest_checkpoint` would pick.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torch.nn as nn

from t2r.errors import T2RError

MARKER = "COMPLETE"
PREFIX = "checkpoint-"


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train, by name (shared tensors once)."""
    return {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state().tolist(), "python": repr(random.getstate())}


def restore_rng(state: dict[str, Any]) -> None:
    import ast

    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    random.setstate(ast.literal_eval(state["python"]))


def save_checkpoint(
    folder: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, trainer: dict[str, Any], keep: int
) -> Path:
    """Write checkpoint `step` under `folder` atomically and delete all but the newest `keep`."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{PREFIX}{step:07d}"
    partial = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=folder))
    try:
        safetensors.torch.save_file(trainable_state(model), str(partial / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), partial / "optimizer.pt")
        (partial / "trainer.json").write_text(json.dumps({**trainer, "step": step, "rng": rng_state()}))
        (partial / MARKER).write_text("")
        for path in partial.iterdir():  # data on disk before the rename makes it visible
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    for old in complete_checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first; half-written ones (no marker) are skipped."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.name.startswith(PREFIX) and (p / MARKER).is_file()]
    return sorted(found, key=lambda p: int(p.name.removeprefix(PREFIX)))


def latest_checkpoint(folder: Path) -> Path | None:
    found = complete_checkpoints(folder)
    return found[-1] if found else None


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Restore trainable parameters (and optimizer, RNG); returns the trainer state."""
    try:
        tensors = safetensors.torch.load_file(str(path / "trainable.safetensors"))
        trainer = json.loads((path / "trainer.json").read_text())
        optimizer_state = torch.load(path / "optimizer.pt", weights_only=True) if optimizer else None
    except Exception as error:
        raise T2RError(f"{path}: unreadable checkpoint ({type(error).__name__}: {error})") from None
    parameters = dict(model.named_parameters())
    missing = [name for name, p in parameters.items() if p.requires_grad and name not in tensors]
    unknown = [name for name in tensors if name not in parameters]
    if missing or unknown:
        raise T2RError(f"{path}: does not match this run (missing {missing[:2]}, unknown {unknown[:2]})")
    with torch.no_grad():
        for name, tensor in tensors.items():
            parameters[name].copy_(tensor)
    if optimizer is not None:
        optimizer.load_state_dict(optimizer_state)
    restore_rng(trainer["rng"])
    return trainer
