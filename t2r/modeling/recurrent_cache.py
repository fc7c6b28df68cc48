"""The `Cache` that transformers' `generate()` carries between steps: t2r's recurrent state.

A KV cache grows by a key and a value per token and layer; this one holds a `FastState` (per layer:
the linear state, the window ring and the sinks, or the KV cache of a layer kept as softmax) whose
size is set when the prompt is prefilled and never changes after. It keeps no per-layer objects of
transformers' own: the state is one object, advanced in place by t2r's fast decode step.

It answers what `generate()` asks a cache: its sequence length (the positions fed so far, padding
included, as transformers counts them: transformers' own `Cache.get_seq_length` raises when every
layer is recurrent), beam reordering, and batch expansion and selection.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from t2r.modeling.fast_decode import FastState


class T2RCache(Cache):
    """state: the FastState after the tokens fed so far (None before the first forward).
    tokens: positions fed so far, left padding included (the length of `generate()`'s input_ids
    that the state has consumed)."""

    def __init__(self, state: FastState | None = None, tokens: int = 0) -> None:
        super().__init__(layers=[])
        self.state = state
        self.tokens = tokens

    def __repr__(self) -> str:
        return f"T2RCache(tokens={self.tokens}, bytes={self.nbytes()})"

    def nbytes(self) -> int:
        """Bytes of the whole state (every sequence of the batch); 0 before the first forward."""
        return 0 if self.state is None else self.state.nbytes()

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.tokens

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1  # no limit: the state does not grow

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        return self.tokens + query_length, 0

    @property
    def batch_size(self) -> int:
        return -1 if self.state is None else int(self.state.seen.shape[0])

    @property
    def is_compileable(self) -> bool:
        return False  # t2r compiles its own decode step (`T2RModelForCausalLM.compile_decode`)

    @property
    def is_croppable(self) -> bool:
        return False  # a recurrent state cannot forget its last tokens

    @property
    def is_initialized(self) -> bool:
        return self.state is not None

    def reset(self) -> None:
        self.state, self.tokens = None, 0

    def _select(self, index: torch.Tensor) -> None:
        if self.state is not None:
            self.state = self.state.select(index.to(self.state.seen.device))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row i of the next step continues row beam_idx[i] of this one."""
        self._select(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.state is not None:
            rows = self.state.seen.shape[0]
            self._select(torch.arange(rows).repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise ValueError("a t2r cache is a recurrent state: it cannot drop its last tokens")
