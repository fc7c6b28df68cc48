"""Compiled decode steps kept on disk, so that a second process does not compile again.

`torch.compile` compiles lazily in every new process: Dynamo traces the step again (seconds to
minutes for a 30-layer model), even when inductor's own cache has the kernels. PyTorch's
ahead-of-time path (`torch.compile(fn, fullgraph=True).aot_compile(example)`, then
`save_compiled_function` / `torch.compiler.load_compiled_function`) keeps the whole result —
the traced bytecode, its guards and the generated code — in one file that loads in seconds.

The file holds code, not weights: the model is an argument of the step, so one artifact serves
every model of the same shapes, dtypes and module types (tested with other weights). It is keyed
by everything the compiled code was specialised on (the torch version, t2r's modeling and ops
sources, every parameter's name, shape and dtype, the module types, the inputs' shapes) and its
guards are checked again on every call: a call they reject runs the lazily compiled step instead.

    step = load_or_compile(fast_step, (model, ids, state), folder, backend="inductor")
    if step is not None and step.guard_check(model, ids, state): logits = step(model, ids, state)
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import platform
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

# The sources a compiled step is made of: a change to any of them makes a new artifact.
SOURCE_ROOTS = ("modeling", "ops")


def source_digest() -> str:
    """A hex digest of t2r's modeling and ops sources (the .py files and the int4 kernel's C++)."""
    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for root in SOURCE_ROOTS:
        for path in sorted([*(package / root).rglob("*.py"), *(package / root).rglob("*.cpp")]):
            digest.update(path.relative_to(package).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()


def artifact_key(function: Callable, args: tuple, backend: str, dynamic_batch: bool = False) -> str:
    """A hex digest of everything the compiled `function(*args)` is specialised on (with
    dynamic_batch, not the batch size: the first dimension of every input of that size)."""
    digest = hashlib.sha256(source_digest().encode())
    description = {
        "function": f"{function.__module__}.{function.__qualname__}",
        "backend": backend,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),  # inductor's CPU kernels are generated for a thread count
        "args": [describe(arg) for arg in args],
    }
    if dynamic_batch:
        description["dynamic_batch"] = True
        description["args"] = json.loads(
            json.dumps(description["args"], default=str).replace(f'["tensor", [{batch_size(args)},', '["tensor", ["B",')
        )
    digest.update(json.dumps(description, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:32]


def describe(value: Any) -> Any:
    """What compiled code specialises on: shapes, dtypes, devices, module types, plain values."""
    if isinstance(value, torch.Tensor):
        return ["tensor", list(value.shape), str(value.dtype), str(value.device)]
    if isinstance(value, torch.nn.Module):
        # extra_repr: settings a module's forward branches on (an int4 layer's dense_from)
        modules = [[name, type(module).__qualname__, module.extra_repr()] for name, module in value.named_modules()]
        tensors = [[name, describe(t)] for name, t in (*value.named_parameters(), *value.named_buffers())]
        config = getattr(value, "config", None)
        return {"modules": modules, "tensors": tensors, "config": config.to_dict() if config is not None else None}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: describe(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return [type(value).__qualname__, fields]
    if isinstance(value, list | tuple):
        return [describe(item) for item in value]
    return repr(value)


def batch_size(args: tuple) -> int:
    """The batch size of a step's arguments: the first dimension of its input ids (args[1])."""
    return int(args[1].shape[0])


def mark_batch_dynamic(value: Any, size: int) -> None:
    """Mark the first dimension of every tensor in `value` whose first dimension is `size` dynamic."""
    if isinstance(value, torch.Tensor):
        if value.dim() and value.shape[0] == size:
            torch._dynamo.mark_dynamic(value, 0)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for field in dataclasses.fields(value):
            mark_batch_dynamic(getattr(value, field.name), size)
    elif isinstance(value, list | tuple):
        for item in value:
            mark_batch_dynamic(item, size)


def load_or_compile(
    function: Callable, args: tuple, folder: Path, backend: str = "inductor", dynamic_batch: bool = False
) -> Any | None:
    """The ahead-of-time compiled `function` for `args`: loaded from `folder`, else compiled there.

    Returns an `AOTCompiledFunction` (callable like `function`, with `guard_check(*args)`), or None
    when PyTorch cannot compile or load it ahead of time (the caller then compiles lazily).
    dynamic_batch: one step for every batch size of 2 or more (the batch dimension symbolic; dynamo
    specialises a size of 1, which takes a step of its own): args' batch must then be 2 or more.
    """
    path = folder / f"{artifact_key(function, args, backend, dynamic_batch)}.pt"
    what = "batches of 2 or more" if dynamic_batch else f"batch {batch_size(args)}"
    if path.exists():
        try:
            with path.open("rb") as file, vector_isas_as_probed(path.with_suffix(".json")):
                loaded = torch.compiler.load_compiled_function(file)
            log.info("decode step for %s loaded from %s", what, path)
            return loaded
        except Exception as error:  # a stale or partial file: compile again below
            log.warning("compiled step %s did not load (%s); compiling again", path, error)
    log.warning("compiling the decode step for %s (minutes, once: kept in %s)", what, folder)
    try:
        if dynamic_batch:
            mark_batch_dynamic(args[1:], batch_size(args))
        compiled = torch.compile(function, fullgraph=True, backend=backend).aot_compile((args, {}))
    except Exception as error:  # a graph break or an unsupported operation: the lazy path
        log.warning("the step does not compile ahead of time (%s); compiling lazily", error)
        return None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        compiled.save_compiled_function(str(path))  # written atomically by PyTorch
        if backend == "inductor":
            record_vector_isas(path.with_suffix(".json"))
    except Exception as error:  # an unserialisable artifact still runs in this process
        log.warning("compiled step not saved to %s (%s)", path, error)
    return compiled


# Loading an inductor step makes inductor ask which vector instruction sets the machine can use.
# It answers by compiling and loading a small program per set the CPU's flags name, in a child
# process each (~1.4 s of a second process's ~10 s wait for its first token here). The process
# that compiled the step probed exactly that; its answer is recorded beside the step. A later
# process whose CPU flags name the same sets takes that answer (inductor's own switch,
# config.cpp.vec_isa_ok); on a machine whose flags differ, inductor probes again.


def claimed_vector_isas() -> list[str]:
    """The vector instruction sets the CPU's flags name, without probing them."""
    from torch._inductor import config
    from torch._inductor.cpu_vec_isa import valid_vec_isa_list

    with config.patch({"cpp.vec_isa_ok": True}):
        return [str(isa) for isa in valid_vec_isa_list.__wrapped__()]  # uncached: probes nothing


def record_vector_isas(path: Path) -> None:
    """Write the sets inductor's probes found in this process (its cached answer) to `path`."""
    from torch._inductor.cpu_vec_isa import valid_vec_isa_list

    probed = [str(isa) for isa in valid_vec_isa_list()]
    path.write_text(json.dumps({"vector_isas": probed}))


@contextlib.contextmanager
def vector_isas_as_probed(path: Path) -> Iterator[None]:
    """Inside: inductor takes the CPU's flags at their word if they name what `path` records."""
    try:
        recorded = json.loads(path.read_text())["vector_isas"]
        from torch._inductor import config
        from torch._inductor.cpu_vec_isa import valid_vec_isa_list

        same = valid_vec_isa_list.cache_info().currsize == 0 and claimed_vector_isas() == recorded
    except (OSError, ValueError, KeyError, TypeError, ImportError, AttributeError):
        same = False  # no record, or an inductor without these internals: it probes as usual
    if not same:
        yield
        return
    with config.patch({"cpp.vec_isa_ok": True}):
        valid_vec_isa_list()  # cached for the process: the recorded answer
        yield
