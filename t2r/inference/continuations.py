"""Greedy continuations and continuation log-likelihoods, the same call for every kind of model.

The evals that compare a converted model with its teacher and with the sliding-window baseline
(pass-key retrieval, chat fidelity) ask two things of a model: its greedy continuation of a prompt,
and the log-likelihood of given continuations after one prompt. A converted model
(`T2RForCausalLM`) answers through its state: the prompt is prefilled once (chunked form) and every
candidate continues from that one state. A teacher (any transformers causal LM) answers through
its KV cache, cropped back to the prompt after each candidate, so that memory stays one cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from t2r.modeling.fast_decode import FastState, fast_step
from t2r.modeling.model import T2RForCausalLM
from t2r.ops.state import ModelState


@dataclass(frozen=True)
class Prefilled:
    """A converted model's prompt prefilled once (chunked form), for both questions of an eval:
    prompt_ids [T], the last logits [V] and the state after the prompt (one row)."""

    prompt_ids: torch.Tensor
    logits: torch.Tensor
    state: ModelState


@torch.no_grad()
def prefill(model: nn.Module, prompt_ids: torch.Tensor) -> Prefilled | None:
    """A converted model's prefilled prompt (None for a teacher, whose KV cache is made per call):
    a prompt long enough that its prefill is the cost (a state with a global cache goes token by
    token) is then prefilled once for `greedy_tokens` and `continuation_logprobs` together."""
    if not isinstance(model, T2RForCausalLM):
        return None
    prompt_ids = prompt_ids.to(model.device)
    logits, state = model(prompt_ids[None], form="chunked", logits_to_keep=1)
    return Prefilled(prompt_ids, logits[0, -1], state)


@torch.no_grad()
def greedy_tokens(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    stop_ids: frozenset[int] = frozenset(),
    prefilled: Prefilled | None = None,
) -> list[int]:
    """prompt_ids [T] -> up to `max_new_tokens` greedy tokens; stops before a token of `stop_ids`.
    A converted model decodes from `prefilled` (`prefill(model, prompt_ids)`, made here if None)
    with the in-place step, as `t2r generate` does."""
    if isinstance(model, T2RForCausalLM):
        prefilled = prefilled or prefill(model, prompt_ids)
        state, logits, tokens = FastState.from_model_state(prefilled.state), prefilled.logits, []
        while len(tokens) < max_new_tokens:
            token = int(logits.float().argmax(-1))
            if token in stop_ids:
                break
            tokens.append(token)
            if len(tokens) < max_new_tokens:
                logits = fast_step(model, torch.tensor([token], device=model.device), state)[0]
        return tokens
    device = next(model.parameters()).device
    logits, past = _teacher_prefill(model, prompt_ids.to(device))
    tokens: list[int] = []
    while len(tokens) < max_new_tokens:
        token = int(logits.argmax(-1))
        if token in stop_ids:
            break
        tokens.append(token)
        out = model(input_ids=torch.tensor([[token]], device=device), cache=past, use_cache=True)
        logits, past = out.logits[0, -1], out.cache
    return tokens


@torch.no_grad()
def continuation_logprobs(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    candidates: Sequence[Sequence[int]],
    batch_size: int = 25,
    prefilled: Prefilled | None = None,
) -> torch.Tensor:
    """log p(candidate | prompt) summed over each candidate's tokens: prompt_ids [T] -> [N] fp32.

    Every candidate must have at least one token. A converted model scores `batch_size` candidates
    per forward pass from copies of the prompt's state (right-padded; padding never affects an
    earlier token); a teacher scores them one at a time on its cropped cache.
    """
    if any(len(candidate) == 0 for candidate in candidates):
        raise ValueError("every candidate needs at least one token")
    device = next(model.parameters()).device
    prompt_ids = prompt_ids.to(device)
    if isinstance(model, T2RForCausalLM):
        return _converted_logprobs(model, prefilled or prefill(model, prompt_ids), candidates, batch_size)
    last_logits, past = _teacher_prefill(model, prompt_ids)
    prompt_length = prompt_ids.shape[0]
    scores = []
    for candidate in candidates:
        ids = torch.tensor([list(candidate)], device=device)
        logits = last_logits[None]
        if len(candidate) > 1:
            out = model(input_ids=ids[:, :-1], cache=past, use_cache=True)
            logits = torch.cat([logits, out.logits[0]], dim=0)
            past = out.cache
            past.crop(prompt_length - past.get_seq_length())  # back to the prompt's cache
        scores.append(logits.float().log_softmax(-1).gather(-1, ids[0, :, None]).sum())
    return torch.stack(scores).cpu()


def _teacher_prefill(model: nn.Module, prompt_ids: torch.Tensor) -> tuple[torch.Tensor, object]:
    """The teacher's logits [V] after the prompt and its KV cache."""
    out = model(input_ids=prompt_ids[None], use_cache=True, logits_to_keep=1)
    return out.logits[0, -1], out.cache


def _converted_logprobs(
    model: T2RForCausalLM, prefilled: Prefilled, candidates: Sequence[Sequence[int]], batch_size: int
) -> torch.Tensor:
    prompt_ids, state = prefilled.prompt_ids, prefilled.state
    first = prefilled.logits.float().log_softmax(-1)
    scores = []
    for start in range(0, len(candidates), batch_size):
        group = candidates[start : start + batch_size]
        length = max(len(candidate) for candidate in group)
        ids = torch.zeros(len(group), length, dtype=torch.long, device=prompt_ids.device)
        mask = torch.zeros_like(ids)
        for row, candidate in enumerate(group):
            ids[row, : len(candidate)] = torch.tensor(list(candidate))
            mask[row, : len(candidate)] = 1
        rows = state.select(torch.zeros(len(group), dtype=torch.long, device=prompt_ids.device))
        # Only the candidates' first length - 1 tokens are inputs; position 0 is scored by `first`.
        later, _ = model(ids[:, :-1], mask[:, :-1], rows, form="chunked") if length > 1 else (None, None)
        for row, candidate in enumerate(group):
            total = first[candidate[0]]
            if len(candidate) > 1:
                steps = later[row, : len(candidate) - 1].float().log_softmax(-1)
                total = total + steps.gather(-1, ids[row, 1 : len(candidate), None]).sum()
            scores.append(total)
    return torch.stack(scores).cpu()
