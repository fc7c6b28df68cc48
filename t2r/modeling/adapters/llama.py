"""The Llama-shaped decoders: one adapter for every family whose attention is q/k/v/o projections
with rotary positions passed in and whose block is a norm-attention-norm-MLP residual pair.

What differs between them is small and read off the teacher's own modules and config, never guessed:
- Qwen3: RMS norms on each head of q and k (`q_norm`/`k_norm` over head_dim) before positions;
- OLMo 2: RMS norms on the whole q and k projections (over H * D), and norms *after* attention and
  MLP (`post_feedforward_layernorm`, no input norm);
- SmolLM3: layers without positions (`use_rope` False on their attention: NoPE);
- Granite: multipliers on the embeddings, the residual branches and the logits, and its own
  attention scale (`attention.scaling`, which the softmax parts read);
- Phi-3: q, k and v fused in one `qkv_proj` (q first, then k, then v), rotary on part of each head;
- Gemma: embeddings scaled by sqrt(hidden) inside the embedding module itself, (1 + w) norms;
- StableLM: LayerNorms, per-head LayerNorms on q and k (`q_layernorm`, optional), partial rotary,
  and an optional parallel residual (attention and MLP both read the block's one input norm);
- Gemma 2: a norm before and after each branch, `query_pre_attn_scalar` as the attention scale,
  attention soft-capping (`softcap`: every softmax score, the window's included) and final-logit
  soft-capping, local layers on alternate blocks;
- Gemma 3: per-head q/k norms, Gemma 2's sandwich norms and scale (no attention soft-capping), and
  local (sliding-window) layers whose rotary turns at its own rate.
Kept as softmax, a teacher's sliding-window layer keeps its window (`sliding_window`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from t2r.modeling.adapters.base import Adapter, Attend, HeadShape
from t2r.modeling.fused import FusedGatedMLP, stacked


class LlamaAdapter(Adapter):
    name = "llama"
    model_types = (
        "llama", "mistral", "qwen2", "qwen3", "smollm3", "granite", "olmo2", "phi3", "gemma", "gemma2", "gemma3_text",
        "stablelm",
    )  # fmt: skip
    lora_targets = (
        "projections.q_proj", "projections.k_proj", "projections.v_proj", "projections.qkv_proj",
        "projections.o_proj",
    )  # fmt: skip

    def head_shape(self, config: Any) -> HeadShape:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = config.num_key_value_heads or config.num_attention_heads
        return HeadShape(config.num_attention_heads, kv_heads, head_dim)

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.model.layers

    def attention_name(self) -> str:
        return "self_attn"

    def embed(self, model: nn.Module, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = model.model.embed_tokens(input_ids)
        multiplier = getattr(model.config, "embedding_multiplier", None)  # Granite
        return hidden * multiplier if multiplier is not None else hidden

    def rotary(self, model: nn.Module, hidden: torch.Tensor, positions: torch.Tensor) -> Any:
        rotary_emb = model.model.rotary_emb
        if hasattr(rotary_emb, "layer_types"):  # Gemma 3: local and global layers turn at their own rates
            return {kind: rotary_emb(hidden, positions, kind) for kind in rotary_emb.layer_types}
        return rotary_emb(hidden, positions)  # (cos, sin), each [B, T, D]

    def project_heads(self, attention: nn.Module, hidden: torch.Tensor):
        shape = (*hidden.shape[:-1], -1, attention.head_dim)
        if hasattr(attention, "qkv_proj"):  # Phi-3, or stacked for decoding: [q | k | v] in one projection
            sizes = getattr(attention, "qkv_sizes", None)
            if sizes is None:  # Phi-3's own
                q_size = attention.config.num_attention_heads * attention.head_dim
                kv_size = attention.num_key_value_heads * attention.head_dim
                sizes = [q_size, kv_size, kv_size]
            q, k, v = attention.qkv_proj(hidden).split(sizes, dim=-1)
        else:
            q, k, v = attention.q_proj(hidden), attention.k_proj(hidden), attention.v_proj(hidden)
        q_norm, k_norm = getattr(attention, "q_norm", None), getattr(attention, "k_norm", None)
        if q_norm is not None and q_norm.weight.shape[0] != attention.head_dim:  # OLMo 2: over all heads
            q, k = q_norm(q), k_norm(k)
        q, k, v = q.view(shape), k.view(shape), v.view(shape)
        if q_norm is not None and q_norm.weight.shape[0] == attention.head_dim:  # Qwen3: per head
            q, k = q_norm(q), k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if getattr(attention, "qk_layernorm", False):  # StableLM: a LayerNorm per head, over [B, H, T, D]
            q, k = attention.q_layernorm(q), attention.k_layernorm(k)
        return q, k, v

    def apply_rotary(self, q: torch.Tensor, k: torch.Tensor, rotary: Any, attention: nn.Module | None = None):
        if attention is not None and not getattr(attention, "use_rope", True):  # SmolLM3's NoPE layers
            return q, k
        if isinstance(rotary, dict):  # per layer type (Gemma 3)
            assert attention is not None
            rotary = rotary[attention.layer_type]
        cos, sin = rotary
        rotary_dim = cos.shape[-1]
        if rotary_dim == q.shape[-1]:
            return apply_rotary_pos_emb(q, k, cos, sin)
        # partial rotary (Phi-3's partial_rotary_factor): the first rotary_dim of each head turn
        q_turned, k_turned = apply_rotary_pos_emb(q[..., :rotary_dim], k[..., :rotary_dim], cos, sin)
        return torch.cat([q_turned, q[..., rotary_dim:]], -1), torch.cat([k_turned, k[..., rotary_dim:]], -1)

    def softcap(self, attention: nn.Module) -> float | None:
        return getattr(attention.config, "attn_logit_softcapping", None)  # Gemma 2 (Gemma 3: None)

    def sliding_window(self, attention: nn.Module) -> int | None:
        if hasattr(attention, "sliding_window"):  # set per layer (Qwen2/3, Gemma 3: None on global layers)
            return attention.sliding_window
        return getattr(attention.config, "sliding_window", None) if attention.config.model_type == "mistral" else None

    def fuse_projections(self, layer: nn.Module, attention: nn.Module) -> None:
        if all(isinstance(getattr(attention, name, None), nn.Linear) for name in ("q_proj", "k_proj", "v_proj")):
            separate = (attention.q_proj, attention.k_proj, attention.v_proj)
            attention.qkv_proj = stacked(separate)
            attention.qkv_sizes = [linear.out_features for linear in separate]
            del attention.q_proj, attention.k_proj, attention.v_proj
        mlp = layer.mlp
        if all(isinstance(getattr(mlp, name, None), nn.Linear) for name in ("gate_proj", "up_proj", "down_proj")):
            layer.mlp = FusedGatedMLP(mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn)

    def output(self, attention: nn.Module, heads_out: torch.Tensor) -> torch.Tensor:
        return attention.o_proj(heads_out)

    def block(self, layer: nn.Module, hidden: torch.Tensor, attend: Attend) -> torch.Tensor:
        if hasattr(layer, "pre_feedforward_layernorm"):  # Gemma 2/3: a norm before and after each branch
            hidden = hidden + layer.post_attention_layernorm(attend(layer.input_layernorm(hidden)))
            return hidden + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(hidden)))
        if hasattr(layer, "post_feedforward_layernorm"):  # OLMo 2: norms after each branch
            hidden = hidden + layer.post_attention_layernorm(attend(hidden))
            return hidden + layer.post_feedforward_layernorm(layer.mlp(hidden))
        if getattr(layer, "use_parallel_residual", False):  # StableLM: both branches read one norm
            normed = layer.input_layernorm(hidden)
            return hidden + attend(normed) + layer.dropout(layer.mlp(normed))
        scale = getattr(layer, "residual_multiplier", None)  # Granite

        def scaled(x: torch.Tensor) -> torch.Tensor:
            return x * scale if scale is not None else x

        hidden = hidden + scaled(attend(layer.input_layernorm(hidden)))
        return hidden + scaled(layer.mlp(layer.post_attention_layernorm(hidden)))

    def final_norm(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return model.model.norm(hidden)

    def logits(self, model: nn.Module, normed: torch.Tensor) -> torch.Tensor:
        logits = model.lm_head(normed)
        scaling = getattr(model.config, "logits_scaling", None)  # Granite
        logits = logits / scaling if scaling is not None else logits
        cap = getattr(model.config, "final_logit_softcapping", None)  # Gemma 2 (Gemma 3 when set)
        return torch.tanh(logits / cap) * cap if cap is not None else logits
