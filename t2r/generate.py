"""Recurrent decoding: prefill the prompt through the chunked form, then one token at a time
through the in-place step of `t2r.fast_decode`.

Memory is the model plus a state of fixed size: nothing grows with the number of tokens (except the
KV cache of layers kept as softmax attention, reported per token).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from t2r.fast_decode import FastState, fast_step
from t2r.model import T2RForCausalLM


@dataclass(frozen=True)
class Sampling:
    """greedy=True takes the argmax; otherwise sample with temperature and nucleus top_p."""

    greedy: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0


@dataclass
class GenerationResult:
    prompt_tokens: int
    new_tokens: list[int] = field(default_factory=list)
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    state_bytes: int = 0
    bytes_per_token: int = 0  # > 0 only with layers kept as softmax attention (their KV cache grows)


def _chooser(sampling: Sampling) -> Callable[[torch.Tensor], torch.Tensor]:
    """logits [B, V] -> next token ids [B]."""
    if sampling.greedy:
        return lambda logits: logits.argmax(-1)
    warpers = LogitsProcessorList()
    if sampling.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(sampling.temperature))
    if sampling.top_p < 1.0:
        warpers.append(TopPLogitsWarper(sampling.top_p))
    generator = torch.Generator().manual_seed(sampling.seed)

    def choose(logits: torch.Tensor) -> torch.Tensor:
        scores = warpers(None, logits.float())
        return torch.multinomial(scores.softmax(-1), 1, generator=generator)[:, 0]

    return choose


@torch.no_grad()
def generate(
    model: T2RForCausalLM,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    sampling: Sampling,
    on_token: Callable[[int], None] = lambda token: None,
    stop_ids: frozenset[int] = frozenset(),
) -> GenerationResult:
    """Decode up to `max_new_tokens` after prompt_ids [T] (batch 1), calling `on_token` for each.

    Stops early at a token in `stop_ids`; that token is neither kept nor passed to `on_token`.
    """
    choose = _chooser(sampling)
    result = GenerationResult(prompt_tokens=len(prompt_ids))
    start = time.perf_counter()
    logits, state = model(prompt_ids[None], form="chunked", logits_to_keep=1)
    logits = logits[:, -1]
    result.prefill_seconds = time.perf_counter() - start
    start = time.perf_counter()
    fast_state = FastState.from_model_state(state)  # decoded in place (tested equal to model.step)
    for index in range(max_new_tokens):
        token = choose(logits)
        if int(token) in stop_ids:
            break
        result.new_tokens.append(int(token))
        on_token(int(token))
        if index + 1 < max_new_tokens:
            logits = fast_step(model, token, fast_state)
    result.decode_seconds = time.perf_counter() - start
    final_state = fast_state.to_model_state()
    result.state_bytes = final_state.nbytes()
    result.bytes_per_token = final_state.bytes_per_token()
    return result
