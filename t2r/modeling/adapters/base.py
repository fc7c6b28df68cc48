"""What an architecture adapter tells t2r about one Hugging Face model family.

An adapter is the only place that knows a family's attribute names (`model.model.layers`,
`transformer.h`, `c_attn`, ...). t2r runs the decoder itself, block by block, so that it can pass
each attention layer its recurrent state explicitly; the adapter supplies the pieces around the
attention (embeddings, the residual block, final norm, head), all reused unchanged from the teacher.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

Attend = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class HeadShape:
    """query_heads H, key/value heads (GQA: H is a multiple of it), head_dim D."""

    query_heads: int
    kv_heads: int
    head_dim: int


class Adapter:
    """Base class; one subclass per family, registered in `t2r.modeling.adapters`."""

    name: str = ""
    model_types: tuple[str, ...] = ()
    # Module-name suffixes (inside a converted model) of the attention projections LoRA adapts.
    lora_targets: tuple[str, ...] = ()

    def head_shape(self, config: Any) -> HeadShape:
        raise NotImplementedError

    def layers(self, model: nn.Module) -> nn.ModuleList:
        """The decoder blocks, in order."""
        raise NotImplementedError

    def attention_name(self) -> str:
        """Attribute name of the attention module inside one block."""
        raise NotImplementedError

    def embed(self, model: nn.Module, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions: [B, T] -> hidden [B, T, E]."""
        raise NotImplementedError

    def rotary(self, model: nn.Module, hidden: torch.Tensor, positions: torch.Tensor) -> Any:
        """Per-forward positional data for `project` (RoPE cos/sin), or None."""
        return None

    def project_heads(
        self, attention: nn.Module, hidden: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """hidden [B, T, E] -> q [B, H, T, D], k and v [B, H_kv, T, D], before positions are applied."""
        raise NotImplementedError

    def apply_rotary(
        self, q: torch.Tensor, k: torch.Tensor, rotary: Any, attention: nn.Module | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply rotary positions to q and k (identity for a family without them). `attention`: the
        teacher's attention module of the layer (a family may leave some layers without positions)."""
        return q, k

    def project(
        self, attention: nn.Module, hidden: torch.Tensor, rotary: Any
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """hidden [B, T, E] -> q [B, H, T, D], k and v [B, H_kv, T, D], positions applied."""
        q, k, v = self.project_heads(attention, hidden)
        q, k = self.apply_rotary(q, k, rotary, attention)
        return q, k, v

    def context_length(self, config: Any) -> int | None:
        """The longest sequence the teacher takes, in positions (None: no limit known)."""
        return getattr(config, "max_position_embeddings", None)

    def softmax_scale(self, attention: nn.Module) -> float:
        """The teacher's factor on q . k before its softmax."""
        return float(attention.scaling)

    def softcap(self, attention: nn.Module) -> float | None:
        """The teacher's attention soft-capping c (scores -> c * tanh(scores / c)), or None."""
        return None

    def sliding_window(self, attention: nn.Module) -> int | None:
        """The teacher's attention window of this layer, in tokens (None: it sees every token)."""
        return None

    def fuse_projections(self, layer: nn.Module, attention: nn.Module) -> None:
        """Stack the projections of one block that read the same input (t2r.modeling.fused), in
        place; `attention` is the teacher's attention module. Default: leave them separate."""

    def output(self, attention: nn.Module, heads_out: torch.Tensor) -> torch.Tensor:
        """[B, T, H * D] -> [B, T, E]: the output projection (and its dropout)."""
        raise NotImplementedError

    def block(self, layer: nn.Module, hidden: torch.Tensor, attend: Attend) -> torch.Tensor:
        """One decoder block with `attend` in place of its attention: [B, T, E] -> [B, T, E]."""
        raise NotImplementedError

    def head(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head: [B, T, E] -> logits [B, T, V]."""
        return self.logits(model, self.final_norm(model, hidden))

    def final_norm(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """The norm after the last block: [B, T, E] -> [B, T, E] (what the teacher's base model returns)."""
        raise NotImplementedError

    def logits(self, model: nn.Module, normed: torch.Tensor) -> torch.Tensor:
        """The LM head (and the family's own scaling of logits): normed [B, T, E] -> [B, T, V]."""
        return model.lm_head(normed)

    def attention(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.attention_name())

    def set_attention(self, layer: nn.Module, module: nn.Module) -> None:
        setattr(layer, self.attention_name(), module)
