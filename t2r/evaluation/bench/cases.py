"""The bench's records: what an engine is (`Engine`), what one measures (`Case`), the settings, the
engine names, and the two timings every engine shares (one prefill, one block of decode steps).

An engine is one row set of the tables: a model (the teacher, the converted model, its sliding-
window baseline, llama.cpp on a GGUF), a weight format and a decoder. Its name says all three, and
each converted row has a teacher row of the same weights and decoder (`PARTNERS`), so that the
like-for-like ratios of the report compare one thing at a time.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from t2r.errors import UsageError
from t2r.modeling.config import WEIGHT_FORMATS

KINDS = ("teacher", "converted", "baseline", "llama.cpp")
# "step": the converted model's reference recurrence (`model.step`); "eager": the teacher's forward,
# or the converted model's fast step, uncompiled; "compiled": the same through torch.compile.
DECODERS = ("step", "eager", "compiled")
WARMUP_STEPS = 2  # decode steps before the timed block (the first compiles a compiled decoder)


@dataclass
class Case:
    """One engine at one context and batch size: the median over rounds of its rates, with their
    spread (min, max) and each round's figure in round order; the largest peak of the rounds.

    Records written before rounds existed have none of the optional fields (`t2r bench --replot`
    reads them as they are).
    """

    engine: str
    context: int
    batch: int
    prefill_tokens_per_s: float | None  # batch 1 only: the prompt's tokens over the prefill's time
    decode_tokens_per_s: float  # all rows counted
    peak_rss_bytes: int
    state_bytes_per_sequence: int  # recurrent state, or KV cache at this context
    decode_tokens_per_s_min: float | None = None
    decode_tokens_per_s_max: float | None = None
    prefill_tokens_per_s_min: float | None = None
    prefill_tokens_per_s_max: float | None = None
    decode_rounds: list[float] = field(default_factory=list)
    prefill_rounds: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def aggregate(rounds: list[Case]) -> Case:
    """One Case from the single-round Cases of one engine, context and batch (in round order)."""
    first = rounds[0]
    assert all((c.engine, c.context, c.batch) == (first.engine, first.context, first.batch) for c in rounds)
    decode = [c.decode_tokens_per_s for c in rounds]
    prefill = [c.prefill_tokens_per_s for c in rounds if c.prefill_tokens_per_s is not None]
    return Case(
        first.engine,
        first.context,
        first.batch,
        statistics.median(prefill) if prefill else None,
        statistics.median(decode),
        max(c.peak_rss_bytes for c in rounds),
        first.state_bytes_per_sequence,
        min(decode),
        max(decode),
        min(prefill) if prefill else None,
        max(prefill) if prefill else None,
        decode,
        prefill,
    )


@dataclass(frozen=True)
class BenchSettings:
    contexts: tuple[int, ...] = (256, 1024, 2048, 4096, 8192, 16384, 32768)
    batches: tuple[int, ...] = (1, 16)
    steps: int = 16  # decode steps per timed block
    repeats: int = 3  # rounds: each engine measured this many times, the engines in turn
    segment: int = 512  # prefill segment of the converted model; also the warm-up prefill's length
    weights: tuple[str, ...] = ("fp32", "int4", "bf16")  # weight formats of the converted and teacher rows
    compile: bool = True  # the compiled rows (converted fast step, teacher with a static cache)
    reference_step: bool = True  # also `model.step`, the reference decode (batch 1)
    # Rows of the training-free sliding-window baseline at the converted model's state bytes
    # (`t2r.hub.load_baseline`), in the same weight formats: what the recurrent state must beat.
    baseline: bool = False
    # A global cache of this many slots given to the converted model as it loads (None: its own).
    global_cache: int | None = None
    # torch.compile's backend: inductor generates the kernels (the speed); "aot_eager" captures the
    # same graph without generating code (seconds, for tests of the capture).
    backend: str = "inductor"

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> BenchSettings:
        """From `asdict` after a JSON round trip (which turns the tuples into lists)."""
        return cls(**{key: tuple(value) if isinstance(value, list) else value for key, value in fields.items()})


@dataclass(frozen=True)
class Engine:
    """What one child process loads and how it decodes (`engines.measure` runs it at one context).

    source: the teacher as `t2r` names models (kind teacher), a converted folder (converted,
    baseline) or a GGUF file (llama.cpp). longest: the longest context it takes (None: any).
    global_cache: a global cache given to the converted model as it loads (None: its own); the
    baseline's window then has the bytes of the model with it.
    """

    kind: str
    source: str
    weights: str = "fp32"
    decoder: str = "eager"
    batches: tuple[int, ...] = (1,)
    longest: int | None = None
    backend: str = "inductor"
    global_cache: int | None = None  # converted and baseline: the cache given to the converted model

    def __post_init__(self) -> None:
        if self.kind not in KINDS or self.decoder not in DECODERS or self.weights not in WEIGHT_FORMATS:
            raise UsageError(
                f"no bench engine of kind {self.kind!r}, decoder {self.decoder!r}, weights {self.weights!r}; "
                f"kinds: {', '.join(KINDS)}; decoders: {', '.join(DECODERS)}; weights: {', '.join(WEIGHT_FORMATS)}"
            )
        if self.decoder == "step" and self.kind != "converted":
            raise UsageError("only the converted model has the reference step")

    @property
    def name(self) -> str:
        return engine_name(self.kind, self.weights, self.decoder)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> Engine:
        return cls(**{key: tuple(value) if isinstance(value, list) else value for key, value in fields.items()})


def engine_name(kind: str, weights: str = "fp32", decoder: str = "eager") -> str:
    """How a row is labelled: "teacher", "teacher (compiled, int4)", "converted (fast)",
    "converted (compiled, bf16)", "converted (step)", "baseline (fast, int4)", "llama.cpp"."""
    if kind == "llama.cpp":
        return kind
    if decoder == "step":
        return f"{kind} (step)"
    suffix = "" if weights == "fp32" else weights
    if decoder == "compiled":
        suffix = "compiled" + (", " + suffix if suffix else "")
    elif kind != "teacher":  # the converted model's eager decoder is its fast step
        suffix = "fast" + (", " + suffix if suffix else "")
    return f"{kind} ({suffix})" if suffix else kind


# Each converted row's like-for-like teacher row: the same weights, the same decoder.
PARTNERS = {
    engine_name("converted", weights, decoder): engine_name("teacher", weights, decoder)
    for weights in WEIGHT_FORMATS
    for decoder in ("eager", "compiled")
}


def timed(run: Callable[[], Any]) -> tuple[Any, float]:
    """run()'s result and the seconds it took."""
    start = time.perf_counter()
    result = run()
    return result, time.perf_counter() - start


def decode_rate(step: Callable[[], Any], batch: int, steps: int, warmup: int = WARMUP_STEPS) -> float:
    """Tokens/s (all rows counted) of one block of `steps` steps, after `warmup` untimed ones."""
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - start)
