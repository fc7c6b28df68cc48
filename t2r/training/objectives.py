"""Training objectives, each an nn.Module so that accelerate/DDP sees a forward per step.

- `AttentionTransfer` (stage 1, Hedgehog / LoLCATs): the teacher runs once per batch with hooks
  that record, for every layer, the input of its attention and its output (after the output
  projection). Each student attention layer gets the same input and is trained so that its linear
  attention output matches the softmax one (MSE), all layers in one pass.
- `Finetune` (stage 2): next-token cross-entropy on the rows that allow it, plus distillation from
  the teacher's logits (KL(teacher || student) at a temperature).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from t2r.errors import UsageError
from t2r.modeling.adapters import Adapter
from t2r.modeling.attention import SoftmaxAttention
from t2r.modeling.model import T2RForCausalLM
from t2r.training.head_loss import head_loss


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
    """Mean over layers of MSE(linear attention output, softmax attention output).

    With `checkpoint_layers` each layer's attention is recomputed in backward (its input is a
    recorded tensor already), so one layer's activations exist at a time, not every layer's.
    """

    def __init__(self, student: T2RForCausalLM, checkpoint_layers: bool = False) -> None:
        super().__init__()
        self.student = student
        self.checkpoint_layers = checkpoint_layers

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
            if isinstance(attention, SoftmaxAttention) or attention.feature_dim == 0:
                continue  # kept exact (softmax, or a teacher's local layer in its ring buffer): nothing to transfer
            if self.checkpoint_layers and torch.is_grad_enabled():
                loss = checkpoint(
                    self._layer_loss, attention, hidden, target, rotary, mask, weight, use_reentrant=False
                )
            else:
                loss = self._layer_loss(attention, hidden, target, rotary, mask, weight)
            losses.append(loss)
        if not losses:
            raise UsageError("attention transfer has nothing to train: no layer has a linear part (--transfer-steps 0)")
        per_layer = torch.stack(losses)
        return per_layer.mean(), per_layer.detach()

    @staticmethod
    def _layer_loss(attention: nn.Module, hidden: torch.Tensor, target: torch.Tensor, rotary: object,
                    mask: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """hidden, target [B, T, E]; weight [B, T, 1] -> the layer's masked MSE (a scalar)."""
        state = attention.init_state(hidden.shape[0], hidden.device, hidden.dtype)
        out, _ = attention(hidden, rotary, mask, state, "chunked")
        return ((out - target).square() * weight).sum() / (weight.sum() * out.shape[-1])


class Finetune(nn.Module):
    """ce_weight * CE(next token) + distill_weight * T^2 * KL(teacher_T || student_T).

    With `chunk` > 0 (what `t2r train` does) no [B, T, V] tensor exists: the student hands over its
    last hidden states, the teacher its normed ones, and logits, log-softmaxes and both losses are
    made `chunk` positions at a time, each chunk's gradient right after its loss
    (`t2r.training.head_loss`: nothing is recomputed in backward). The loss and gradients are
    those of the whole-tensor form (chunk 0), tested.
    """

    def __init__(
        self,
        student: T2RForCausalLM,
        ce_weight: float,
        distill_weight: float,
        temperature: float,
        chunk: int = 0,
        teacher_logits: Callable[[torch.Tensor], torch.Tensor] | None = None,
        checkpoint_layers: bool = False,
    ) -> None:
        super().__init__()
        self.student = student
        self.ce_weight = ce_weight
        self.distill_weight = distill_weight
        self.temperature = temperature
        self.chunk = chunk
        self.teacher_logits = teacher_logits  # normed teacher hidden [N, E] -> logits [N, V] (chunk > 0)
        self.checkpoint_layers = checkpoint_layers  # recompute each block in backward (one block's activations)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        ce_rows: torch.Tensor,
        teacher_out: torch.Tensor | None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """input_ids, attention_mask [B, T]; ce_rows [B] bool (rows whose tokens may be CE targets);
        teacher_out: the teacher's logits [B, T, V] (chunk 0) or its normed hidden states [B, T, E]."""
        scored = attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()  # [B, T-1]
        ce_mask = (scored & ce_rows[:, None])[scored]  # [N]: which scored positions are CE targets
        targets = input_ids[:, 1:][scored]  # [N]
        distill = self.distill_weight > 0 and teacher_out is not None
        count, ce_count = len(targets), int(ce_mask.sum())
        if self.chunk > 0:
            hidden, _ = self.student(
                input_ids, attention_mask, form="chunked", return_hidden=True, checkpoint_layers=self.checkpoint_layers
            )
            hidden = hidden[:, :-1][scored]  # [N, E]
            teacher = teacher_out[:, :-1][scored] if distill else None  # type: ignore[index]

            def chunk_loss(part: torch.Tensor, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
                ce_part, kl_part = self._chunk_losses(
                    part, None if teacher is None else teacher[start:stop], targets[start:stop], ce_mask[start:stop]
                )
                sums = torch.stack([ce_part, kl_part]).detach()
                return self._weighted(ce_part, kl_part, ce_count, count, distill), sums

            trainable = [p for p in self.student.parameters() if p.requires_grad]
            loss, sums = head_loss(chunk_loss, hidden, self.chunk, trainable)
            ce_sum, kl_sum = sums.unbind()
        else:
            logits, _ = self.student(
                input_ids, attention_mask, form="chunked", checkpoint_layers=self.checkpoint_layers
            )
            teacher = teacher_out[:, :-1][scored] if distill else None  # type: ignore[index]
            ce_sum, kl_sum = self._losses(logits[:, :-1][scored], teacher, targets, ce_mask)
            loss = self._weighted(ce_sum, kl_sum, ce_count, count, distill)
        parts: dict[str, float] = {}
        if self.ce_weight > 0 and ce_count:
            parts["ce"] = (ce_sum / ce_count).item()
        if distill:
            parts["kl"] = (kl_sum / max(1, count)).item()
        return loss, parts

    def _weighted(self, ce_sum: torch.Tensor, kl_sum: torch.Tensor, ce_count: int, count: int,
                  distill: bool) -> torch.Tensor:  # fmt: skip
        """The loss from the sums over positions: CE averaged over its ce_count targets, KL (summed over
        the vocabulary) averaged over all count positions, each weighted."""
        loss = ce_sum.new_zeros(())
        if self.ce_weight > 0 and ce_count:
            loss = loss + self.ce_weight * ce_sum / ce_count
        if distill:
            loss = loss + self.distill_weight * self.temperature**2 * kl_sum / max(1, count)
        return loss

    def _chunk_losses(self, hidden: torch.Tensor, teacher: torch.Tensor | None, targets: torch.Tensor,
                      ce_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        logits = self.student.adapter.head(self.student.base, hidden)
        teacher_logits = None
        if teacher is not None:
            assert self.teacher_logits is not None
            with torch.no_grad():
                teacher_logits = self.teacher_logits(teacher)
        return self._losses(logits, teacher_logits, targets, ce_mask)

    def _losses(self, logits: torch.Tensor, teacher_logits: torch.Tensor | None, targets: torch.Tensor,
                ce_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Sums over positions: logits, teacher_logits [N, V] -> (CE summed over ce_mask, KL summed)."""
        ce_sum = logits.new_zeros(())
        if self.ce_weight > 0 and ce_mask.any():
            ce_sum = F.cross_entropy(logits[ce_mask], targets[ce_mask], reduction="sum")
        kl_sum = logits.new_zeros(())
        if teacher_logits is not None:
            t = self.temperature
            student_log_probs = (logits / t).log_softmax(-1)
            teacher_log_probs = (teacher_logits / t).log_softmax(-1)
            kl_sum = F.kl_div(student_log_probs, teacher_log_probs, log_target=True, reduction="sum")
        return ce_sum, kl_sum
