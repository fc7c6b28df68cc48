"""Training objectives, each an nn.Module so that accelerate/DDP sees a forward per step.

- `AttentionTransfer` (stage 1, Hedgehog / LoLCATs): the teacher runs once per batch with hooks
  that record, for every layer, the input of its attention and its output (after the output
  projection). Each student attention layer gets the same input and is trained so that its linear
  attention output matches the softmax one (MSE), all layers in one pass.
- `Finetune` (stage 2): next-token cross-entropy on the rows that allow it, plus distillation from
  the teacher's logits (KL(teacher || student) at a temperature).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from t2r.modeling.adapters import Adapter
from t2r.modeling.attention import SoftmaxAttention
from t2r.modeling.model import T2RForCausalLM


@contextmanager
def record_attention(teacher: nn.Module, adapter: Adapter) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Hooks on the teacher's attention modules; yields a list filled with (input, output) per layer.

    input [B, T, E] is what the attention module receives (after the block's norm); output
    [B, T, E] is its result after the output projection.
    """
    records: list[tuple[torch.Tensor, torch.Tensor]] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        records.append((hidden.detach(), (output[0] if isinstance(output, tuple) else output).detach()))

    handles = [
        adapter.attention(layer).register_forward_hook(hook, with_kwargs=True) for layer in adapter.layers(teacher)
    ]
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


class AttentionTransfer(nn.Module):
    """Mean over layers of MSE(linear attention output, softmax attention output)."""

    def __init__(self, student: T2RForCausalLM) -> None:
        super().__init__()
        self.student = student

    def forward(
        self, records: list[tuple[torch.Tensor, torch.Tensor]], attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """records: per layer (input, target) [B, T, E]; attention_mask [B, T].

        Returns the loss and the per-layer MSE [L] (detached), for the log.
        """
        student = self.student
        mask = attention_mask.to(torch.long)
        positions = (mask.cumsum(1) - 1).clamp_min(0)
        rotary = student.adapter.rotary(student.base, records[0][0], positions)
        weight = mask[..., None].to(records[0][1].dtype)
        losses = []
        for attention, (hidden, target) in zip(student.attentions, records, strict=True):
            if isinstance(attention, SoftmaxAttention):
                continue  # kept exact: nothing to transfer
            state = attention.init_state(hidden.shape[0], hidden.device, hidden.dtype)
            out, _ = attention(hidden, rotary, mask, state, "chunked")
            losses.append(((out - target).square() * weight).sum() / (weight.sum() * out.shape[-1]))
        per_layer = torch.stack(losses)
        return per_layer.mean(), per_layer.detach()


class Finetune(nn.Module):
    """ce_weight * CE(next token) + distill_weight * T^2 * KL(teacher_T || student_T)."""

    def __init__(self, student: T2RForCausalLM, ce_weight: float, distill_weight: float, temperature: float) -> None:
        super().__init__()
        self.student = student
        self.ce_weight = ce_weight
        self.distill_weight = distill_weight
        self.temperature = temperature

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        ce_rows: torch.Tensor,
        teacher_logits: torch.Tensor | None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """input_ids, attention_mask [B, T]; ce_rows [B] bool (rows whose tokens may be CE targets);
        teacher_logits [B, T, V] or None."""
        logits, _ = self.student(input_ids, attention_mask, form="chunked")
        scored = attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()  # [B, T-1]
        loss = logits.new_zeros(())
        parts: dict[str, float] = {}
        ce_mask = scored & ce_rows[:, None]
        if self.ce_weight > 0 and ce_mask.any():
            ce = F.cross_entropy(logits[:, :-1][ce_mask], input_ids[:, 1:][ce_mask])
            loss = loss + self.ce_weight * ce
            parts["ce"] = ce.item()
        if self.distill_weight > 0 and teacher_logits is not None:
            t = self.temperature
            student_log_probs = (logits[:, :-1][scored] / t).log_softmax(-1)
            teacher_log_probs = (teacher_logits[:, :-1][scored] / t).log_softmax(-1)
            kl = F.kl_div(student_log_probs, teacher_log_probs, log_target=True, reduction="batchmean")
            loss = loss + self.distill_weight * t * t * kl
            parts["kl"] = kl.item()
        return loss, parts
