"""Llama family: Llama, SmolLM2, Mistral, Qwen2 (RoPE on q and k before phi, GQA)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from t2r.modeling.adapters.base import Adapter, Attend, HeadShape


class LlamaAdapter(Adapter):
    name = "llama"
    model_types = ("llama", "mistral", "qwen2")
    lora_targets = ("projections.q_proj", "projections.k_proj", "projections.v_proj", "projections.o_proj")

    def head_shape(self, config: Any) -> HeadShape:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = config.num_key_value_heads or config.num_attention_heads
        return HeadShape(config.num_attention_heads, kv_heads, head_dim)

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.model.layers

    def attention_name(self) -> str:
        return "self_attn"

    def embed(self, model: nn.Module, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return model.model.embed_tokens(input_ids)

    def rotary(self, model: nn.Module, hidden: torch.Tensor, positions: torch.Tensor) -> Any:
        return model.model.rotary_emb(hidden, positions)  # (cos, sin), each [B, T, D]

    def project_heads(self, attention: nn.Module, hidden: torch.Tensor):
        shape = (*hidden.shape[:-1], -1, attention.head_dim)
        q = attention.q_proj(hidden).view(shape).transpose(1, 2)
        k = attention.k_proj(hidden).view(shape).transpose(1, 2)
        v = attention.v_proj(hidden).view(shape).transpose(1, 2)
        return q, k, v

    def apply_rotary(self, q: torch.Tensor, k: torch.Tensor, rotary: Any):
        cos, sin = rotary
        return apply_rotary_pos_emb(q, k, cos, sin)

    def output(self, attention: nn.Module, heads_out: torch.Tensor) -> torch.Tensor:
        return attention.o_proj(heads_out)

    def block(self, layer: nn.Module, hidden: torch.Tensor, attend: Attend) -> torch.Tensor:
        hidden = hidden + attend(layer.input_layernorm(hidden))
        return hidden + layer.mlp(layer.post_attention_layernorm(hidden))

    def head(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return model.lm_head(model.model.norm(hidden))
