"""Perplexity and fidelity to the teacher, for converted models and unconverted ones alike.

The text is tokenised, cut to its first `max_tokens` tokens, and scored in windows of `seq_len`
tokens moved by `stride` (the Hugging Face perplexity recipe): each token is scored once, by the
window that sees the most context for it; the first token of the text is never scored.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from t2r.modeling.model import T2RForCausalLM


@dataclass(frozen=True)
class Window:
    """Tokens [begin, end) of the text; targets at local positions >= first_target are scored."""

    begin: int
    end: int
    first_target: int


@dataclass
class Totals:
    nll: float = 0.0
    kl: float = 0.0
    agree: int = 0
    tokens: int = 0

    def add(self, other: Totals) -> None:
        self.nll += other.nll
        self.kl += other.kl
        self.agree += other.agree
        self.tokens += other.tokens


@dataclass(frozen=True)
class EvalResult:
    perplexity: float
    nll: float
    tokens: int
    windows: int
    seq_len: int
    stride: int
    mode: str
    seconds: float
    kl: float | None = None
    top1_agreement: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {key: value for key, value in asdict(self).items() if value is not None}


def make_windows(length: int, seq_len: int, stride: int) -> list[Window]:
    """Windows over `length` tokens; every token but the first is a target exactly once."""
    windows, scored_until = [], 1
    for begin in range(0, length, stride):
        end = min(begin + seq_len, length)
        if end - begin >= 2 and end > scored_until:
            windows.append(Window(begin, end, max(scored_until, begin + 1) - begin))
            scored_until = end
        if end == length:
            break
    return windows


def batches(ids: torch.Tensor, windows: list[Window], batch_size: int) -> Iterator[tuple[torch.Tensor, ...]]:
    """Right-padded batches: input_ids, attention_mask, targets, target_mask, all [B, T]."""
    for start in range(0, len(windows), batch_size):
        group = windows[start : start + batch_size]
        width = max(w.end - w.begin for w in group)
        input_ids = torch.zeros(len(group), width, dtype=torch.long)
        mask = torch.zeros(len(group), width, dtype=torch.long)
        targets = torch.zeros(len(group), width, dtype=torch.long)
        target_mask = torch.zeros(len(group), width, dtype=torch.bool)
        for row, w in enumerate(group):
            n = w.end - w.begin
            input_ids[row, :n] = ids[w.begin : w.end]
            mask[row, :n] = 1
            # logits at local position i predict token i + 1
            targets[row, : n - 1] = ids[w.begin + 1 : w.end]
            target_mask[row, w.first_target - 1 : n - 1] = True
        yield input_ids, mask, targets, target_mask


def score(
    logits: torch.Tensor, targets: torch.Tensor, target_mask: torch.Tensor, teacher_logits: torch.Tensor | None
) -> Totals:
    """Sums over the scored positions. logits, teacher_logits [B, T, V]; targets, target_mask [B, T]."""
    logits, targets = logits[target_mask].float(), targets[target_mask]
    log_probs = logits.log_softmax(-1)
    totals = Totals(nll=-log_probs.gather(-1, targets[:, None]).sum().item(), tokens=int(targets.numel()))
    if teacher_logits is not None:
        teacher_log_probs = teacher_logits[target_mask].float().log_softmax(-1)
        kl = (teacher_log_probs.exp() * (teacher_log_probs - log_probs)).sum()
        totals.kl = kl.item()
        totals.agree = int((teacher_log_probs.argmax(-1) == log_probs.argmax(-1)).sum())
    return totals


def logits_of(model: nn.Module, input_ids: torch.Tensor, mask: torch.Tensor, form: str) -> torch.Tensor:
    if isinstance(model, T2RForCausalLM):
        return model(input_ids, mask, form=form)[0]
    return model(input_ids=input_ids, attention_mask=mask).logits


@torch.no_grad()
def evaluate(
    model: nn.Module,
    ids: torch.Tensor,
    seq_len: int,
    stride: int,
    mode: str = "chunked",
    teacher: nn.Module | None = None,
    batch_size: int = 4,
    progress: bool = True,
) -> EvalResult:
    """Score token ids [N] with `model`; with `teacher`, also KL(teacher || model) and top-1 agreement.

    mode: 'parallel' | 'chunked' | 'recurrent' for a converted model (recurrent decodes token by
    token, all windows of a batch at once); an unconverted model always runs its own attention.
    """
    return evaluate_many([model], ids, seq_len, stride, mode, teacher, batch_size, progress)[0]


@torch.no_grad()
def evaluate_many(
    models: list[nn.Module],
    ids: torch.Tensor,
    seq_len: int,
    stride: int,
    mode: str = "chunked",
    teacher: nn.Module | None = None,
    batch_size: int = 4,
    progress: bool = True,
) -> list[EvalResult]:
    """`evaluate` for several models on the same windows: the teacher's logits of a batch are
    computed once and compared with every model's (a model and its baseline cost one teacher pass)."""
    windows = make_windows(len(ids), seq_len, stride)
    totals = [Totals() for _ in models]
    seconds = [0.0 for _ in models]
    converted = [isinstance(model, T2RForCausalLM) for model in models]
    teacher_seconds = 0.0
    description = mode if any(converted) else "softmax"
    bar = tqdm(
        total=len(models) * sum(w.end - w.begin for w in windows),
        desc=f"eval ({description})",
        unit="tok",
        unit_scale=True,
        disable=not progress,
    )
    for input_ids, mask, targets, target_mask in batches(ids, windows, batch_size):
        start = time.perf_counter()
        teacher_logits = logits_of(teacher, input_ids, mask, mode) if teacher is not None else None
        teacher_seconds += time.perf_counter() - start
        for index, model in enumerate(models):
            start = time.perf_counter()
            if converted[index] and mode == "recurrent":
                totals[index].add(_score_recurrent(model, input_ids, mask, targets, target_mask, teacher_logits, bar))
            else:
                logits = logits_of(model, input_ids, mask, mode)
                totals[index].add(score(logits, targets, target_mask, teacher_logits))
                bar.update(int(mask.sum()))
            seconds[index] += time.perf_counter() - start
    bar.close()
    results = []
    for index, total in enumerate(totals):
        nll = total.nll / total.tokens
        results.append(
            EvalResult(
                perplexity=math.exp(nll),
                nll=nll,
                tokens=total.tokens,
                windows=len(windows),
                seq_len=seq_len,
                stride=stride,
                mode=mode if converted[index] else "softmax",
                # the teacher's forward passes counted once, in each model's time
                seconds=seconds[index] + teacher_seconds,
                kl=total.kl / total.tokens if teacher is not None else None,
                top1_agreement=total.agree / total.tokens if teacher is not None else None,
            )
        )
    return results


def _score_recurrent(
    model: T2RForCausalLM,
    input_ids: torch.Tensor,
    mask: torch.Tensor,
    targets: torch.Tensor,
    target_mask: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    bar: tqdm,
) -> Totals:
    """Decode the batch one token at a time from an empty state, scoring each step as it comes."""
    totals, state = Totals(), model.init_state(len(input_ids))
    for t in range(input_ids.shape[1]):
        logits, state = model.step(input_ids[:, t], state, mask[:, t])
        column = slice(t, t + 1)
        teacher_column = None if teacher_logits is None else teacher_logits[:, column]
        totals.add(score(logits[:, None], targets[:, column], target_mask[:, column], teacher_column))
        bar.update(int(mask[:, t].sum()))
    return totals


def evaluate_blocks(
    model: nn.Module, blocks: torch.Tensor, teacher: nn.Module | None, batch_size: int = 4, form: str = "chunked"
) -> EvalResult:
    """Score packed blocks [N, T] (e.g. a held-out split): each block is one window, every token but
    its first scored."""
    length = blocks.shape[1]
    return evaluate(model, blocks.flatten(), length, length, form, teacher, batch_size, progress=False)
