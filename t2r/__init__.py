"""t2r: turn a pretrained transformer language model into a linear-attention RNN.

`import t2r` makes model_type "t2r" known to transformers' AutoConfig and AutoModelForCausalLM,
after which a converted folder loads as any transformers model:

    import t2r
    model = AutoModelForCausalLM.from_pretrained("runs/my-model")

It imports neither torch nor transformers: the registration happens when transformers' own auto
modules load (t2r.modeling.auto_registration), and the model class at its first use.

The other public names load on first use (as transformers' own top-level names do); each lives in
the module named beside it:

    from t2r import load_teacher, convert, T2RConfig, save_converted, load_model, generate, Sampling
"""

from __future__ import annotations

import importlib
from importlib import metadata
from typing import Any

from t2r.modeling import auto_registration

try:
    __version__ = metadata.version("t2r")
except metadata.PackageNotFoundError:  # the source tree on sys.path, not installed
    __version__ = "0+unknown"

auto_registration.install()  # the one thing `import t2r` does: registration when transformers loads

_PUBLIC = {
    "T2RModelForCausalLM": "t2r.modeling.transformers_model",
    "T2RPretrainedConfig": "t2r.modeling.transformers_config",
    "T2RCache": "t2r.modeling.recurrent_cache",
    "T2RConfig": "t2r.modeling.config",
    "T2RForCausalLM": "t2r.modeling.model",
    "convert": "t2r.modeling.convert",
    "with_weights": "t2r.modeling.quantize",
    "FastState": "t2r.modeling.fast_decode",
    "fast_step": "t2r.modeling.fast_decode",
    "Decoder": "t2r.modeling.fast_decode",
    "flush_denormals": "t2r.ops.denormals",
    "ModelState": "t2r.ops.state",
    "load_teacher": "t2r.hub",
    "load_model": "t2r.hub",
    "load_converted": "t2r.hub",
    "save_converted": "t2r.hub",
    "load_baseline": "t2r.hub",
    "ready_model_folder": "t2r.hub",
    "sliding_window_baseline": "t2r.modeling.baseline",
    "Sampling": "t2r.inference.sampling",
    "generate": "t2r.inference.generate",
    "generate_batch": "t2r.inference.generate",
    "evaluate": "t2r.evaluation.perplexity",
    "T2RError": "t2r.errors",
    "UsageError": "t2r.errors",
}
__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 't2r' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
