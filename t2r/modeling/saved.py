"""A converted model on disk: the folder's format, read strictly, written file by file atomically.

    model.safetensors   every weight (the teacher's untouched ones, feature maps, window shares)
    config.json         a transformers config of model_type "t2r" (`T2RPretrainedConfig`):
                        {"t2r": T2RConfig, "base_config": the teacher's config, "format_version",
                         "auto_map", ...}
    modeling_t2r.py     three lines that import t2r's classes, so that
                        `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` loads
                        the folder where t2r is installed but not imported
    README.md           the model card (`t2r.modeling.model_card`)
    tokenizer files     the teacher's tokenizer (written by whoever saves the folder)

Format 1 (t2r before the transformers classes) wrote {"format_version": 1, "t2r", "base_config"}
only: t2r still reads it; `t2r upgrade DIR` rewrites it as format 2 for transformers' Auto classes.
A folder is never half-loaded: every check runs before a model is returned.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torch.nn as nn

from t2r.errors import T2RError, UsageError, one_line
from t2r.modeling.config import T2RConfig
from t2r.modeling.convert import convert
from t2r.modeling.model import T2RForCausalLM
from t2r.modeling.transformers_config import FORMAT_VERSION

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
REMOTE_CODE_FILE = "modeling_t2r.py"
CARD_FILE = "README.md"
REMOTE_CODE = '''"""Loads this folder with t2r (`pip install t2r`): its classes are t2r's own, imported here so
that `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` finds them."""

from t2r.modeling.transformers_model import T2RModelForCausalLM, T2RPretrainedConfig

__all__ = ["T2RModelForCausalLM", "T2RPretrainedConfig"]
'''


def read_json(path: Path) -> dict[str, Any]:
    try:
        values = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise T2RError(f"{path}: unreadable ({one_line(error)})") from None
    if not isinstance(values, dict):
        raise T2RError(f"{path}: not a JSON object")
    return values


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


def empty_model(config: Any, initialise: bool = True) -> nn.Module:
    """An fp32 model of `config`, to be filled from a weights file: randomly initialised, or with
    `initialise=False` its parameters left as allocated (a tenth of the time for the default model:
    1.3 s -> 0.15 s) for a caller that fills every one of them (buffers are made as usual)."""
    from transformers import AutoModelForCausalLM

    if initialise:
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    from transformers.initialization import no_init_weights

    with no_init_weights():  # skips the initialisation and, with it, the tying of the embeddings
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.tie_weights()
    return model.eval()


def is_converted(folder: Path) -> bool:
    config_path = Path(folder) / CONFIG_FILE
    if not config_path.is_file():
        return False
    return "t2r" in read_json(config_path)


def read_saved_config(folder: str | Path) -> dict[str, Any]:
    """config.json of a converted folder, checked: a t2r model of a format this t2r reads."""
    folder = Path(folder)
    if not folder.is_dir():
        raise T2RError(f"{folder}: no such model folder")
    if not (folder / CONFIG_FILE).is_file():
        raise T2RError(f"{folder}: not a model folder (no {CONFIG_FILE})")
    saved = read_json(folder / CONFIG_FILE)
    if "t2r" not in saved or "base_config" not in saved:
        raise T2RError(f"{folder}: not a t2r model folder (config.json has no t2r section)")
    version = saved.get("format_version", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise T2RError(
            f"{folder}: written by a newer t2r (format {version}; this t2r reads up to {FORMAT_VERSION}); "
            "upgrade t2r (pip install -U t2r)"
        )
    if not isinstance(saved["t2r"], dict) or not isinstance(saved["base_config"], dict):
        raise T2RError(f"{folder}: config.json is corrupt (t2r or base_config is not an object)")
    return saved


def load_converted_model(folder: str | Path) -> T2RForCausalLM:
    """The converted model of a folder (either format), bit-identical to what was saved, eval mode."""
    folder = Path(folder)
    saved = read_saved_config(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise T2RError(f"{folder}: {WEIGHTS_FILE} is missing")
    try:
        t2r_config = T2RConfig.from_dict(saved["t2r"])
    except TypeError as error:
        raise T2RError(f"{folder}: config.json is corrupt ({one_line(error)})") from None
    # Every parameter comes from the file (strict): initialising them first would be time thrown away.
    model = convert(empty_model(build_config(saved["base_config"]), initialise=False), t2r_config)
    try:
        safetensors.torch.load_model(model, str(weights), strict=True)
    except Exception as error:  # safetensors raises its own error types for truncated/corrupt files
        raise T2RError(f"{weights}: corrupt or truncated weights ({one_line(error)})") from None
    return model.eval()


def write_atomically(path: Path, write: Any, private: bool = False) -> None:
    """Call write(temporary path) and rename the result onto `path`: complete or absent.
    private: the file stays readable by its owner only (0600, as mkstemp makes it); else the
    mode a new file gets under the process umask."""
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.partial-", dir=path.parent)
    os.close(handle)
    try:
        write(Path(temporary))
        if not private:  # mkstemp makes it private; a model file should not be
            os.chmod(temporary, 0o666 & ~current_umask())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def current_umask() -> int:
    """The process umask, read without changing it where the kernel says it (Linux); elsewhere set
    and restored at once (a moment in which another thread's new file would get mode 0666)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0)
    os.umask(umask)
    return umask


def write_model_files(model: T2RForCausalLM, folder: Path, config: dict[str, Any], card: str) -> None:
    """Write weights, remote-code shim, model card, then config.json (last: it makes the folder a
    model) into `folder`, each file atomically; other files in the folder are left alone."""
    folder.mkdir(parents=True, exist_ok=True)
    write_atomically(
        folder / WEIGHTS_FILE,
        lambda path: safetensors.torch.save_model(model, str(path), metadata={"format": "pt"}),
    )
    write_atomically(folder / REMOTE_CODE_FILE, lambda path: path.write_text(REMOTE_CODE))
    write_atomically(folder / CARD_FILE, lambda path: path.write_text(card))
    write_atomically(folder / CONFIG_FILE, lambda path: path.write_text(json.dumps(config, indent=2, sort_keys=True)))
