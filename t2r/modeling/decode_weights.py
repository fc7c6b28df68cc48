"""A converted model made ready for decoding (stacked projections, then bf16 / int8 / int4 weights),
kept on disk so that the next process loads it instead of quantising again.

Quantising the default model to int4 takes ~2 s, a fifth of a second process's wait for its first
token with a compiled step. The result depends only on the model's weights, the format and t2r's
own code, so it is kept as one safetensors file per (weights, format, code) in the folder given
(`t2r generate` and `t2r serve` use `$T2R_CACHE_DIR/decode-weights`, beside the compiled steps):

    model = decoding_model(model, "int4", folder, source=weights_identity(path))

A later call with the same `source` builds the decoding model's modules on the meta device (shapes
only, no arithmetic) and fills them from the file: every tensor is the one the first process
computed, bit for bit (tested). A file that does not load or does not match the modules is
ignored and the model is quantised again. The folder keeps the KEPT_FILES most recently used.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
from pathlib import Path

import safetensors
import safetensors.torch
import torch
import torch.nn as nn

from t2r.modeling.fused import fuse_projections
from t2r.modeling.quantize import with_weights
from t2r.modeling.saved import write_atomically
from t2r.modeling.step_artifacts import describe, source_digest

log = logging.getLogger(__name__)

ALIASES_KEY = "t2r_aliases"  # metadata: names that share another name's tensor (tied weights)
# Kept models in the folder at most (the most recently used): ~200 MB each for the default model in
# int4, so the folder stays under a GB whatever number of models, formats and t2r versions ran.
KEPT_FILES = 4


def weights_identity(path: Path) -> str:
    """Which weights a file holds, cheaply: its resolved path, size and modification time."""
    stat = path.stat()
    return f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


def decoding_model(model: nn.Module, weight_format: str, folder: Path | None = None, source: str = "") -> nn.Module:
    """`with_weights(fuse_projections(model), weight_format)`, through the file kept in `folder`.

    `model` is consumed (its projections are stacked in place, as fuse_projections does); fp32
    stacks only. `source` names the weights (`weights_identity`): without a folder or a source
    nothing is kept."""
    if weight_format == "fp32" or folder is None or not source:
        return with_weights(fuse_projections(model), weight_format)
    path = folder / f"{cache_key(model, weight_format, source)}.safetensors"
    if path.is_file():
        loaded = load_kept(model, weight_format, path)
        if loaded is not None:
            with contextlib.suppress(OSError):
                os.utime(path)  # recently used: the last file pruning removes
            return loaded
    ready = with_weights(fuse_projections(model), weight_format)
    try:
        keep(ready, path)
        prune(folder)
    except (OSError, RuntimeError, ValueError) as error:  # a full disk, a read-only cache: still decode
        log.warning("decode weights not kept in %s (%s)", path, error)
    return ready


def prune(folder: Path) -> None:
    """Remove all but the KEPT_FILES most recently used kept models (each is hundreds of MB)."""
    kept = sorted(folder.glob("*.safetensors"), key=lambda path: path.stat().st_mtime_ns, reverse=True)
    for path in kept[KEPT_FILES:]:
        path.unlink(missing_ok=True)


def cache_key(model: nn.Module, weight_format: str, source: str) -> str:
    description = {
        "source": source,
        "format": weight_format,
        "code": source_digest(),
        "torch": torch.__version__,
        "model": describe(model),
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()[:32]


def named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by name, tied ones under each of their names."""
    return {
        **dict(model.named_parameters(remove_duplicate=False)),
        **dict(model.named_buffers(remove_duplicate=False)),
    }


def keep(model: nn.Module, path: Path) -> None:
    """Write every tensor of `model` (non-persistent buffers too) to `path`, atomically."""
    tensors, aliases, seen = {}, {}, {}
    for name, tensor in named_tensors(model).items():
        if id(tensor) in seen:
            aliases[name] = seen[id(tensor)]
        else:
            seen[id(tensor)] = name
            tensors[name] = tensor.detach().contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {ALIASES_KEY: json.dumps(aliases)}
    write_atomically(path, lambda partial: safetensors.torch.save_file(tensors, str(partial), metadata=metadata))


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` whose tensors live on the meta device (shapes, no data); `model` untouched."""
    memo: dict[int, object] = {}
    for tensor in named_tensors(model).values():
        if id(tensor) not in memo:
            empty = torch.empty_like(tensor, device="meta")
            memo[id(tensor)] = nn.Parameter(empty, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else empty
    return copy.deepcopy(model, memo)


def load_kept(model: nn.Module, weight_format: str, path: Path) -> nn.Module | None:
    """The decoding model from a kept file, or None if the file does not load or fit."""
    try:
        with safetensors.safe_open(str(path), framework="pt") as kept:
            aliases = json.loads((kept.metadata() or {}).get(ALIASES_KEY, "{}"))
        tensors = safetensors.torch.load_file(str(path))
    except Exception as error:  # a truncated or foreign file: quantise again
        log.warning("kept decode weights %s do not load (%s); quantising again", path, error)
        return None
    shell = with_weights(fuse_projections(meta_copy(model)), weight_format)  # shapes only: instant
    expected = named_tensors(shell)
    fits = set(expected) == set(tensors) | set(aliases) and all(
        expected[name].shape == tensors[name].shape and expected[name].dtype == tensors[name].dtype for name in tensors
    )
    if not fits:
        log.warning("kept decode weights %s do not fit the model; quantising again", path)
        return None
    filled: dict[int, torch.Tensor] = {}  # a tied tensor becomes one tensor again
    for name, empty in expected.items():
        if id(empty) not in filled:
            # A copy in PyTorch's own (64-byte aligned) memory: a tensor read from the file starts
            # wherever its bytes sit, and torch._weight_int8pack_mm reads its weight with aligned
            # vector loads from 4 rows of x on (a misaligned int8 head crashed the process).
            data = tensors[aliases.get(name, name)].clone()
            filled[id(empty)] = nn.Parameter(data, empty.requires_grad) if isinstance(empty, nn.Parameter) else data
        owner, _, leaf = name.rpartition(".")
        module = shell.get_submodule(owner) if owner else shell
        table = module._parameters if leaf in module._parameters else module._buffers
        table[leaf] = filled[id(empty)]
    return shell
