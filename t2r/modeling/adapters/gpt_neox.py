"""GPT-NeoX (Pythia): fused per-head `query_key_value`, partial rotary, parallel residual."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb

from t2r.modeling.adapters.base import Adapter, Attend, HeadShape


class GPTNeoXAdapter(Adapter):
    name = "gpt_neox"
    model_types = ("gpt_neox",)
    lora_targets = ("projections.query_key_value", "projections.dense")

    def head_shape(self, config: Any) -> HeadShape:
        heads = config.num_attention_heads
        return HeadShape(heads, heads, config.hidden_size // heads)

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.gpt_neox.layers

    def attention_name(self) -> str:
        return "attention"

    def embed(self, model: nn.Module, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return model.gpt_neox.emb_dropout(model.gpt_neox.embed_in(input_ids))

    def rotary(self, model: nn.Module, hidden: torch.Tensor, positions: torch.Tensor) -> Any:
        # cos/sin cover only the rotary part of each head (rotary_pct); the rest passes through.
        return model.gpt_neox.rotary_emb(hidden, positions)

    def project_heads(self, attention: nn.Module, hidden: torch.Tensor):
        # The fused projection is laid out per head: [.., H, 3 * D] -> q, k, v.
        qkv = attention.query_key_value(hidden)
        qkv = qkv.view(*hidden.shape[:-1], -1, 3 * attention.head_size).transpose(1, 2)
        return qkv.chunk(3, dim=-1)

    def apply_rotary(self, q: torch.Tensor, k: torch.Tensor, rotary: Any, attention: nn.Module | None = None):
        cos, sin = rotary
        return apply_rotary_pos_emb(q, k, cos, sin)

    def output(self, attention: nn.Module, heads_out: torch.Tensor) -> torch.Tensor:
        return attention.dense(heads_out)

    def block(self, layer: nn.Module, hidden: torch.Tensor, attend: Attend) -> torch.Tensor:
        attn_out = layer.post_attention_dropout(attend(layer.input_layernorm(hidden)))
        if layer.use_parallel_residual:
            mlp_out = layer.post_mlp_dropout(layer.mlp(layer.post_attention_layernorm(hidden)))
            return hidden + attn_out + mlp_out
        hidden = hidden + attn_out
        return hidden + layer.post_mlp_dropout(layer.mlp(layer.post_attention_layernorm(hidden)))

    def final_norm(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return model.gpt_neox.final_layer_norm(hidden)
