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
from t2r.evaluation.bench.engines import BenchSettings, Case, llama_cpp_available
from t2r.evaluation.bench.memory import memory_bandwidth


def isolated(function: str, **arguments: Any) -> Any | str:
    """`t2r.evaluation.bench.engines.<function>(**arguments)` in a fresh child process, JSON in and out.

    Every engine's context runs this way, for two reasons. A child's peak memory is its own: it
    starts from a freshly loaded model, whatever earlier contexts allocated, compiled or fragmented,
    so the figures of different contexts compare (compiled graphs reload from inductor's on-disk
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
    teacher_limit = max(settings.contexts) if teacher_context is None else teacher_context
    threads = torch.get_num_threads()
    bandwidth = memory_bandwidth()
    log(f"memory read bandwidth {bandwidth / 1e9:.1f} GB/s; {threads} threads")
    common = {"steps": settings.steps, "repeats": settings.repeats, "threads": threads}
    # engine status key -> (the child's function in `engines`, its arguments but the prompt, longest context)
    runs = {
        "converted": (
            "converted_cases_from_folder",
            {"folder": str(folder), "settings": asdict(settings), "threads": threads},
            max(settings.contexts),
        ),
        "teacher": (
            "teacher_cases_from_spec",
            {"spec": teacher_spec, "batches": list(settings.batches), **common},
            teacher_limit,
        ),
    }
    if settings.baseline:
        runs["baseline"] = (
            "baseline_cases_from_folder",
            {"folder": str(folder), "settings": asdict(settings), "threads": threads},
            max(settings.contexts),
        )
    status = {name: "measured" for name in (*runs, "llama_cpp")}
    if gguf is not None and llama_cpp_available():
        runs["llama_cpp"] = ("llama_cpp_cases_from_gguf", {"gguf": gguf, **common}, teacher_limit)
    else:
        status["llama_cpp"] = "not installed"
    weights: dict[str, int] = {}
    cases: list[Case] = []
    for context in settings.contexts:
        for name, (function, arguments, longest) in runs.items():
            if status[name] != "measured" or context > longest:
                continue
            found = isolated(function, prompt=prompt_ids[:context].tolist(), **arguments)
            if isinstance(found, str):  # the engine does not run here: no more rows of it
                status[name] = found
                log(found)
                continue
            weights.update(found["weight_bytes_per_token"])
            for record in found["cases"]:
                cases.append(Case(**record))
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
        "converted": status["converted"],
        "teacher": status["teacher"],
        "weight_bytes_per_token": weights,
        "llama_cpp": status["llama_cpp"],
        "baseline": status.get("baseline", "not asked for"),
        "cases": [case.to_dict() for case in cases],
    }


def describe(case: Case) -> str:
    prefill = f"prefill {case.prefill_tokens_per_s:8.1f} tok/s; " if case.prefill_tokens_per_s else ""
    return (
        f"{case.engine:<24} context {case.context:>6} batch {case.batch:>2}: {prefill}"
        f"decode {case.decode_tokens_per_s:7.1f} tok/s; peak RSS {case.peak_rss_bytes / 2**20:7.0f} MiB; "
        f"state/cache {case.state_bytes_per_sequence / 2**20:7.2f} MiB per sequence"
    )
