"""Which token ids end a generation."""

from __future__ import annotations

from typing import Any


def eos_ids(tokenizer: Any, model: Any) -> frozenset[int]:
    """Every end-of-text id the tokenizer or the teacher's config names."""
    ids = {tokenizer.eos_token_id, getattr(model.base.config, "eos_token_id", None)}
    flat: set[int] = set()
    for value in ids:
        if isinstance(value, int):
            flat.add(value)
        elif isinstance(value, list):
            flat.update(v for v in value if isinstance(v, int))
    return frozenset(flat)
