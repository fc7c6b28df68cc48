"""The LM head and the fine-tuning loss over a whole batch, chunk by chunk, with its gradient made
in the forward pass.

A [N, V] logits tensor (N scored positions, V = 49,152 … 262,144 columns) is the largest thing a
fine-tuning step would hold. Making it `chunk` positions at a time under activation checkpointing
bounds the memory but runs the student's and the teacher's LM head twice (forward, and again when
backward recomputes the chunk). Here each chunk's loss is differentiated right away, by autograd
over the same ops (`chunk_loss`, the one definition of the loss), with respect to the chunk's
hidden states [chunk, E] and any trainable parameter of the head; those gradients are kept (the
hidden ones are N x E, tiny next to N x V) and backward only scales them by the incoming gradient.
One chunk's [chunk, V] tensors exist at a time, and nothing is recomputed (the Liger-kernel idea,
"fused linear cross-entropy", in plain PyTorch).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

# chunk_loss(hidden [n, E] (a leaf that requires grad), start, stop) -> (weighted loss: the chunk's
# share of the step's loss, a scalar with a graph; the chunk's unweighted sums, detached [2]).
ChunkLoss = Callable[[torch.Tensor, int, int], tuple[torch.Tensor, torch.Tensor]]


class _HeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, chunk_loss: ChunkLoss, chunk: int, hidden: torch.Tensor, *params: torch.Tensor):  # type: ignore[override]
        grad_hidden = torch.empty_like(hidden)
        param_grads: list[torch.Tensor | None] = [None] * len(params)
        loss = hidden.new_zeros(())
        sums = hidden.new_zeros(2)
        with torch.enable_grad():
            for start in range(0, len(hidden), chunk):
                stop = min(start + chunk, len(hidden))
                leaf = hidden[start:stop].detach().requires_grad_()
                weighted, parts = chunk_loss(leaf, start, stop)
                grads = torch.autograd.grad(weighted, [leaf, *params], allow_unused=True)
                grad_hidden[start:stop] = grads[0]
                for index, grad in enumerate(grads[1:]):
                    if grad is not None:
                        param_grads[index] = grad if param_grads[index] is None else param_grads[index] + grad
                loss, sums = loss + weighted.detach(), sums + parts
        ctx.unused = [grad is None for grad in param_grads]
        ctx.save_for_backward(grad_hidden, *[grad for grad in param_grads if grad is not None])
        ctx.mark_non_differentiable(sums)
        return loss, sums

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_sums: torch.Tensor):  # type: ignore[override]
        grad_hidden, *kept = ctx.saved_tensors
        kept_grads = iter(kept)
        params = [None if unused else grad_loss * next(kept_grads) for unused in ctx.unused]
        return None, None, grad_loss * grad_hidden, *params


def head_loss(
    chunk_loss: ChunkLoss, hidden: torch.Tensor, chunk: int, params: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [N, E] -> (the step's loss, the sum of every chunk's detached sums [2]).

    params: the trainable tensors the loss may reach besides `hidden` (the head's, when it trains;
    the others' gradients are None and cost nothing). Loss and gradients are those of summing
    `chunk_loss` over the chunks under plain autograd.
    """
    return _HeadLoss.apply(chunk_loss, chunk, hidden, *params)
