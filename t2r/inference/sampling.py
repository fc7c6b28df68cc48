"""How the next token is chosen from logits: argmax, or a draw after transformers' temperature and
top-p warpers, from a seeded generator."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)


@dataclass(frozen=True)
class Sampling:
    """greedy=True takes the argmax; otherwise sample with temperature and nucleus top_p."""

    greedy: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0


# Below this temperature a draw is the argmax: a logit gap of 1e-3 already becomes 100 nats, and far
# below it logits / temperature overflow fp32 (a temperature of 1e-222 made inf, then NaN).
MIN_TEMPERATURE = 1e-5


def chooser(sampling: Sampling) -> Callable[[torch.Tensor], torch.Tensor]:
    """logits [B, V] -> next token ids [B]."""
    if sampling.greedy or sampling.temperature < MIN_TEMPERATURE:
        return lambda logits: logits.argmax(-1)
    warpers = LogitsProcessorList()
    if sampling.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(sampling.temperature))
    if sampling.top_p < 1.0:
        warpers.append(TopPLogitsWarper(sampling.top_p))
    generator = torch.Generator().manual_seed(sampling.seed)

    def choose(logits: torch.Tensor) -> torch.Tensor:
        scores = warpers(None, logits.float())
        # drawn on the CPU, where the seeded generator lives, whatever the model's device
        drawn = torch.multinomial(scores.softmax(-1).cpu(), 1, generator=generator)[:, 0]
        return drawn.to(logits.device)

    return choose
