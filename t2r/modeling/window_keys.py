"""The keys the linear part needs, recovered from the window instead of stored twice.

A hybrid layer's key feature map sees a key *before* rotary positions (position-free features, the
default) while the softmax part needs it *after* them. The window used to keep both copies, a third
of its bytes. Rotation is invertible, so the state now keeps only the rotated keys: when a key
leaves the window for the linear state, its pre-rotary form is the rotated key turned back by the
same angles (`inverse_rotary`), exact to fp32 rounding. Its angles come from its position, which
the state implies: positions count real tokens, so a window slot's token sits at
`seen - (valid window slots from it to the newest)` (`window_positions`). With rotary features the
linear part sees the rotated keys themselves and nothing is turned.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from t2r.modeling.adapters.base import Adapter


def inverse_rotary(rotary: Any) -> Any:
    """Rotary data (cos, sin) -> the data of the inverse turn, for `Adapter.apply_rotary`.

    RoPE turns each pair of dimensions by [[c, -s], [s, c]]; its inverse is [[c, s], [-s, c]] / (c^2
    + s^2) (the norm is 1 unless a scaling such as YaRN's multiplies cos and sin): the same function
    with (c / n, -s / n). A dict (one entry per layer type, Gemma 3) is inverted entry by entry.
    """
    if rotary is None:
        return None
    if isinstance(rotary, dict):
        return {kind: inverse_rotary(value) for kind, value in rotary.items()}
    cos, sin = rotary
    norm = cos * cos + sin * sin
    return cos / norm, -sin / norm


def window_positions(seen: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """seen [B] (real tokens so far), valid [B, W] (time order, oldest first) -> [B, W] long: the
    position of each valid slot's token (an invalid slot's is meaningless, clamped at 0).

    A pad takes no position and every slot after a valid one that is not a pad is a later real
    token, so the valid slots from a slot to the newest are the real tokens from it on."""
    from_here_on = valid.long().flip(1).cumsum(1).flip(1)
    return (seen[:, None] - from_here_on).clamp_min(0)


@dataclass(frozen=True)
class WindowKeys:
    """What turns a layer's window keys back before positions: built once per forward.

    seen [B]: real tokens before this forward (the state's); `rotary_at(positions)` gives the
    model's rotary data at positions [B, S].
    """

    adapter: Adapter
    base: nn.Module
    seen: torch.Tensor
    _oldest_turns: dict[int, Any] = field(default_factory=dict)  # window size -> inverse turn (`oldest`)
    _window_turns: dict[int, tuple[torch.Tensor, Any]] = field(default_factory=dict)  # (`window`)

    def rotary_at(self, positions: torch.Tensor) -> Any:
        # The rotary module reads only the dtype and device of its first argument: fp32, so that
        # the angles, and the keys turned by them, are not rounded to a bf16 model's precision.
        probe = torch.empty(0, dtype=torch.float32, device=positions.device)
        return self.adapter.rotary(self.base, probe, positions)

    def turned(self, keys: torch.Tensor, rotary: Any, attention: nn.Module) -> torch.Tensor:
        """keys [B, G, S, D] turned by `rotary` (the layer's rule: type, partial rotary, none), fp32."""
        keys = keys.float()
        return self.adapter.apply_rotary(keys, keys, rotary, attention)[1]

    def window(self, keys: torch.Tensor, valid: torch.Tensor, attention: nn.Module) -> torch.Tensor:
        """A state's window keys [B, G, W, D] (time order) with valid [B, W] -> before positions.

        Layers with the same window hold the same slots (the same tokens, pads and sinks), so the
        inverse turn of their positions is made once per forward and reused while the valid slots
        are the same (a prefill segment turned the rotary data 30 times, ~8% of its time)."""
        window = valid.shape[1]
        made = self._window_turns.get(window)
        if made is None or not torch.equal(made[0], valid):
            made = (valid, inverse_rotary(self.rotary_at(window_positions(self.seen, valid))))
            self._window_turns[window] = made
        return self.turned(keys, made[1], attention)

    def oldest(self, key: torch.Tensor, valid: torch.Tensor, attention: nn.Module) -> torch.Tensor:
        """The oldest slot's key [B, G, 1, D] of a ring whose window slots (any order) have valid
        [B, W] -> before positions, fp32. Every valid slot is newer than the oldest, so the oldest
        (when valid) sits at `seen - valid slots`.

        The rings of layers with the same window fill and empty alike (the same tokens, the same
        pads), so their oldest slots share a position: its inverse turn is made once per window
        size and step (`_oldest_turns`), not once per layer."""
        window = valid.shape[1]
        if window not in self._oldest_turns:
            positions = (self.seen - valid.sum(1)).clamp_min(0)[:, None]
            self._oldest_turns[window] = inverse_rotary(self.rotary_at(positions))
        return self.turned(key, self._oldest_turns[window], attention)
