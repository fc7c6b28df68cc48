"""The training-free baseline every converted model is compared with: the teacher's own softmax
attention over S sinks and the last W tokens (StreamingLLM, Xiao et al. 2023), decoded from a ring KV
cache of fixed size, at the same state bytes per sequence as the converted model.

It is a conversion with `feature_map="none"`: the hybrid attention of `t2r.ops.windowed` with no
linear part, so it runs every form, the fast decode step, the weight formats and the bench as any
converted model does, and needs no training. `equal_memory_window` says how many window slots the
bytes of a converted model's state buy.
"""

from __future__ import annotations

import torch.nn as nn

from t2r.errors import UsageError
from t2r.modeling.config import DEFAULT_SINKS, T2RConfig
from t2r.modeling.convert import convert
from t2r.modeling.model import T2RForCausalLM


def window_only_config(window: int, sinks: int = DEFAULT_SINKS, base_model: str | None = None) -> T2RConfig:
    """The baseline's settings: softmax over `sinks` + the last `window` tokens, nothing else."""
    return T2RConfig(feature_map="none", window=window, sinks=sinks, half_life=0, base_model=base_model)


def state_bytes(model: T2RForCausalLM) -> int:
    """Bytes of one sequence's state; refuses a state that grows (layers kept as softmax)."""
    state = model.init_state(1)
    if state.bytes_per_token():
        raise UsageError(
            "this model keeps softmax layers (a KV cache that grows): no window has its memory at every length"
        )
    return state.nbytes()


def window_state_bytes(layers: int, kv_heads: int, head_dim: int, window: int, sinks: int) -> int:
    """Bytes of the baseline's state for one sequence with `window` slots: the fp32 key and value
    of every kv head in every layer for each sink and window slot, a validity flag per slot, and the
    int64 token count (what `init_state(1).nbytes()` of the baseline counts)."""
    per_slot = 2 * kv_heads * head_dim * 4 + 1
    return layers * (window + sinks) * per_slot + 8


def equal_memory_window(model: T2RForCausalLM, sinks: int = DEFAULT_SINKS) -> int:
    """The largest window W whose baseline state (S sinks + W slots) fits in `model`'s state bytes."""
    budget = state_bytes(model)
    shape = model.attentions[0].shape
    size = (len(model.attentions), shape.kv_heads, shape.head_dim)
    per_window_slot = window_state_bytes(*size, 1, 0) - window_state_bytes(*size, 0, 0)
    window = (budget - window_state_bytes(*size, 0, sinks)) // per_window_slot
    if window < 1:
        raise UsageError(f"a {budget:,}-byte state holds no window beside {sinks} sinks")
    return int(window)


def sliding_window_baseline(
    teacher: nn.Module, window: int, sinks: int = DEFAULT_SINKS, base_model: str | None = None
) -> T2RForCausalLM:
    """The teacher (converted in place) attending to its first `sinks` and last `window` tokens;
    base_model names the teacher (kept in the config, as `t2r convert` keeps it)."""
    return convert(teacher, window_only_config(window, sinks, base_model))
