"""`t2r bench`: speed and memory of a converted model against its teacher, on the same prompts.

For each context length the same prompt (a prefix of one text) is prefilled, then decoded greedily:
- the teacher through transformers with its KV cache and default attention (up to its context);
- the converted model: prefill through the chunked form in segments (activations bounded by the
  segment, so memory does not grow with the prompt), then decoding through `model.step` (the
  reference recurrent step), `fast_step` (in place) and the compiled fast step, with fp32 weights
  and, as further rows, int4 / int8 weight-only or bf16 weights (fp32 state);
- llama.cpp on the teacher's GGUF where `llama-cpp-python` is installed.
Each engine runs each context in a fresh child process that loads the model, so that every
context's peak memory is its own, measured from the same starting point: what an earlier context
left behind (KV caches, compiled graphs, batch-16 buffers, heap fragments) does not inflate a later
one, nor does its absence flatter the first. A child recompiles the compiled step, and inductor's
on-disk cache makes that a reload after the first context.
Batch 16 decodes 16 copies of the prefilled cache / state at once (prefill is timed at batch 1).
Decode speed is the median over repeats of timed blocks after warm-up steps (which include the
compilation); peak memory is the process's peak resident set during the case (freed memory is
returned to the system before each).
The memory-bandwidth bound: the machine's measured read bandwidth divided by the bytes of weights
one decode step must read.
"""

from __future__ import annotations

import ctypes
import gc
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from t2r.fast_decode import Decoder, FastState
from t2r.model import T2RForCausalLM
from t2r.state import ModelState


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


# ---------------------------------------------------------------------- memory


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * 4096


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the system (glibc), so that the next
    case's peak RSS is its own."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


@contextmanager
def peak_rss(interval: float = 0.02) -> Iterator[Callable[[], int]]:
    """Samples the resident set in a thread; yields a function that returns the peak so far."""
    release_memory()
    peak = [rss_bytes()]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield lambda: peak[0]
    finally:
        done.set()
        thread.join()
        peak[0] = max(peak[0], rss_bytes())


def memory_bandwidth(megabytes: int = 1024, repeats: int = 5) -> float:
    """Read bandwidth in bytes/s: the best of `repeats` sums over a buffer far larger than any cache."""
    buffer = torch.ones(megabytes * 2**20 // 4)
    buffer.sum()  # fault the pages in
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - start)
    return buffer.nbytes / best


def weight_bytes_per_token(model: nn.Module) -> int:
    """Bytes of weights one decode step reads: every parameter and buffer once, except an input
    embedding table that is not also the output head (a step reads one row of it)."""
    seen, total = set(), 0
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    skip = None
    head_weight = getattr(head, "weight", None)  # a quantised head (Int4Linear) has packed codes instead
    if embeddings is not None and (head_weight is None or head_weight.data_ptr() != embeddings.weight.data_ptr()):
        skip = embeddings.weight.data_ptr()
    for tensor in [*model.parameters(), *model.buffers()]:
        pointer = tensor.data_ptr()
        if pointer in seen or pointer == skip:
            continue
        seen.add(pointer)
        total += tensor.nbytes
    return total


# ---------------------------------------------------------------------- timing


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


def isolated(function: str, **arguments: Any) -> Any | str:
    """`t2r.bench.<function>(**arguments)` in a fresh child process, JSON in and out.

    Every engine's context runs this way, for two reasons. A child's peak memory is its own: it
    starts from a freshly loaded model, whatever earlier contexts allocated, compiled or fragmented,
    so the figures of different contexts compare (compiled graphs reload from inductor's on-disk
    cache). And a crash (a llama.cpp build for another CPU dies with SIGILL, a long context runs out
    of memory) ends that row, not the bench. Returns the result, or why there is none.
    """
    import json
    import subprocess
    import sys

    code = f"import json, sys, t2r.bench as b; a = json.loads(sys.stdin.read()); print(json.dumps(b.{function}(**a)))"
    done = subprocess.run([sys.executable, "-c", code], input=json.dumps(arguments), capture_output=True, text=True)
    if done.returncode != 0:
        reason = f"signal {-done.returncode}" if done.returncode < 0 else f"exit {done.returncode}"
        detail = done.stderr.strip().splitlines()[-1:] if done.returncode > 0 else []
        return f"{function} failed ({reason}{': ' + detail[0] if detail else ''})"
    return json.loads(done.stdout.strip().splitlines()[-1])


def llama_cpp_isolated(gguf: str, prompt: list[int], steps: int, repeats: int, threads: int) -> tuple | str:
    """`llama_cpp_case` in a child process; the figures, or why there are none."""
    found = isolated("llama_cpp_case", gguf=gguf, prompt=prompt, steps=steps, repeats=repeats, threads=threads)
    return found if isinstance(found, str) else tuple(found)


def teacher_cases_from_spec(
    spec: str, prompt: list[int], batches: list[int], steps: int, repeats: int, threads: int
) -> dict[str, Any]:
    """Load the teacher (as `t2r` names models) and run `teacher_cases`; JSON-ready, for a child."""
    from t2r.convert import load_model

    torch.set_num_threads(threads)
    teacher, _ = load_model(spec)
    cases = teacher_cases(teacher, torch.tensor(prompt, dtype=torch.long), batches, steps, repeats)
    return {"cases": [case.to_dict() for case in cases], "weight_bytes_per_token": weight_bytes_per_token(teacher)}


def converted_cases_from_folder(
    folder: str, prompt: list[int], settings: dict[str, Any], threads: int
) -> dict[str, Any]:
    """Load the converted model in `folder` and run `converted_cases` for each weight format of
    `settings` (a `BenchSettings` as a dict); JSON-ready, for a child."""
    from t2r.convert import load_converted

    torch.set_num_threads(threads)
    model, _ = load_converted(Path(folder))
    bench = BenchSettings.from_dict(settings)
    ids = torch.tensor(prompt, dtype=torch.long)
    cases: list[Case] = []
    weights: dict[str, int] = {}
    fp32_prefill = None
    for weight_format, variant, engines in converted_variants(model, bench):
        # int8 / int4 rows measure decoding: the fp32 prefill's state serves them (a prefill through
        # the weight-only kernels is no faster than fp32's, measured: int4 at 512 rows 10.8 ms per
        # 1536x576 matrix vs fp32 11.3), and their prefill is not reported separately.
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


# ---------------------------------------------------------------------- the whole bench


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

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> BenchSettings:
        """From `asdict` after a JSON round trip (which turns the tuples into lists)."""
        return cls(**{key: tuple(value) if isinstance(value, list) else value for key, value in fields.items()})


def engine_name(weights: str, compiled: bool) -> str:
    """ "converted (fast)", "converted (compiled, int8)", ...: how a converted row decodes."""
    return f"converted ({'compiled' if compiled else 'fast'}{'' if weights == 'fp32' else ', ' + weights})"


def converted_variants(
    model: T2RForCausalLM, settings: BenchSettings
) -> list[tuple[str, T2RForCausalLM, dict[str, tuple[Stepper, tuple[int, ...]]]]]:
    """(weight format, model with those weights, engines) for each converted row set."""
    from t2r.quantize import with_weights

    batches = tuple(settings.batches)
    variants = []
    for weights in settings.weights:
        engines: dict[str, tuple[Stepper, tuple[int, ...]]] = {}
        if weights == "fp32" or not settings.compile:
            engines[engine_name(weights, False)] = (stepper_for(Decoder()), batches)
        if settings.compile:  # one compiled decoder per weight format: compiled once, reused
            engines[engine_name(weights, True)] = (stepper_for(Decoder(compile=True)), batches)
        if weights == "fp32" and settings.reference_step:
            engines["converted (step)"] = (reference_stepper, (1,))  # the reference, batch 1 only
        variants.append((weights, with_weights(model, weights), engines))
    return variants


def bench_prompt_ids(tokenizer: Any, text: str | None, length: int) -> torch.Tensor:
    """`length` token ids of `text`, or of the built-in corpus (State of the Union addresses)."""
    if text is None:
        from t2r.corpus import state_of_the_union

        text = "\n\n".join(state_of_the_union().documents)
    ids = tokenizer(text[: length * 12], add_special_tokens=False).input_ids
    if len(ids) < length:
        from t2r.errors import UsageError

        raise UsageError(f"the bench text has {len(ids):,} tokens; the longest context needs {length:,}")
    return torch.tensor(ids[:length], dtype=torch.long)


def run_bench(
    folder: str | Path,
    teacher_spec: str,
    prompt_ids: torch.Tensor,
    settings: BenchSettings,
    teacher_context: int | None = None,
    gguf: str | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Every case of the bench; returns the JSON-ready record (machine, cases, bounds).

    folder is the converted model's folder; teacher_spec names the teacher as `t2r` does (alias,
    folder, .gguf, hub id); teacher_context is the longest context the teacher takes (None: no
    limit). Each engine's context runs in a fresh child process that loads its model (see
    `isolated`): every context's peak memory is measured from the same fresh start, so the figure
    at 256 and the one at 32k compare. A child that fails is logged and recorded as the engine's
    status ("converted", "teacher", "llama_cpp"), and that engine measures no further contexts.
    """
    import platform

    teacher_limit = max(settings.contexts) if teacher_context is None else teacher_context
    threads = torch.get_num_threads()
    bandwidth = memory_bandwidth()
    log(f"memory read bandwidth {bandwidth / 1e9:.1f} GB/s; {threads} threads")
    weights: dict[str, int] = {}
    cases: list[Case] = []
    converted_status = "measured"
    teacher_status = "measured"
    llama_status = "measured" if gguf is not None and llama_cpp_available() else "not installed"
    for context in settings.contexts:
        prompt = prompt_ids[:context]
        if converted_status == "measured":
            found = isolated(
                "converted_cases_from_folder",
                folder=str(folder),
                prompt=prompt.tolist(),
                settings=asdict(settings),
                threads=threads,
            )
            if isinstance(found, str):
                converted_status = found
                log(found)
            else:
                weights.update(found["weight_bytes_per_token"])
                for record in found["cases"]:
                    case = Case(**record)
                    log(describe(case))
                    cases.append(case)
        if context <= teacher_limit and teacher_status == "measured":
            found = isolated(
                "teacher_cases_from_spec",
                spec=teacher_spec,
                prompt=prompt.tolist(),
                batches=list(settings.batches),
                steps=settings.steps,
                repeats=settings.repeats,
                threads=threads,
            )
            if isinstance(found, str):
                teacher_status = found
                log(found)
            else:
                weights["teacher"] = found["weight_bytes_per_token"]
                for record in found["cases"]:
                    case = Case(**record)
                    log(describe(case))
                    cases.append(case)
        if gguf is not None and llama_cpp_available() and context <= teacher_limit and llama_status == "measured":
            found = llama_cpp_isolated(gguf, prompt.tolist(), settings.steps, settings.repeats, threads)
            if isinstance(found, str):
                llama_status = found  # the engine does not run here: no more llama.cpp rows
                log(found)
            else:
                case = Case("llama.cpp", context, 1, found[0], found[1], found[2], 0)
                weights["llama.cpp"] = Path(gguf).stat().st_size  # every tensor of the GGUF, once a token
                log(describe(case))
                cases.append(case)
    return {
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "threads": threads,
            "torch": torch.__version__,
            "memory_read_bandwidth_bytes_per_s": bandwidth,
        },
        "settings": asdict(settings),
        "teacher_context": teacher_limit,
        "converted": converted_status,
        "teacher": teacher_status,
        "weight_bytes_per_token": weights,
        "llama_cpp": llama_status,
        "cases": [case.to_dict() for case in cases],
    }


def describe(case: Case) -> str:
    prefill = f"prefill {case.prefill_tokens_per_s:8.1f} tok/s; " if case.prefill_tokens_per_s else ""
    return (
        f"{case.engine:<24} context {case.context:>6} batch {case.batch:>2}: {prefill}"
        f"decode {case.decode_tokens_per_s:7.1f} tok/s; peak RSS {case.peak_rss_bytes / 2**20:7.0f} MiB; "
        f"state/cache {case.state_bytes_per_sequence / 2**20:7.2f} MiB per sequence"
    )
