"""Long-context scoring: one document read as one stream, perplexity per position bucket.

A converted model reads the stream in segments of `segment` tokens through the chunked form, each
segment starting from the state the previous one returned: the same maths as decoding the whole
stream token by token, in constant memory. Every token after the first is scored with everything
before it as context, and its loss is filed under the bucket of its position (0-2k, 2k-8k, ...).

The teacher runs one forward pass over as much of the stream as its context allows (its
`max_position_embeddings`); buckets beyond that are reported as not run. Where it runs, the
converted model is also compared to it (KL and top-1 agreement per bucket).
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from t2r.evaluation.perplexity import Totals, score
from t2r.modeling.adapters import adapter_for
from t2r.modeling.model import T2RForCausalLM

DEFAULT_EDGES = (0, 2048, 8192, 16384, 32768)


@dataclass
class Bucket:
    """Targets at positions [begin, end) of the stream (a target at position p is predicted from 0..p-1)."""

    begin: int
    end: int
    model: Totals = field(default_factory=Totals)
    compared: Totals = field(default_factory=Totals)  # the model's scores where the teacher's logits exist
    teacher: Totals | None = None  # the teacher's own loss, where it ran over the whole bucket

    def to_dict(self) -> dict[str, Any]:
        record: dict[str, Any] = {"begin": self.begin, "end": self.end, "tokens": self.model.tokens}
        if self.model.tokens:
            record["perplexity"] = math.exp(self.model.nll / self.model.tokens)
        if self.teacher is not None and self.teacher.tokens:
            record["teacher_perplexity"] = math.exp(self.teacher.nll / self.teacher.tokens)
        if self.compared.tokens:
            record["kl"] = self.compared.kl / self.compared.tokens
            record["top1_agreement"] = self.compared.agree / self.compared.tokens
        return record


@dataclass(frozen=True)
class LongResult:
    buckets: list[Bucket]
    tokens: int
    segment: int
    teacher_context: int | None
    state_bytes: list[int]  # the model's state size after each segment (constant for a linear/hybrid model)
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "segment": self.segment,
            "teacher_context": self.teacher_context,
            "state_bytes_first": self.state_bytes[0],
            "state_bytes_last": self.state_bytes[-1],
            "seconds": self.seconds,
            "buckets": [bucket.to_dict() for bucket in self.buckets],
        }


def make_buckets(length: int, edges: tuple[int, ...] = DEFAULT_EDGES) -> list[Bucket]:
    """Buckets of target positions 1..length-1 cut at `edges` (the last one runs to the end)."""
    cuts = sorted({edge for edge in edges if 0 < edge < length})
    bounds = [0, *cuts, length]
    return [Bucket(max(begin, 1), end) for begin, end in itertools.pairwise(bounds) if end > max(begin, 1)]


def teacher_context(teacher: nn.Module) -> int | None:
    """The longest sequence the teacher takes, as its architecture's adapter reads its config."""
    return adapter_for(teacher.config.model_type).context_length(teacher.config)


@dataclass(frozen=True)
class TeacherStream:
    """The teacher's one pass over a stream, kept to score several models against it.

    hidden [covered - 1, E]: final hidden states predicting the targets at positions 1 .. covered - 1
    (logits come per piece through `head`); context: the teacher's context length, or None.
    """

    hidden: torch.Tensor
    head: nn.Module
    context: int | None


@torch.no_grad()
def read_teacher(teacher: nn.Module, ids: torch.Tensor) -> TeacherStream:
    """The teacher over as much of ids [N] as its context allows, in one pass."""
    context = teacher_context(teacher)
    covered = len(ids) if context is None else min(len(ids), context)
    hidden = teacher.base_model(input_ids=ids[None, :covered]).last_hidden_state[0, : covered - 1]
    return TeacherStream(hidden, teacher.get_output_embeddings(), context)


def file_scores(
    buckets: list[Bucket],
    start: int,
    logits: torch.Tensor,
    targets: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    teacher_side: bool = False,
) -> None:
    """Add the scores of targets at stream positions start+1 .. start+n to their buckets.

    logits [n, V] predict targets [n]; with teacher_side, they are the teacher's own (its loss only).
    """
    for bucket in buckets:
        low, high = max(bucket.begin - 1 - start, 0), min(bucket.end - 1 - start, len(targets))
        if low >= high:
            continue
        rows = slice(low, high)
        mask = torch.ones(1, high - low, dtype=torch.bool)
        part_teacher = None if teacher_logits is None else teacher_logits[None, rows]
        totals = score(logits[None, rows], targets[None, rows], mask, part_teacher)
        if teacher_side:
            bucket.teacher = bucket.teacher or Totals()
            bucket.teacher.add(totals)
            continue
        bucket.model.add(Totals(nll=totals.nll, tokens=totals.tokens))
        if part_teacher is not None:
            bucket.compared.add(totals)


@torch.no_grad()
def score_long(
    model: T2RForCausalLM,
    ids: torch.Tensor,
    segment: int = 1024,
    edges: tuple[int, ...] = DEFAULT_EDGES,
    teacher: nn.Module | TeacherStream | None = None,
    progress: bool = True,
) -> LongResult:
    """Score token ids [N] as one stream; per-bucket perplexity (and vs the teacher where it runs).

    teacher: the softmax model, or its `read_teacher` pass over these ids (read once for several models).
    """
    started = time.perf_counter()
    length = len(ids)
    buckets = make_buckets(length, edges)
    stream = teacher if isinstance(teacher, TeacherStream) or teacher is None else read_teacher(teacher, ids)
    context = None if stream is None else stream.context
    hidden = None
    if stream is not None:
        # Predictions for the targets at positions 1 .. covered - 1: inside the teacher's context.
        hidden, head = stream.hidden, stream.head
        covered = len(hidden) + 1
        in_reach = [bucket for bucket in buckets if bucket.end <= covered]
        for begin in range(0, len(hidden), segment):
            end = min(begin + segment, len(hidden))
            file_scores(in_reach, begin, head(hidden[begin:end]), ids[begin + 1 : end + 1], None, teacher_side=True)

    state = model.init_state(1)
    sizes = []
    bar = tqdm(total=length, desc="long stream", unit="tok", unit_scale=True, disable=not progress)
    for begin in range(0, length - 1, segment):
        end = min(begin + segment, length - 1)
        logits, state = model(ids[None, begin:end], state=state, form="chunked")
        sizes.append(state.nbytes())
        # The teacher's logits exist for targets at positions < its context (rows < `reach`).
        reach = 0 if hidden is None else min(max(len(hidden) - begin, 0), end - begin)
        targets = ids[begin + 1 : end + 1]
        if reach:
            teacher_logits = head(hidden[begin : begin + reach])
            file_scores(buckets, begin, logits[0, :reach], targets[:reach], teacher_logits)
        file_scores(buckets, begin + reach, logits[0, reach:], targets[reach:], None)
        bar.update(end - begin)
    bar.close()
    return LongResult(buckets, length, segment, context, sizes, time.perf_counter() - started)
