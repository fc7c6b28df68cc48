"""Projections that read the same input, stacked into one matrix for decoding.

A decode step multiplies one token by every projection: q, k and v of a layer read the same
normed hidden state, and so do an MLP's gate and up projections. As three (two) matrices that is
three (two) matrix-vector products, each a kernel call with its own overhead; stacked, one call
reads the same bytes. The results are the same products (stacked rows; int8 / int4 quantise each
row and group alone, so the quantised stack equals the stacked quantised matrices).

    fuse_projections(model)                 # in place; then with_weights(model, "int4") as usual

The adapter decides which modules of a family stack (`Adapter.fuse_projections`); a family it
does not know is left as it is. For decoding and evaluation: LoRA and training name the separate
projections.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

if TYPE_CHECKING:  # the adapters import this module, and the model imports the adapters
    from t2r.modeling.model import T2RForCausalLM


def stacked(linears: Sequence[nn.Linear]) -> nn.Linear:
    """One nn.Linear [sum(out_i), in] whose output is the concatenated outputs of `linears`."""
    first = linears[0]
    with_bias = any(linear.bias is not None for linear in linears)
    out_features = sum(linear.out_features for linear in linears)
    fused = nn.Linear(first.in_features, out_features, bias=with_bias, device=first.weight.device)
    fused = fused.to(first.weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([linear.weight for linear in linears]))
        if with_bias:
            biases = [
                linear.bias if linear.bias is not None else linear.weight.new_zeros(linear.out_features)
                for linear in linears
            ]
            fused.bias.copy_(torch.cat(biases))
    fused.requires_grad_(first.weight.requires_grad)
    return fused


class FusedGatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)) with gate and up stacked: gate_up_proj [2I, E], down_proj [E, I].

    x [..., E] -> [..., E] (the teacher's gated MLP, Llama's form)."""

    def __init__(self, gate: nn.Linear, up: nn.Linear, down: nn.Module, act: Callable) -> None:
        super().__init__()
        self.gate_up_proj = stacked([gate, up])
        self.down_proj = down
        self.act_fn = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act_fn(gate) * up)


def fuse_projections(model: T2RForCausalLM) -> T2RForCausalLM:
    """Stack each layer's q/k/v and gate/up projections where the family allows; in place."""
    adapter = model.adapter
    for layer in adapter.layers(model.base):
        adapter.fuse_projections(layer, adapter.attention(layer).projections)
    return model
