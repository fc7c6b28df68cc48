"""OPT: learned absolute positions (offset by 2 in their table), q scaled before its product with k,
layer norms before (125m, 1.3b, ...) or after (350m) each branch, and an optional projection in and
out of a narrower embedding (350m's `word_embed_proj_dim`)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from t2r.errors import T2RError
from t2r.modeling.adapters.base import Adapter, Attend, HeadShape


class OPTAdapter(Adapter):
    name = "opt"
    model_types = ("opt",)
    lora_targets = ("projections.q_proj", "projections.k_proj", "projections.v_proj", "projections.out_proj")

    def head_shape(self, config: Any) -> HeadShape:
        heads = config.num_attention_heads
        return HeadShape(heads, heads, config.hidden_size // heads)

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.model.decoder.layers

    def attention_name(self) -> str:
        return "self_attn"

    def embed(self, model: nn.Module, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        decoder = model.model.decoder
        limit = model.config.max_position_embeddings
        if positions.numel() and int(positions.max()) >= limit:
            # Like GPT-2: the recurrent state could go on, the learned position table cannot.
            raise T2RError(f"OPT has learned positions for {limit} tokens only; this sequence needs more")
        hidden = decoder.embed_tokens(input_ids)
        if decoder.project_in is not None:
            hidden = decoder.project_in(hidden)
        hidden = hidden + decoder.embed_positions(None, position_ids=positions)
        return F.dropout(hidden, p=decoder.dropout, training=decoder.training)

    def project_heads(self, attention: nn.Module, hidden: torch.Tensor):
        # The teacher scales q before the product (and the product by 1): the same order here.
        q = attention.q_proj(hidden) * attention.scaling
        k, v = attention.k_proj(hidden), attention.v_proj(hidden)
        shape = (*hidden.shape[:-1], -1, attention.head_dim)
        return tuple(x.view(shape).transpose(1, 2) for x in (q, k, v))

    def softmax_scale(self, attention: nn.Module) -> float:
        return 1.0  # q is scaled already

    def output(self, attention: nn.Module, heads_out: torch.Tensor) -> torch.Tensor:
        return attention.out_proj(heads_out)

    def block(self, layer: nn.Module, hidden: torch.Tensor, attend: Attend) -> torch.Tensor:
        def dropped(x: torch.Tensor) -> torch.Tensor:
            return F.dropout(x, p=layer.dropout, training=layer.training)

        before = layer.do_layer_norm_before
        hidden = hidden + dropped(attend(layer.self_attn_layer_norm(hidden) if before else hidden))
        if not before:  # 350m: norms after each branch
            hidden = layer.self_attn_layer_norm(hidden)
        mlp_in = layer.final_layer_norm(hidden) if before else hidden
        hidden = hidden + dropped(layer.fc2(layer.activation_fn(layer.fc1(mlp_in))))
        return hidden if before else layer.final_layer_norm(hidden)

    def final_norm(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        decoder = model.model.decoder
        if decoder.final_layer_norm is not None:
            hidden = decoder.final_layer_norm(hidden)
        return decoder.project_out(hidden) if decoder.project_out is not None else hidden
