"""Swap a teacher's softmax attention for linear attention, in memory (saving and loading a
converted model is `t2r.hub`'s)."""

from __future__ import annotations

import torch
import torch.nn as nn

from t2r.errors import UsageError
from t2r.modeling.adapters import adapter_for
from t2r.modeling.attention import LinearAttention, SoftmaxAttention
from t2r.modeling.config import T2RConfig
from t2r.modeling.feature_maps import build_feature_map
from t2r.modeling.model import T2RForCausalLM


def convert(teacher: nn.Module, config: T2RConfig) -> T2RForCausalLM:
    """Replace every attention layer of `teacher` (in place) and wrap it as a T2RForCausalLM.

    Only attention changes: each new layer keeps the teacher's projection modules, so every
    non-attention weight is the teacher's own tensor, bit for bit. With `keep_local`, a teacher's
    sliding-window layer becomes its own exact softmax over that window in a ring buffer (the
    hybrid op with no linear part and no sinks: `LinearAttention` with the "none" map).
    """
    adapter = adapter_for(teacher.config.model_type)
    shape = adapter.head_shape(teacher.config)
    generator = torch.Generator().manual_seed(config.seed)
    parameter = next(teacher.parameters())

    map_heads = shape.kv_heads if config.linear_heads == "kv" else shape.query_heads

    def new_map() -> nn.Module:
        feature_map = build_feature_map(config.feature_map, map_heads, shape.head_dim, config.feature_dim, generator)
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
        local_window = adapter.sliding_window(source) if config.keep_local else None
        if local_window is not None:
            no_map = build_feature_map("none", shape.kv_heads, shape.head_dim, None, generator)
            local = LinearAttention(source, adapter, shape, no_map, None, config.eps, window=local_window,
                                    chunk_size=config.chunk_size)  # fmt: skip
            adapter.set_attention(layer, local.to(device=parameter.device))
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
            global_cache=config.global_cache,
            global_select=config.global_select,
        )
        adapter.set_attention(layer, attention.to(device=parameter.device))
    return T2RForCausalLM(teacher, adapter, config).eval()
