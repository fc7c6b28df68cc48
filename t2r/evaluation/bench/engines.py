"""The engines `t2r bench` measures, one context at a time: the teacher (transformers, KV cache),
the converted model (reference step, fast step, compiled, with each weight format) and llama.cpp.

Each `*_from_*` function is what a child process runs (`run.isolated`): it loads its model, measures
and returns JSON-ready figures.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from t2r.evaluation.bench.memory import peak_rss, weight_bytes_per_token
from t2r.modeling.fast_decode import Decoder, FastState
from t2r.modeling.model import T2RForCausalLM
from t2r.ops.state import ModelState


@dataclass
class Case:
    """One measured configuration."""

    engine: str
    context: int
    batch: int
    prefill_tokens_per_s: float | None
    decode_tokens_per_s: float
    peak_rss_bytes: int
    state_bytes_per_sequence: int  # recurrent state, or KV cache at this context

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class BenchSettings:
    contexts: tuple[int, ...] = (256, 1024, 2048, 4096, 8192, 16384, 32768)
    batches: tuple[int, ...] = (1, 16)
    steps: int = 16  # decode steps per timed block
    repeats: int = 3  # timed blocks (median)
    segment: int = 512  # prefill segment of the converted model
    weights: tuple[str, ...] = ("fp32", "int4", "bf16")  # weight formats of the converted rows
    compile: bool = True  # the compiled fast step as rows (besides the eager fp32 one)
    reference_step: bool = True  # also `model.step`, the reference decode (batch 1)
    # Rows of the training-free sliding-window baseline at the converted model's state bytes
    # (`t2r.hub.load_baseline`), in the same weight formats: what the recurrent state must beat.
    baseline: bool = False

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> BenchSettings:
        """From `asdict` after a JSON round trip (which turns the tuples into lists)."""
        return cls(**{key: tuple(value) if isinstance(value, list) else value for key, value in fields.items()})


def decode_rate(step: Callable[[], None], batch: int, steps: int, repeats: int, warmup: int = 2) -> float:
    """Tokens/s (all rows counted): the median over `repeats` blocks of `steps` steps."""
    for _ in range(warmup):
        step()
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        rates.append(batch * steps / (time.perf_counter() - start))
    return statistics.median(rates)


def teacher_stepper(teacher: nn.Module, cache: Any, token: torch.Tensor) -> Callable[[], None]:
    """A decode step of the teacher with its KV cache (which grows by one position per step)."""
    current = {"token": token[:, None]}

    def step() -> None:
        result = teacher(input_ids=current["token"], cache=cache, use_cache=True)
        current["token"] = result.logits[:, -1].argmax(-1)[:, None]

    return step


@torch.no_grad()
def teacher_cases(teacher: nn.Module, prompt: torch.Tensor, batches: list[int], steps: int, repeats: int) -> list[Case]:
    """Prefill prompt [T] once at batch 1 (timed), then decode each batch size from copies of the cache."""
    import copy

    cases = []
    with peak_rss() as peak:
        start = time.perf_counter()
        out = teacher(input_ids=prompt[None], use_cache=True, logits_to_keep=1)
        prefill = len(prompt) / (time.perf_counter() - start)
        prefill_peak = peak()
    cache_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in out.cache.layers)
    first = out.logits[:, -1].argmax(-1)
    for batch in batches:
        with peak_rss() as peak:
            cache = copy.deepcopy(out.cache)
            if batch > 1:
                cache.batch_repeat_interleave(batch)
            step = teacher_stepper(teacher, cache, first.repeat(batch))
            rate = decode_rate(step, batch, steps, repeats)
            del step, cache
            case_peak = max(peak(), prefill_peak)
        cases.append(Case("teacher", len(prompt), batch, prefill if batch == 1 else None, rate, case_peak, cache_bytes))
    return cases


@torch.no_grad()
def prefill_converted(model: T2RForCausalLM, prompt: torch.Tensor, segment: int) -> tuple[torch.Tensor, ModelState]:
    """Chunked prefill of prompt [T] in segments that carry the state; the last logits [1, V]."""
    state = model.init_state(1)
    logits = None
    for begin in range(0, len(prompt), segment):
        logits, state = model(prompt[None, begin : begin + segment], state=state, form="chunked", logits_to_keep=1)
    return logits[:, -1], state


def reference_stepper(model: T2RForCausalLM, state: ModelState, token: torch.Tensor) -> Callable[[], None]:
    """A decode step through `model.step` (a new state object every token)."""
    current = {"state": state, "token": token}

    def step() -> None:
        logits, current["state"] = model.step(current["token"], current["state"])
        current["token"] = logits.argmax(-1)

    return step


Stepper = Callable[[T2RForCausalLM, ModelState, torch.Tensor], Callable[[], None]]


def stepper_for(decoder: Decoder) -> Stepper:
    """Decode steps through `decoder` (the fast step, eager or compiled; state updated in place)."""

    def make(model: T2RForCausalLM, state: ModelState, token: torch.Tensor) -> Callable[[], None]:
        fast_state = FastState.from_model_state(state)
        current = {"token": token}

        def step() -> None:
            current["token"] = decoder(model, current["token"], fast_state).argmax(-1)

        return step

    return make


@torch.no_grad()
def converted_cases(
    model: T2RForCausalLM,
    engines: dict[str, tuple[Stepper, tuple[int, ...]]],
    prompt: torch.Tensor,
    steps: int,
    repeats: int,
    segment: int,
    prefilled: tuple[torch.Tensor, ModelState] | None = None,
) -> tuple[list[Case], tuple[torch.Tensor, ModelState]]:
    """Prefill once at batch 1 (timed) unless `prefilled` gives (logits, state), then decode with
    each named (stepper, batch sizes). Returns the cases and the prefill's (logits, state)."""
    with peak_rss() as peak:
        start = time.perf_counter()
        logits, state = prefill_converted(model, prompt, segment) if prefilled is None else prefilled
        prefill = len(prompt) / (time.perf_counter() - start) if prefilled is None else None
        prefill_peak = peak()
    state_bytes = state.nbytes()
    cases = []
    for name, (make_stepper, batches) in engines.items():
        for batch in batches:
            with peak_rss() as peak:
                rows = torch.zeros(batch, dtype=torch.long)
                step = make_stepper(model, state.select(rows), logits.argmax(-1).repeat(batch))
                rate = decode_rate(step, batch, steps, repeats)
                del step
                case_peak = max(peak(), prefill_peak)
            cases.append(Case(name, len(prompt), batch, prefill if batch == 1 else None, rate, case_peak, state_bytes))
    return cases, (logits, state)


def llama_cpp_case(gguf: str, prompt: list[int], steps: int, repeats: int, threads: int) -> tuple[float, float, int]:
    """llama.cpp (llama-cpp-python) on the GGUF: prefill tok/s, decode tok/s, peak RSS; batch 1."""
    from llama_cpp import Llama

    with peak_rss() as peak:
        llm = Llama(model_path=gguf, n_ctx=len(prompt) + 64, n_threads=threads, n_batch=512, verbose=False)
        start = time.perf_counter()
        llm.eval(prompt)
        prefill = len(prompt) / (time.perf_counter() - start)

        def last_argmax() -> int:
            # Without logits_all, llama-cpp-python keeps no scores: read the context's last logits.
            import numpy as np

            return int(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).argmax())

        token = [last_argmax()]

        def step() -> None:
            llm.eval(token)
            token[0] = last_argmax()

        rate = decode_rate(step, 1, steps, repeats)
        llm.close()
    return prefill, rate, peak()


def llama_cpp_cases_from_gguf(gguf: str, prompt: list[int], steps: int, repeats: int, threads: int) -> dict[str, Any]:
    """`llama_cpp_case` as the other engines report, JSON-ready, for a child. Its bytes per token:
    every tensor of the GGUF, once a token."""
    prefill, rate, peak = llama_cpp_case(gguf, prompt, steps, repeats, threads)
    case = Case("llama.cpp", len(prompt), 1, prefill, rate, peak, 0)
    return {"cases": [case.to_dict()], "weight_bytes_per_token": {"llama.cpp": Path(gguf).stat().st_size}}


def teacher_cases_from_spec(
    spec: str, prompt: list[int], batches: list[int], steps: int, repeats: int, threads: int
) -> dict[str, Any]:
    """Load the teacher (as `t2r` names models) and run `teacher_cases`; JSON-ready, for a child."""
    from t2r.hub import load_model

    torch.set_num_threads(threads)
    teacher, _ = load_model(spec)
    cases = teacher_cases(teacher, torch.tensor(prompt, dtype=torch.long), batches, steps, repeats)
    return {
        "cases": [case.to_dict() for case in cases],
        "weight_bytes_per_token": {"teacher": weight_bytes_per_token(teacher)},
    }


def converted_cases_from_folder(
    folder: str, prompt: list[int], settings: dict[str, Any], threads: int
) -> dict[str, Any]:
    """Load the converted model in `folder` and run `converted_cases` for each weight format of
    `settings` (a `BenchSettings` as a dict); JSON-ready, for a child."""
    from t2r.hub import load_converted

    torch.set_num_threads(threads)
    model, _ = load_converted(Path(folder))
    return _variant_cases(model, prompt, settings, "converted")


def baseline_cases_from_folder(
    folder: str, prompt: list[int], settings: dict[str, Any], threads: int
) -> dict[str, Any]:
    """As `converted_cases_from_folder`, for the sliding-window baseline of the converted model in
    `folder` (its teacher over the same sinks and the window of equal state bytes)."""
    from t2r.hub import load_baseline, load_converted

    torch.set_num_threads(threads)
    model, _ = load_converted(Path(folder))
    return _variant_cases(load_baseline(model), prompt, settings, "baseline")


def _variant_cases(model: T2RForCausalLM, prompt: list[int], settings: dict[str, Any], kind: str) -> dict[str, Any]:
    bench = BenchSettings.from_dict(settings)
    ids = torch.tensor(prompt, dtype=torch.long)
    cases: list[Case] = []
    weights: dict[str, int] = {}
    fp32_prefill = None
    for weight_format, variant, engines in converted_variants(model, bench, kind):
        # int8 / int4 rows measure decoding: the fp32 prefill's state serves them (a prefill is
        # compute-bound, and the weight-only kernels do not make it faster), so their prefill is not
        # reported separately.
        reuse = fp32_prefill if weight_format in ("int8", "int4") else None
        found, prefilled = converted_cases(variant, engines, ids, bench.steps, bench.repeats, bench.segment, reuse)
        if weight_format == "fp32":
            fp32_prefill = prefilled
        cases += found
        for name in engines:
            weights[name] = weight_bytes_per_token(variant.base)
    return {"cases": [case.to_dict() for case in cases], "weight_bytes_per_token": weights}


def llama_cpp_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def engine_name(weights: str, compiled: bool, kind: str = "converted") -> str:
    """ "converted (fast)", "converted (compiled, int8)", "baseline (fast)", ...: how a row decodes."""
    return f"{kind} ({'compiled' if compiled else 'fast'}{'' if weights == 'fp32' else ', ' + weights})"


def converted_variants(
    model: T2RForCausalLM, settings: BenchSettings, kind: str = "converted"
) -> list[tuple[str, T2RForCausalLM, dict[str, tuple[Stepper, tuple[int, ...]]]]]:
    """(weight format, model with those weights, engines) for each row set of `kind` (converted or
    baseline; only the converted model has the reference-step row)."""
    from t2r.modeling.quantize import with_weights

    batches = tuple(settings.batches)
    variants = []
    for weights in settings.weights:
        engines: dict[str, tuple[Stepper, tuple[int, ...]]] = {}
        if weights == "fp32" or not settings.compile:
            engines[engine_name(weights, False, kind)] = (stepper_for(Decoder()), batches)
        if settings.compile:  # one compiled decoder per weight format: compiled once, reused
            engines[engine_name(weights, True, kind)] = (stepper_for(Decoder(compile=True)), batches)
        if weights == "fp32" and settings.reference_step and kind == "converted":
            engines["converted (step)"] = (reference_stepper, (1,))  # the reference, batch 1 only
        variants.append((weights, with_weights(model, weights), engines))
    return variants
