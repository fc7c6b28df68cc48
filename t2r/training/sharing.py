"""One copy of the weights a run never trains: the student's embeddings, MLPs, norms and head are
the teacher's own tensors (the student was converted from the same weights), not a second copy."""

from __future__ import annotations

import torch
import torch.nn as nn

# Student parameter names of what conversion adds or a run may train (attention projections train
# in the transfer stage of maps without parameters, and carry LoRA later).
_OWN = (".projections.", "feature_map", "window_logit", "lora_")


def share_frozen_weights(student: nn.Module, teacher: nn.Module) -> int:
    """Point every student parameter outside attention at the teacher's tensor of the same name
    and value; returns the bytes no longer held twice. The student's `base.` prefix is dropped
    to find the teacher's name; ties within the teacher (tied embeddings) are kept."""
    theirs = dict(teacher.named_parameters(remove_duplicate=False))
    saved, counted = 0, set()
    for name, mine in list(student.named_parameters(remove_duplicate=False)):
        if not name.startswith("base.") or any(part in name for part in _OWN):
            continue
        other = theirs.get(name.removeprefix("base."))
        if other is None or other is mine or other.shape != mine.shape or other.device != mine.device:
            continue
        if not torch.equal(other, mine):
            continue  # a student that was trained or loaded apart: keep its own
        owner_name, _, attribute = name.rpartition(".")
        owner = student.get_submodule(owner_name)
        if owner._parameters.get(attribute) is mine:
            if id(mine) not in counted:  # a tied tensor is one copy
                counted.add(id(mine))
                saved += mine.numel() * mine.element_size()
            owner._parameters[attribute] = other
    return saved
