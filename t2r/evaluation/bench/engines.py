"""The engines `t2r bench` measures, one engine at one context per child process: the teacher
(`bench.teacher`: eager or compiled with a static cache), the converted model and its sliding-window
baseline (reference step, fast step, compiled fast step), each in a weight format, and llama.cpp.

`measure` is what a child runs (`run.isolated`): it loads the engine's model, converts its weights,
drops the original (so that the child's memory is this engine's alone), prefills the prompt once
untimed (its first `segment` tokens: the first calls' allocations and kernel set-up) and once timed,
then decodes one block per batch size after warm-up steps (which include the compilation), and
returns JSON-ready figures: one round (`run.run_bench` interleaves the rounds of all engines).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from t2r.evaluation.bench.cases import Case, Engine, decode_rate, timed
from t2r.evaluation.bench.memory import peak_rss, release_memory, weight_bytes_per_token
from t2r.evaluation.bench.teacher import teacher_cases
from t2r.modeling.fast_decode import Decoder, FastState
from t2r.modeling.model import T2RForCausalLM
from t2r.ops.denormals import flush_denormals
from t2r.ops.state import ModelState


def measure(engine: dict[str, Any], prompt: list[int], steps: int, segment: int, threads: int) -> dict[str, Any]:
    """One round of `engine` (an `Engine` as a dict) on the prompt's token ids, in a child:
    {"cases": [a Case dict per batch size], "weight_bytes_per_token": bytes one decode step reads}."""
    spec = Engine.from_dict(engine)
    flush_denormals()  # as `t2r` does, for every engine alike (before any parallel work)
    torch.set_num_threads(threads)
    ids = torch.tensor(prompt, dtype=torch.long)
    if spec.kind == "llama.cpp":
        prefill, rate, peak = llama_cpp_case(spec.source, prompt, steps, threads, warmup_tokens=segment)
        case = Case(spec.name, len(prompt), 1, prefill, rate, peak, 0)
        # Its bytes per token: every tensor of the GGUF, once a token.
        return {"cases": [case.to_dict()], "weight_bytes_per_token": Path(spec.source).stat().st_size}
    model = load_engine_model(spec)
    compiled = spec.decoder == "compiled"
    if spec.kind == "teacher":
        cases = teacher_cases(model, ids, spec.batches, steps, spec.weights, compiled, spec.backend, segment)
        weight_bytes = weight_bytes_per_token(model)
    else:
        make_stepper = reference_stepper if spec.decoder == "step" else stepper_for(Decoder(compiled, spec.backend))
        batches = (1,) if spec.decoder == "step" else spec.batches  # the reference: batch 1 only
        cases = converted_cases(model, spec.name, make_stepper, batches, ids, steps, segment)
        weight_bytes = weight_bytes_per_token(model.base)
    return {"cases": [case.to_dict() for case in cases], "weight_bytes_per_token": weight_bytes}


def load_engine_model(engine: Engine) -> nn.Module:
    """The engine's model with its weights (the teacher, the converted model or its baseline),
    with nothing else left in memory."""
    from t2r.hub import load_baseline, load_converted, load_model
    from t2r.modeling.fused import fuse_projections
    from t2r.modeling.quantize import with_weights

    if engine.kind == "teacher":
        model, _ = load_model(engine.source)
    else:
        model, _ = load_converted(Path(engine.source))
        if engine.global_cache is not None:
            model.with_global_cache(engine.global_cache)
        if engine.kind == "baseline":
            model = load_baseline(model)
        model = fuse_projections(model)  # q/k/v and gate/up stacked, as `t2r generate` decodes
    variant = with_weights(model, engine.weights)  # a copy unless fp32: the original goes
    del model
    release_memory()
    return variant


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
    name: str,
    make_stepper: Stepper,
    batches: tuple[int, ...],
    prompt: torch.Tensor,
    steps: int,
    segment: int,
) -> list[Case]:
    """One round of a converted (or baseline) engine at one context: prefill prompt [T] at batch 1
    (timed, after an untimed prefill of its first segment), then decode each batch size from
    copies of the prefilled state."""
    prompt = prompt.to(model.device)
    prefill_converted(model, prompt[:segment], segment)
    with peak_rss() as peak:
        (logits, state), seconds = timed(lambda: prefill_converted(model, prompt, segment))
        prefill_peak = peak()
    cases = []
    for batch in batches:
        with peak_rss() as peak:
            rows = torch.zeros(batch, dtype=torch.long, device=prompt.device)
            step = make_stepper(model, state.select(rows), logits.argmax(-1).repeat(batch))
            rate = decode_rate(step, batch, steps)
            del step
            case_peak = max(peak(), prefill_peak)
        prefill_rate = len(prompt) / seconds if batch == 1 else None
        cases.append(Case(name, len(prompt), batch, prefill_rate, rate, case_peak, state.nbytes()))
    return cases


def llama_cpp_case(
    gguf: str, prompt: list[int], steps: int, threads: int, warmup_tokens: int = 512
) -> tuple[float, float, int]:
    """llama.cpp (llama-cpp-python) on the GGUF: prefill tok/s (after an untimed prefill of the
    first `warmup_tokens`, then a reset), decode tok/s, peak RSS; batch 1."""
    from llama_cpp import Llama

    with peak_rss() as peak:
        llm = Llama(model_path=gguf, n_ctx=len(prompt) + 64, n_threads=threads, n_batch=512, verbose=False)
        llm.eval(prompt[:warmup_tokens])
        llm.reset()  # the next eval starts at position 0 (it drops the cache from there on)
        _, seconds = timed(lambda: llm.eval(prompt))
        prefill = len(prompt) / seconds

        def last_argmax() -> int:
            # Without logits_all, llama-cpp-python keeps no scores: read the context's last logits.
            import numpy as np

            return int(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).argmax())

        token = [last_argmax()]

        def step() -> None:
            llm.eval(token)
            token[0] = last_argmax()

        rate = decode_rate(step, 1, steps)
        llm.close()
    return prefill, rate, peak()


def llama_cpp_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None
