"""LoRA adapters on the attention projections of a converted model, through peft."""

from __future__ import annotations

import torch.nn as nn
from peft import LoraConfig, LoraModel

from t2r.modeling.model import T2RForCausalLM


def add_lora(model: T2RForCausalLM, rank: int, alpha: float | None = None) -> None:
    """Wrap the q/k/v/o projections of every attention layer with rank-`rank` adapters, in place.

    The adapters start at zero (B = 0): the model's outputs are unchanged until they train.
    """
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else 2 * rank,
        lora_dropout=0.0,
        target_modules=list(model.adapter.lora_targets),
        fan_in_fan_out=model.base.config.model_type == "gpt2",  # GPT-2's Conv1D stores W transposed
    )
    LoraModel(model, config, "default")


def has_lora(model: nn.Module) -> bool:
    return any("lora_" in name for name, _ in model.named_parameters())


def merge_lora(model: T2RForCausalLM) -> None:
    """Fold the adapters into the projection weights and remove them, in place."""
    from peft.tuners.lora import LoraLayer

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoraLayer):
                child.merge()
                setattr(parent, name, child.get_base_layer())
