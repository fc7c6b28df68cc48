"""GPT-2: learned absolute positions added to the embeddings, fused `c_attn` (Conv1D)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from t2r.errors import T2RError
from t2r.modeling.adapters.base import Adapter, Attend, HeadShape


class GPT2Adapter(Adapter):
    name = "gpt2"
    model_types = ("gpt2",)
    lora_targets = ("projections.c_attn", "projections.c_proj")

    def head_shape(self, config: Any) -> HeadShape:
        heads = config.num_attention_heads
        return HeadShape(heads, heads, config.hidden_size // heads)

    def context_length(self, config: Any) -> int | None:
        return config.n_positions

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.transformer.h

    def attention_name(self) -> str:
        return "attn"

    def embed(self, model: nn.Module, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        transformer = model.transformer
        limit = transformer.wpe.num_embeddings
        if positions.numel() and int(positions.max()) >= limit:
            # Learned absolute positions stop at the table's end: the recurrent state could go on,
            # the position embedding cannot.
            raise T2RError(f"GPT-2 has learned positions for {limit} tokens only; this sequence needs more")
        return transformer.drop(transformer.wte(input_ids) + transformer.wpe(positions))

    def project_heads(self, attention: nn.Module, hidden: torch.Tensor):
        q, k, v = attention.c_attn(hidden).split(attention.split_size, dim=2)
        shape = (*hidden.shape[:-1], -1, attention.head_dim)
        return tuple(x.view(shape).transpose(1, 2) for x in (q, k, v))

    def output(self, attention: nn.Module, heads_out: torch.Tensor) -> torch.Tensor:
        return attention.resid_dropout(attention.c_proj(heads_out))

    def block(self, layer: nn.Module, hidden: torch.Tensor, attend: Attend) -> torch.Tensor:
        hidden = hidden + attend(layer.ln_1(hidden))
        return hidden + layer.mlp(layer.ln_2(hidden))

    def final_norm(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return model.transformer.ln_f(hidden)
