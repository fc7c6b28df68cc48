"""Recurrent decoding: prefill the prompt through the chunked form, then one token at a time
through the in-place step of `t2r.modeling.fast_decode`.

Memory is the model plus a state of fixed size: nothing grows with the number of tokens (except the
KV cache of layers kept as softmax attention, reported per token).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from t2r.inference.sampling import Sampling, chooser
from t2r.modeling.fast_decode import FastState, fast_step
from t2r.modeling.model import T2RForCausalLM


@dataclass
class GenerationResult:
    prompt_tokens: int
    new_tokens: list[int] = field(default_factory=list)
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    # The first decode step on its own (a compiled step compiles there) and the rows decoded by
    # every later step: the steady speed is later_step_rows / (decode_seconds - first_step_seconds).
    first_step_seconds: float = 0.0
    later_step_rows: int = 0
    state_bytes: int = 0
    bytes_per_token: int = 0  # > 0 only with layers kept as softmax attention (their KV cache grows)


Step = Callable[[T2RForCausalLM, torch.Tensor, FastState], torch.Tensor]


def left_padded(prompts: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts [T_i] -> ids [B, T] and mask [B, T], padded on the left (every row ends at T - 1)."""
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, length - len(prompt) :] = prompt
        mask[row, length - len(prompt) :] = 1
    return ids, mask


@torch.no_grad()
def generate_batch(
    model: T2RForCausalLM,
    prompts: list[torch.Tensor],
    max_new_tokens: int,
    sampling: Sampling,
    on_token: Callable[[int, int], None] = lambda row, token: None,
    stop_ids: frozenset[int] = frozenset(),
    step: Step = fast_step,
) -> list[GenerationResult]:
    """Decode up to `max_new_tokens` after each prompt [T_i], all rows in one batch.

    The prompts are prefilled together (left padding, chunked form); then each step decodes every
    row still running. A row that emits a token of `stop_ids` (not kept) or reaches its budget
    leaves the batch (`FastState.select`), so later steps cost only the rows left. `on_token(row,
    token)` is called for every kept token; `step` is `fast_step` or a compiled `Decoder`.
    Timings are the batch's (shared by every result); state_bytes is per sequence.
    """
    choose = chooser(sampling)
    results = [GenerationResult(prompt_tokens=len(p)) for p in prompts]
    if max_new_tokens < 1:
        return results
    start = time.perf_counter()
    ids, mask = left_padded(prompts)
    logits, state = model(ids.to(model.device), mask.to(model.device), form="chunked", logits_to_keep=1)
    logits = logits[:, -1]
    prefill_seconds = time.perf_counter() - start
    start = time.perf_counter()
    fast_state = FastState.from_model_state(state)  # decoded in place (tested equal to model.step)
    running = list(range(len(prompts)))  # the prompt index of each batch row
    first_step_seconds, later_step_rows = 0.0, 0
    while True:
        tokens = choose(logits)
        keep = []
        for row, token in enumerate(tokens.tolist()):
            result = results[running[row]]
            if token in stop_ids:
                continue
            result.new_tokens.append(token)
            on_token(running[row], token)
            if len(result.new_tokens) < max_new_tokens:
                keep.append(row)
        if not keep:
            break
        if len(keep) < len(running):
            index = torch.tensor(keep, device=tokens.device)
            fast_state, tokens = fast_state.select(index), tokens[index]
            running = [running[row] for row in keep]
        logits = step(model, tokens, fast_state)
        if not first_step_seconds:
            first_step_seconds = time.perf_counter() - start
        else:
            later_step_rows += len(running)
    decode_seconds = time.perf_counter() - start
    final = fast_state.to_model_state()  # the rows still in the batch at the end
    state_bytes, bytes_per_token = final.nbytes() // len(running), final.bytes_per_token()
    for result in results:
        result.prefill_seconds, result.decode_seconds = prefill_seconds, decode_seconds
        result.first_step_seconds, result.later_step_rows = first_step_seconds, later_step_rows
        result.state_bytes, result.bytes_per_token = state_bytes, bytes_per_token
    return results


def generate(
    model: T2RForCausalLM,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    sampling: Sampling,
    on_token: Callable[[int], None] = lambda token: None,
    stop_ids: frozenset[int] = frozenset(),
    step: Step = fast_step,
) -> GenerationResult:
    """Batch 1: decode up to `max_new_tokens` after prompt_ids [T], calling `on_token` for each.

    Stops early at a token in `stop_ids`; that token is neither kept nor passed to `on_token`.
    """
    return generate_batch(
        model, [prompt_ids], max_new_tokens, sampling, lambda row, token: on_token(token), stop_ids, step
    )[0]
