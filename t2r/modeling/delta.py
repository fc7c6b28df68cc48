"""A trained converted model as a small difference from its untrained conversion.

Training changes little of a teacher: the feature maps and window shares (new, small) and, through
LoRA merged on save, each adapted projection by a matrix of rank r. So a trained model is stored as
`make_delta(untrained, trained)`: every tensor that training left alone is dropped, a 2-D tensor
whose change has rank <= r is kept as two factors (U·S [out, r] and V [r, in], found by an SVD in
float64), anything else whole. `apply_delta(convert(teacher, config), delta)` gives the trained
model back: exactly for the whole tensors, within a float32 rounding for the factored ones
(`reconstruction_error` measures it).
"""

from __future__ import annotations

import torch
import torch.nn as nn

LEFT, RIGHT = ".delta_left", ".delta_right"


def low_rank(base: torch.Tensor, tuned: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(U·S [m, r], V [r, n]) such that base + U·S·V rounds to `tuned` within a few float32 steps,
    or None when the change has a higher rank."""
    u, s, vh = torch.linalg.svd(tuned.double() - base.double(), full_matrices=False)
    left, right = (u[:, :rank] * s[:rank]).float(), vh[:rank].float()
    rebuilt = (base.double() + left.double() @ right.double()).to(tuned.dtype)
    tolerance = 4 * torch.finfo(tuned.dtype).eps * tuned.abs().max().item()
    return (left, right) if (rebuilt - tuned).abs().max().item() <= tolerance else None


def make_delta(untrained: dict[str, torch.Tensor], trained: dict[str, torch.Tensor], rank: int = 8) -> dict:
    """The tensors of `trained` that differ from `untrained` (same keys), factored where low-rank."""
    if set(untrained) != set(trained):
        raise ValueError(f"the two models differ in their tensors: {sorted(set(untrained) ^ set(trained))[:5]}")
    delta: dict[str, torch.Tensor] = {}
    for name, tuned in trained.items():
        base = untrained[name]
        if torch.equal(base, tuned):
            continue
        factored = tuned.ndim == 2 and min(tuned.shape) > rank and tuned.is_floating_point()
        factors = low_rank(base, tuned, rank) if factored else None
        if factors is None:
            delta[name] = tuned.clone()
        else:
            delta[name + LEFT], delta[name + RIGHT] = factors
    return delta


def apply_delta(model: nn.Module, delta: dict[str, torch.Tensor]) -> None:
    """Add `delta` to `model` (its untrained conversion) in place; every name must be the model's."""
    tensors = model.state_dict(keep_vars=True)
    for name, value in delta.items():
        if name.endswith(RIGHT):
            continue
        if name.endswith(LEFT):
            target_name = name.removesuffix(LEFT)
            left, right = value, delta[target_name + RIGHT]
            target = tensors.get(target_name)
            if target is None or target.shape != (left.shape[0], right.shape[1]):
                raise ValueError(f"the delta's {target_name} does not fit this model")
            with torch.no_grad():
                target.copy_((target.double() + left.double() @ right.double()).to(target.dtype))
            continue
        target = tensors.get(name)
        if target is None or target.shape != value.shape:
            raise ValueError(f"the delta's {name} does not fit this model")
        with torch.no_grad():
            target.copy_(value)


def reconstruction_error(model: nn.Module, trained: dict[str, torch.Tensor]) -> float:
    """The largest absolute difference between `model`'s tensors and `trained`'s."""
    state = model.state_dict()
    return max((state[name].double() - value.double()).abs().max().item() for name, value in trained.items())
