"""Keep every layer's activations for backward, or recompute them: chosen from the memory they take.

Recomputing (activation checkpointing) holds one layer's activations at a time and costs about a
fifth of a step (the student's forward again: 2.3 of 10.4 s of a transfer step and ~3.7 of 20 s of a
fine-tuning step of the default model, BENCHMARKS.md "train-profile"). Keeping them costs memory
in proportion to the tokens of a micro-batch and the outputs of the student's projections: for the
default model at 4 x 512 tokens, 12.99 GB of peak memory kept against 5.91 GB recomputed
(benchmarks/train_memory.json), 7.08 GB for 2,048 tokens x 155,520 projection outputs (30 layers of
q, k, v, o, gate, up, down: 5,184 each), 22.2 bytes per token and output (23 here: an estimate that
errs towards recomputing). A run keeps them when that
estimate fits in SHARE_OF_AVAILABLE of the memory available when it starts, and recomputes them
otherwise; `--checkpoint-layers` / `--no-checkpoint-layers` decide instead.
"""

from __future__ import annotations

import torch.nn as nn
from transformers.pytorch_utils import Conv1D

KEPT_BYTES_PER_OUTPUT = 23  # per token and projection output (measured on the default model, above)
# Of the memory available at the start (teacher and student loaded): the rest is the step's other
# tensors (the loss chunks, AdamW's state, the teacher's forward) and what else the machine runs.
SHARE_OF_AVAILABLE = 0.4


def projection_outputs(student: nn.Module) -> int:
    """The output features of every projection of the student, the output head left out (its
    logits are made chunk by chunk, `--loss-chunk`)."""
    heads = {id(m.get_output_embeddings()) for m in student.modules() if hasattr(m, "get_output_embeddings")}
    total = 0
    for module in student.modules():
        if id(module) in heads:
            continue
        if isinstance(module, nn.Linear):
            total += module.out_features
        elif isinstance(module, Conv1D):  # GPT-2's transposed linear layer: weight [in, out]
            total += module.weight.shape[1]
    return total


def kept_activation_bytes(student: nn.Module, tokens: int) -> int:
    """Estimated bytes of activations a step keeps for backward without recomputation, for
    `tokens` tokens a micro-batch."""
    return tokens * projection_outputs(student) * KEPT_BYTES_PER_OUTPUT


def recompute_layers(student: nn.Module, tokens: int, available_bytes: int) -> bool:
    """Whether to recompute each layer's activations in backward (True) or keep them (False)."""
    return kept_activation_bytes(student, tokens) > SHARE_OF_AVAILABLE * available_bytes


def choose_recomputation(setting: bool | None, student: nn.Module, tokens: int, announce: bool = True) -> bool:
    """`setting` (the --checkpoint-layers flags) if given, else the estimate against the memory
    available now; the choice is announced on t2r's log."""
    if setting is not None:
        return setting
    import logging

    import psutil

    available = psutil.virtual_memory().available
    recompute = recompute_layers(student, tokens, available)
    if announce:
        kept = kept_activation_bytes(student, tokens) / 2**30
        what = "recomputing each layer's activations in backward" if recompute else "keeping every layer's activations"
        logging.getLogger("t2r").info(
            "%s (~%.1f GiB kept against %.1f GiB available; --checkpoint-layers / --no-checkpoint-layers decide)",
            what, kept, available / 2**30,
        )  # fmt: skip
    return recompute
