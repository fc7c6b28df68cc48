"""Swap a teacher's softmax attention for linear attention; save and load converted models.

A converted model is a folder:
    model.safetensors   every weight (the teacher's untouched ones and the feature maps)
    config.json         {"t2r": T2RConfig, "base_config": the teacher's transformers config}
    tokenizer files     the teacher's tokenizer
It is written to a hidden sibling folder and renamed into place at the end, so an interrupted save
never leaves a folder that loads.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torch.nn as nn

from t2r import hub
from t2r.adapters import adapter_for
from t2r.attention import LinearAttention, SoftmaxAttention
from t2r.config import T2RConfig
from t2r.errors import T2RError, UsageError
from t2r.feature_maps import build_feature_map
from t2r.model import T2RForCausalLM

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT_VERSION = 1


def convert(teacher: nn.Module, config: T2RConfig) -> T2RForCausalLM:
    """Replace every attention layer of `teacher` (in place) and wrap it as a T2RForCausalLM.

    Only attention changes: each new layer keeps the teacher's projection modules, so every
    non-attention weight is the teacher's own tensor, bit for bit.
    """
    adapter = adapter_for(teacher.config.model_type)
    shape = adapter.head_shape(teacher.config)
    generator = torch.Generator().manual_seed(config.seed)
    parameter = next(teacher.parameters())

    def new_map() -> nn.Module:
        feature_map = build_feature_map(
            config.feature_map, shape.query_heads, shape.head_dim, config.feature_dim, generator
        )
        return feature_map.to(device=parameter.device, dtype=parameter.dtype)

    layers = adapter.layers(teacher)
    beyond = [index for index in config.softmax_layers if index >= len(layers)]
    if beyond:
        raise UsageError(f"--softmax-layers {beyond[0]}: the model has {len(layers)} layers (0..{len(layers) - 1})")
    for index, layer in enumerate(layers):
        source = adapter.attention(layer)
        if index in config.softmax_layers:
            adapter.set_attention(layer, SoftmaxAttention(source, adapter, shape))
            continue
        feature_map_q = new_map()
        feature_map_k = None if config.tie_qk else new_map()
        attention = LinearAttention(
            source,
            adapter,
            shape,
            feature_map_q,
            feature_map_k,
            config.eps,
            window=config.window,
            rotary_features=config.rotary_features,
            chunk_size=config.chunk_size,
            decay=config.decay(),
            sinks=config.sinks,
        )
        adapter.set_attention(layer, attention.to(device=parameter.device))
    return T2RForCausalLM(teacher, adapter, config).eval()


def is_converted(folder: Path) -> bool:
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        return False
    return "t2r" in hub.read_json(config_path)


def check_output_folder(out: Path, overwrite: bool) -> None:
    """Fail early, before any heavy work, if `out` cannot be written."""
    if out.exists() and not overwrite:
        raise UsageError(f"{out} already exists; pass --overwrite to replace it")
    for parent in out.parents:  # missing parents are created at save time; a file in the way is not
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"{parent}: not a folder")
            break


def save_converted(model: T2RForCausalLM, tokenizer: Any, out: Path, overwrite: bool = False) -> None:
    """Write the model folder atomically (hidden partial folder, then rename)."""
    check_output_folder(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(partial, 0o777 & ~umask)  # mkdtemp makes it private; the model folder should not be
    try:
        safetensors.torch.save_model(model, str(partial / WEIGHTS_FILE), metadata={"format": "pt"})
        tokenizer.save_pretrained(str(partial))
        config = {
            "format_version": FORMAT_VERSION,
            "t2r": model.config.to_dict(),
            "base_config": model.base.config.to_dict(),
        }
        (partial / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(partial, out)
            shutil.rmtree(old)
        else:
            os.replace(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def load_converted(folder: Path) -> tuple[T2RForCausalLM, Any]:
    """Load a converted model folder: bit-identical to what was saved."""
    saved = hub.read_json(folder / CONFIG_FILE)
    if "t2r" not in saved or "base_config" not in saved:
        raise T2RError(f"{folder}: not a t2r model folder (config.json has no t2r section)")
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise T2RError(f"{folder}: {WEIGHTS_FILE} is missing")
    base = hub.empty_model(hub.build_config(saved["base_config"]))
    model = convert(base, T2RConfig.from_dict(saved["t2r"]))
    try:
        safetensors.torch.load_model(model, str(weights), strict=True)
    except Exception as error:  # safetensors raises its own error types for truncated/corrupt files
        raise T2RError(f"{weights}: corrupt or truncated weights ({hub._one_line(error)})") from None
    return model.eval(), hub.load_tokenizer(folder)


def load_model(spec: str) -> tuple[nn.Module, Any]:
    """Any model t2r can run: a converted folder, or a teacher (see `hub.resolve`)."""
    path = Path(spec).expanduser()
    if path.is_dir() and is_converted(path):
        return load_converted(path)
    return hub.load_teacher(spec)
