"""The explicit registry of supported architectures, keyed by Hugging Face `model_type`."""

from __future__ import annotations

from t2r.errors import UsageError
from t2r.modeling.adapters.base import Adapter, HeadShape
from t2r.modeling.adapters.gpt2 import GPT2Adapter
from t2r.modeling.adapters.gpt_neox import GPTNeoXAdapter
from t2r.modeling.adapters.llama import LlamaAdapter
from t2r.modeling.adapters.opt import OPTAdapter

__all__ = ["ADAPTERS", "Adapter", "HeadShape", "adapter_for", "supported_model_types"]

ADAPTERS: dict[str, Adapter] = {}
for _adapter in (LlamaAdapter(), GPT2Adapter(), GPTNeoXAdapter(), OPTAdapter()):
    for _model_type in _adapter.model_types:
        ADAPTERS[_model_type] = _adapter


def supported_model_types() -> list[str]:
    return sorted(ADAPTERS)


def adapter_for(model_type: str) -> Adapter:
    """The adapter of a Hugging Face `model_type`; an unsupported one is a usage error."""
    try:
        return ADAPTERS[model_type]
    except KeyError:
        raise UsageError(
            f"architecture {model_type!r} is not supported; supported: {', '.join(supported_model_types())}"
        ) from None
