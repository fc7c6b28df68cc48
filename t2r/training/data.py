"""The blocks a run trains on: `--data` (next-token targets allowed) and `--distill-data` (only ever
the teacher's input), with the validation blocks held out of `--data`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from t2r.data.blocks import load_blocks


@dataclass
class TrainingData:
    """blocks [N, T] to train on; ce_rows [N] True where a block's tokens may be CE targets
    (False for distillation-only text); valid [M, T] held out; sources for the manifest."""

    blocks: torch.Tensor
    ce_rows: torch.Tensor
    valid: torch.Tensor
    sources: list[dict[str, Any]]


def training_data(data: list[str], distill_data: list[str], tokenizer: Any, seq_len: int, seed: int) -> TrainingData:
    """Blocks of `data` (CE targets allowed; none named: the built-in corpus) and of `distill_data`
    (only ever the teacher's input: attention transfer and KL, never cross-entropy targets).
    The validation blocks are held out of `data`."""
    main = load_blocks(data, tokenizer, seq_len, seed=seed)
    blocks, ce_rows = main.train, torch.ones(len(main.train), dtype=torch.bool)
    sources = [{**dataclasses.asdict(info), "use": "train"} for info in main.sources]
    if distill_data:
        extra = load_blocks(distill_data, tokenizer, seq_len, valid_fraction=0.0, seed=seed)
        blocks = torch.cat([blocks, extra.train])
        ce_rows = torch.cat([ce_rows, torch.zeros(len(extra.train), dtype=torch.bool)])
        sources += [{**dataclasses.asdict(info), "use": "distill-only"} for info in extra.sources]
    return TrainingData(blocks, ce_rows, main.valid, sources)
