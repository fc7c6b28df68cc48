"""The teacher as the bench runs it: transformers' forward with its KV cache, eager or compiled, in
any of t2r's weight formats.

- eager ("teacher", "teacher (int4)", ...): transformers' default, a `DynamicCache` that grows by
  one position per token, the forward uncompiled;
- compiled ("teacher (compiled)", "teacher (compiled, int4)", ...): transformers' fast path for
  decoding, what `generate` runs with `cache_implementation="static"`: a `StaticCache` (keys and
  values preallocated for the whole run, written in place, so every step has the same shapes) and
  the forward compiled by `model.get_compiled_call(CompileConfig(...))` (`torch.compile` of the
  model's `__call__`, transformers' default compile settings); the prefill runs eagerly, as in
  `generate`, and each one-token step runs the compiled graph.
The weights are those of the converted rows (`t2r.modeling.quantize.with_weights`: the same int4 /
int8 kernels, the same bf16 cast), so that each converted row has a teacher row that differs from
it in the attention alone. A bf16 teacher keeps its KV cache in bf16 (transformers' cache takes
the dtype of the keys); the converted model's state stays fp32.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from t2r.evaluation.bench.cases import WARMUP_STEPS, Case, decode_rate, engine_name, timed
from t2r.evaluation.bench.memory import peak_rss

Forward = Callable[..., Any]  # the teacher's __call__, eager or compiled


def compiled_forward(teacher: nn.Module, backend: str = "inductor") -> Forward:
    """The teacher's forward through transformers' `get_compiled_call` (what `generate` uses for its
    decode steps with a static cache), with transformers' default `CompileConfig` but `backend`."""
    from transformers import CompileConfig

    return teacher.get_compiled_call(CompileConfig(backend=backend))


@torch.no_grad()
def prefill(teacher: nn.Module, ids: torch.Tensor, static_length: int | None = None) -> tuple[torch.Tensor, Any]:
    """Eager forward of ids [T] at batch 1 into a new cache; the last logits [1, V] and the cache.

    static_length: None, a DynamicCache (grows with every token); else a StaticCache of that many
    positions (the prompt and every decode step to come).
    """
    cache = None
    if static_length is not None:
        from transformers import StaticCache

        cache = StaticCache(config=teacher.config, max_cache_len=static_length)
    out = teacher(input_ids=ids[None], cache=cache, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1], out.cache


def repeated(cache: Any, batch: int) -> Any:
    """A copy of a batch-1 cache (dynamic or static) with `batch` rows, each the same sequence."""
    copied = copy.deepcopy(cache)
    for layer in copied.layers:
        if not layer.is_initialized:
            continue
        layer.keys = layer.keys.repeat_interleave(batch, dim=0)
        layer.values = layer.values.repeat_interleave(batch, dim=0)
        if layer.is_compileable:
            # A static layer's tensors are written in place at fixed addresses: say so to dynamo, as
            # the StaticCache does for those it allocates (its lazy initialisation).
            layer.batch_size = batch
            for tensor in (layer.keys, layer.values, layer.cumulative_length):
                torch._dynamo.mark_static_address(tensor)
    return copied


def cache_bytes(cache: Any, context: int) -> int:
    """Bytes of keys and values one sequence holds after `context` tokens (a static cache's
    positions beyond them are preallocated, not yet written: not counted)."""
    total = 0
    for layer in cache.layers:
        if layer.is_initialized:
            total += layer.keys[:1, :, :context].nbytes + layer.values[:1, :, :context].nbytes
    return total


def stepper(forward: Forward, cache: Any, token: torch.Tensor) -> Callable[[], torch.Tensor]:
    """Greedy decode steps of the teacher from token [B] with its cache (updated by each step);
    each call returns the next tokens [B]."""
    current = {"token": token[:, None]}

    @torch.no_grad()
    def step() -> torch.Tensor:
        result = forward(input_ids=current["token"], cache=cache, use_cache=True)
        current["token"] = result.logits[:, -1].argmax(-1)[:, None]
        return current["token"][:, 0]

    return step


@torch.no_grad()
def teacher_cases(
    teacher: nn.Module,
    prompt: torch.Tensor,
    batches: tuple[int, ...],
    steps: int,
    weights: str = "fp32",
    compiled: bool = False,
    backend: str = "inductor",
    warmup_tokens: int = 512,
) -> list[Case]:
    """One round of the teacher at one context: prefill prompt [T] at batch 1 (timed, after an
    untimed prefill of its first `warmup_tokens` tokens), then decode each batch size from copies of
    the prefilled cache. `weights` only names the rows: `teacher` already has them."""
    name = engine_name("teacher", weights, "compiled" if compiled else "eager")
    prompt = prompt.to(teacher.device)
    # A static cache holds the prompt and every step decode_rate takes (warm-up and timed block).
    static_length = len(prompt) + WARMUP_STEPS + steps if compiled else None
    forward = compiled_forward(teacher, backend) if compiled else teacher
    prefill(teacher, prompt[:warmup_tokens], None if static_length is None else warmup_tokens)
    with peak_rss() as peak:
        (logits, cache), seconds = timed(lambda: prefill(teacher, prompt, static_length))
        prefill_peak = peak()
    first = logits.argmax(-1)
    cases = []
    for batch in batches:
        with peak_rss() as peak:
            step = stepper(forward, repeated(cache, batch), first.repeat(batch))
            rate = decode_rate(step, batch, steps)
            del step
            case_peak = max(peak(), prefill_peak)
        prefill_rate = len(prompt) / seconds if batch == 1 else None
        cases.append(Case(name, len(prompt), batch, prefill_rate, rate, case_peak, cache_bytes(cache, len(prompt))))
    return cases
