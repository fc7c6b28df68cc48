"""Causal linear attention in three forms sharing one signature.

    op(q, k, v, initial_state=None, eps=...) -> (out, final_state)

`parallel` is the quadratic reference, `chunked` is exact with O(T * C) memory, `recurrent` loops
the single-token step. Pick one by name with `attention_op`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from t2r.config import FORMS
from t2r.errors import UsageError
from t2r.ops.chunked import chunked_linear_attention
from t2r.ops.reference import causal_linear_attention, linear_attention_step, recurrent_linear_attention
from t2r.state import LinearAttentionState

AttentionOp = Callable[..., tuple[torch.Tensor, LinearAttentionState]]

__all__ = [
    "AttentionOp",
    "attention_op",
    "causal_linear_attention",
    "chunked_linear_attention",
    "linear_attention_step",
    "recurrent_linear_attention",
]


def attention_op(form: str, chunk_size: int = 64) -> AttentionOp:
    """The op for a form name: 'parallel', 'chunked' or 'recurrent'."""
    if form == "parallel":
        return causal_linear_attention
    if form == "chunked":
        return functools.partial(chunked_linear_attention, chunk_size=chunk_size)
    if form == "recurrent":
        return recurrent_linear_attention
    raise UsageError(f"unknown form {form!r}; choose one of {', '.join(FORMS)}")
