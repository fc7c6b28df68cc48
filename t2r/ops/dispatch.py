"""Pick an attention op by the name of its form: 'parallel', 'chunked' or 'recurrent'.

`parallel` is the quadratic reference, `chunked` is exact with O(T * C) memory, `recurrent` loops
the single-token step; `hybrid` picks the window + linear op of `ops.windowed` (its own signature)
instead of pure linear attention. A hybrid state with a global cache goes through the recurrent
form's loop, made for prefill (`ops.windowed_scan`), whatever the form asked; or, with the cache
chosen by the prompt's last queries (`global_select="prompt"`, `ops.global_select`), the form asked
for all but the prompt's last tokens.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from t2r.errors import UsageError
from t2r.ops import FORMS, GLOBAL_SELECTS
from t2r.ops.chunked import chunked_linear_attention
from t2r.ops.global_select import prompt_selected_attention
from t2r.ops.reference import causal_linear_attention, recurrent_linear_attention
from t2r.ops.state import LinearAttentionState
from t2r.ops.windowed import windowed_attention
from t2r.ops.windowed_chunked import chunked_windowed_attention
from t2r.ops.windowed_scan import scanned_windowed_attention
from t2r.ops.windowed_step import recurrent_windowed_attention

AttentionOp = Callable[..., tuple[torch.Tensor, LinearAttentionState]]

# Per form: (pure linear op, hybrid window + linear op of `ops.windowed`).
_OPS_BY_FORM = {
    "parallel": (causal_linear_attention, windowed_attention),
    "chunked": (chunked_linear_attention, chunked_windowed_attention),
    "recurrent": (recurrent_linear_attention, recurrent_windowed_attention),
}
assert tuple(_OPS_BY_FORM) == FORMS


def attention_op(
    form: str, chunk_size: int = 64, hybrid: bool = False, compiled: bool = False, global_select: str = "recall"
) -> AttentionOp:
    """The op of a form; `chunk_size` is bound for the chunked form (whose hybrid op takes a
    sequence of a chunk or so through the parallel form: `_parallel_when_smaller`).

    global_select: how a hybrid state with a global cache fills it in the parallel and chunked forms
    (a prefill): "recall", token by token by self-recall error (`ops.windowed_scan`), or "prompt",
    by the prompt's last queries (`ops.global_select`). Decoding (one token) always goes by recall.

    compiled: the chunked form through `torch.compile` (inductor fuses its many elementwise steps,
    forward and backward: ~25% of a training step's attention time here); the same maths, tested
    against the eager op. Shapes are static: a new sequence length compiles once more.
    """
    if form not in _OPS_BY_FORM:
        raise UsageError(f"unknown form {form!r}; choose one of {', '.join(FORMS)}")
    if global_select not in GLOBAL_SELECTS:
        raise UsageError(f"unknown global cache selection {global_select!r}; choose one of {', '.join(GLOBAL_SELECTS)}")
    op = _OPS_BY_FORM[form][hybrid]
    if form == "chunked":
        op = functools.partial(_compiled(op) if compiled else op, chunk_size=chunk_size)
        if hybrid:
            op = functools.partial(_parallel_when_smaller, op, chunk_size)
    if hybrid and form != "recurrent":
        return functools.partial(_with_a_global_cache, op, global_select)
    return op


def _parallel_when_smaller(op: AttentionOp, chunk_size: int, *args, **kwargs) -> tuple:
    """The chunked hybrid op, or the parallel form when its scores are no larger than the chunked
    form's blocks: T x (W + T) against ceil(T / C) x C x (C + W) per row and head (for T up to about
    one and a half chunks here). The same maths (both are tested against each other) within the
    chunked form's memory bound, in fewer operations: no padding to whole chunks, no blocks, no
    prefix sums. (A 16-token prefill segment of the shipped model: 208 ms chunked, 149 ms parallel;
    32 prompts of ~70 tokens together spent most of their prefill in the chunked blocks' softmax.)
    The window's leading slots empty in every row are skipped (`skip_empty`): a prompt's first
    segment scores its own tokens, not W empty slots besides."""
    q = args[0] if args else kwargs["q"]
    state = args[6] if len(args) > 6 else kwargs["initial_state"]
    length, window = q.shape[2], state.window
    if length * (window + length) <= -(-length // chunk_size) * chunk_size * (chunk_size + window):
        return windowed_attention(*args, **kwargs, skip_empty=True)
    return op(*args, **kwargs)


def _with_a_global_cache(op: AttentionOp, global_select: str, *args, **kwargs) -> tuple:
    """A hybrid op, or for a state with a global cache its prefill form: token by token
    (`ops.windowed_scan`: which keys stay cached depends on every earlier choice), or the cache
    chosen by the prompt's last queries (`ops.global_select`)."""
    initial_state = args[6] if len(args) > 6 else kwargs["initial_state"]
    if not initial_state.global_slots:
        return op(*args, **kwargs)
    if global_select == "prompt":
        return prompt_selected_attention(op, *args, **kwargs)
    return scanned_windowed_attention(*args, **kwargs)


@functools.cache
def _compiled(op: AttentionOp) -> AttentionOp:
    return torch.compile(op, dynamic=False)
