"""How long a prefill may run between two decode steps (chunked prefill's budget), and its pacing.

A server prefills a long prompt between the decode steps of the rows already running (vLLM's
chunked prefill, with its token budget per step). Here a prompt goes in segments of
PREFILL_SEGMENT tokens (a scored prompt holds [segment, V] logits at most), and a segment's
forward pauses between two blocks (`T2RForCausalLM.forward_by_blocks`) whenever its piece of time
is spent: a running stream waits a block's time at most beyond the piece, not a whole segment's.
A segment's cost is mostly fixed (30 layers' thousands of small kernels: 16 tokens took 138 ms here,
64 took 196), so small segments would spend most of it on the fixed part; pausing by blocks keeps
the segments large and the pauses short.

The piece: about `share` of a decode step's time (a running average), for each prompt being
prefilled (so that a wave of prompts is not starved, which would shrink the running batch); with
no row decoding there is nobody to stall, and a piece is one whole segment. Before any step is
measured a piece is one block.
"""

from __future__ import annotations

import time
from collections.abc import Generator
from typing import Any

import torch

from t2r.modeling.model import T2RForCausalLM
from t2r.ops.state import ModelState

PREFILL_SEGMENT = 256  # a segment's tokens: a scored prompt (echo + logprobs) holds [256, V] logits at most
PREFILL_SHARE = 0.5  # a prefill's piece between two decode steps takes about half a step's time
SMOOTHING = 0.2  # weight of the newest measurement in the running average


class PrefillBudget:
    """A running average of a decode step's time, and the piece of time it allows a prefill."""

    def __init__(self, share: float = PREFILL_SHARE) -> None:
        if share <= 0:
            raise ValueError("a prefill budget needs a share > 0")
        self.share = share
        self.step_seconds: float | None = None

    def observe_step(self, seconds: float) -> None:
        """A decode step of the running rows took `seconds`."""
        old = self.step_seconds
        self.step_seconds = seconds if old is None else (1 - SMOOTHING) * old + SMOOTHING * seconds

    def seconds(self, decoding: bool) -> float | None:
        """The next piece's seconds for one prompt being prefilled while rows are decoding
        (`decoding`) or not (None: one whole segment). Before a step is measured: 0 (one block)."""
        if not decoding:
            return None
        return 0.0 if self.step_seconds is None else self.share * self.step_seconds


class Pace:
    """The piece of time a prefill is running in: `restart(seconds)` begins one."""

    def __init__(self, seconds: float | None) -> None:
        self.restart(seconds)

    def restart(self, seconds: float | None) -> None:
        self.seconds, self.started = seconds, time.perf_counter()

    def spent(self, segment_done: bool = False) -> bool:
        """Whether the piece is over: its seconds have passed, or, with no limit, a segment is done."""
        if self.seconds is None:
            return segment_done
        return time.perf_counter() - self.started >= self.seconds


def paced_forward(
    model: T2RForCausalLM, ids: torch.Tensor, state: ModelState | None, pace: Pace, progress: int, **forward: Any
) -> Generator[int, float | None, tuple[torch.Tensor, ModelState]]:
    """`model.forward(ids, state=state, **forward)` without gradients (a prefill) that yields
    `progress` between two blocks once `pace` is spent, and goes on with the piece of seconds sent
    back; returns forward's result. (Each block runs in its own no_grad: a `with` around a yield
    would leave the caller without gradients between two pieces.)"""
    blocks = model.forward_by_blocks(ids, state=state, **forward)
    while True:
        try:
            with torch.no_grad():
                next(blocks)
        except StopIteration as done:
            return done.value
        if pace.spent():
            pace.restart((yield progress))
