"""`t2r bench`: speed and memory of a converted model against its teacher, on the same prompts.

For each context length the same prompt (a prefix of one text) is prefilled, then decoded greedily
by every engine (`plan`):
- the teacher through transformers: eager with its growing KV cache ("teacher"), and at its best,
  compiled with a static KV cache ("teacher (compiled)"), in each weight format of the converted
  rows (`bench.teacher`);
- the converted model: prefill through the chunked form in segments (activations bounded by the
  segment, so memory does not grow with the prompt), then decoding through `model.step` (the
  reference recurrent step), `fast_step` (in place) and the compiled fast step, with fp32 weights
  and, as further rows, int4 / int8 weight-only or bf16 weights (fp32 state); the sliding-window
  baseline likewise where asked for;
- llama.cpp on the teacher's GGUF where `llama-cpp-python` is installed.
The engines run in interleaved rounds: for each context, `repeats` rounds, and in each round every
engine once, in turn (A B C A B C ...), so that the machine's drift over the minutes (heat, other
processes, memory layout) touches every engine alike. Each run is a fresh child process that loads
its one engine (`isolated`): its peak memory is that engine's alone, measured from the same start,
whatever another engine or an earlier context allocated, compiled or fragmented. A child compiles
its compiled step, and inductor's on-disk cache makes that a reload after the first.
In a child, the prefill is timed at batch 1 after an untimed warm-up prefill, then batch 16 decodes
16 copies of the prefilled cache / state at once; one block of decode steps is timed after warm-up
steps (which include the compilation). A case reports the median over rounds of each rate with its
spread (min, max) and every round's figure, and the largest peak resident set of the rounds
(freed memory is returned to the system before each measurement).
The memory-bandwidth bound: the machine's measured read bandwidth divided by the bytes of weights
one decode step must read.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from t2r.data.corpus import state_of_the_union
from t2r.errors import UsageError
from t2r.evaluation.bench.cases import BenchSettings, Case, Engine, aggregate
from t2r.evaluation.bench.engines import llama_cpp_available
from t2r.evaluation.bench.memory import memory_bandwidth

MEASURED = "measured"


def isolated(function: str, **arguments: Any) -> Any | str:
    """`t2r.evaluation.bench.engines.<function>(**arguments)` in a fresh child process, JSON in and out.

    Every engine's round runs this way, for two reasons. A child's peak memory is its own: it
    starts from a freshly loaded model, whatever other engines or earlier contexts allocated,
    compiled or fragmented, so the figures compare (compiled graphs reload from inductor's on-disk
    cache). And a crash (a llama.cpp build for another CPU dies with SIGILL, a long context runs out
    of memory) ends that row, not the bench. Returns the result, or why there is none.
    """
    code = (
        "import json, sys, t2r.evaluation.bench.engines as engines; arguments = json.loads(sys.stdin.read()); "
        f"print(json.dumps(engines.{function}(**arguments)))"
    )
    done = subprocess.run([sys.executable, "-c", code], input=json.dumps(arguments), capture_output=True, text=True)
    if done.returncode != 0:
        reason = f"signal {-done.returncode}" if done.returncode < 0 else f"exit {done.returncode}"
        detail = done.stderr.strip().splitlines()[-1:] if done.returncode > 0 else []
        return f"{function} failed ({reason}{': ' + detail[0] if detail else ''})"
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_prompt_ids(tokenizer: Any, text: str | None, length: int) -> torch.Tensor:
    """`length` token ids of `text`, or of the built-in corpus (State of the Union addresses)."""
    if text is None:
        text = "\n\n".join(state_of_the_union().documents)
    ids = tokenizer(text[: length * 12], add_special_tokens=False).input_ids
    if len(ids) < length:
        raise UsageError(f"the bench text has {len(ids):,} tokens; the longest context needs {length:,}")
    return torch.tensor(ids[:length], dtype=torch.long)


def plan(
    folder: str | Path,
    teacher_spec: str,
    settings: BenchSettings,
    teacher_context: int | None = None,
    gguf: str | None = None,
) -> list[Engine]:
    """Every engine of the bench, in the order of a round. Per weight format: the eager decoder
    (fp32 always; the other formats when nothing is compiled) and the compiled one (when
    compiling). The teacher's rows mirror the converted model's, and partners of the same weights
    and decoder run side by side (teacher, converted, baseline), so that the ratio of a pair spans
    the least drift; the reference step follows the fp32 eager pair, llama.cpp ends the round."""
    decoders = []
    for weights in settings.weights:
        if weights == "fp32" or not settings.compile:
            decoders.append((weights, "eager"))
        if settings.compile:
            decoders.append((weights, "compiled"))
    kinds = ("converted", "baseline") if settings.baseline else ("converted",)
    batches, backend = tuple(settings.batches), settings.backend
    engines = []
    for weights, decoder in decoders:
        engines.append(Engine("teacher", teacher_spec, weights, decoder, batches, teacher_context, backend))
        cache = settings.global_cache
        engines += [Engine(kind, str(folder), weights, decoder, batches, None, backend, cache) for kind in kinds]
        if (weights, decoder) == ("fp32", "eager") and settings.reference_step:
            engines.append(Engine("converted", str(folder), weights, "step", (1,), None, backend, cache))
    if gguf is not None:
        engines.append(Engine("llama.cpp", gguf, "fp32", "eager", (1,), teacher_context, backend))
    return engines


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
    limit). Every round of every engine runs in a fresh child process (see `isolated`). A child
    that fails is logged and recorded as that engine's status (`record["engines"]`), and that
    engine measures no further rounds or contexts; the rounds it did measure are kept.
    """
    teacher_limit = max(settings.contexts) if teacher_context is None else teacher_context
    threads = torch.get_num_threads()
    bandwidth = memory_bandwidth()
    log(f"memory read bandwidth {bandwidth / 1e9:.1f} GB/s; {threads} threads")
    llama_cpp = gguf is not None and llama_cpp_available()
    engines = plan(folder, teacher_spec, settings, teacher_limit, gguf if llama_cpp else None)
    status = {engine.name: MEASURED for engine in engines}
    weights: dict[str, int] = {}
    cases: list[Case] = []
    for context in settings.contexts:
        rounds: dict[tuple[str, int], list[Case]] = {}  # (engine, batch) -> its cases, round by round
        for number in range(1, settings.repeats + 1):
            for engine in engines:
                if status[engine.name] != MEASURED or (engine.longest is not None and context > engine.longest):
                    continue
                found = isolated(
                    "measure",
                    engine=engine.to_dict(),
                    prompt=prompt_ids[:context].tolist(),
                    steps=settings.steps,
                    segment=settings.segment,
                    threads=threads,
                )
                if isinstance(found, str):  # the engine does not run here: no more rounds of it
                    status[engine.name] = f"{engine.name}: {found}"
                    log(status[engine.name])
                    continue
                weights[engine.name] = found["weight_bytes_per_token"]
                for record in found["cases"]:
                    rounds.setdefault((engine.name, record["batch"]), []).append(Case(**record))
                rates = ", ".join(f"batch {c['batch']} {c['decode_tokens_per_s']:.1f}" for c in found["cases"])
                log(f"round {number}/{settings.repeats}, context {context}: {engine.name} decodes {rates} tok/s")
        for measured in rounds.values():
            cases.append(aggregate(measured))
            log(describe(cases[-1]))
    return {
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "threads": threads,
            "torch": torch.__version__,
            "memory_read_bandwidth_bytes_per_s": bandwidth,
        },
        "settings": asdict(settings),
        "teacher_context": teacher_limit,
        "engines": status,
        **{kind: kind_status(engines, status, kind) for kind in ("converted", "teacher")},
        "weight_bytes_per_token": weights,
        "llama_cpp": kind_status(engines, status, "llama.cpp") if llama_cpp else "not installed",
        "baseline": kind_status(engines, status, "baseline") if settings.baseline else "not asked for",
        "cases": [case.to_dict() for case in cases],
    }


def kind_status(engines: list[Engine], status: dict[str, str], kind: str) -> str:
    """ "measured" when every engine of `kind` measured every round it was due, else the first
    failure ("teacher (compiled, int4): measure failed (...)")."""
    failures = [status[e.name] for e in engines if e.kind == kind and status[e.name] != MEASURED]
    return failures[0] if failures else MEASURED


def describe(case: Case) -> str:
    spread = ""
    if case.decode_tokens_per_s_min is not None and len(case.decode_rounds) > 1:
        spread = f" ({case.decode_tokens_per_s_min:.1f}-{case.decode_tokens_per_s_max:.1f})"
    prefill = f"prefill {case.prefill_tokens_per_s:8.1f} tok/s; " if case.prefill_tokens_per_s else ""
    return (
        f"{case.engine:<26} context {case.context:>6} batch {case.batch:>2}: {prefill}"
        f"decode {case.decode_tokens_per_s:7.1f}{spread} tok/s; peak RSS {case.peak_rss_bytes / 2**20:7.0f} MiB; "
        f"state/cache {case.state_bytes_per_sequence / 2**20:7.2f} MiB per sequence"
    )
