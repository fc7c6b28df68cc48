"""A batch's decode state allocated once for `capacity` rows: sequences take and free slots.

A server's memory for the recurrent state is then known at start-up and never grows nor churns:
the active rows are always the first `active` slots, and `view()` is that prefix of every buffer
(narrowed views, so `fast_step` updates the buffers in place). A sequence prefilled alone is
copied into the next free slot with its window ring rolled to the batch's shared ring pointer (as
`FastState.join` does); a row that leaves is filled by moving the rows after it down one slot, so
the order of the active rows is kept.

Layers kept as softmax attention (a KV cache that grows with every token) cannot live in a fixed
buffer: `StateSlots.fits(state)` is False for such a model and the scheduler joins and selects
FastStates instead.
"""

from __future__ import annotations

import torch

from t2r.modeling.fast_decode import FastState
from t2r.ops.state import LinearAttentionState, RingWindow

_RING_TENSORS = ("kv", "k_sum", "keys", "values", "linear_keys", "valid", "global_features")


class StateSlots:
    """`capacity` rows of a FastState shaped like `like` (any batch size), zero-filled."""

    def __init__(self, like: FastState, capacity: int) -> None:
        if not self.fits(like):
            raise ValueError("a state with softmax-attention layers (a growing KV cache) has no fixed slots")
        self.capacity, self.active = capacity, 0

        def buffer(x: torch.Tensor) -> torch.Tensor:
            return x.new_zeros((capacity, *x.shape[1:]))

        self.layers: list[RingWindow | LinearAttentionState] = []
        for layer in like.layers:
            if isinstance(layer, RingWindow):
                self.layers.append(RingWindow(*(buffer(getattr(layer, n)) for n in _RING_TENSORS), layer.sinks))
            else:
                assert isinstance(layer, LinearAttentionState)
                self.layers.append(LinearAttentionState(buffer(layer.kv), buffer(layer.k_sum)))
        self.seen = buffer(like.seen)
        self.next_slot = torch.zeros_like(like.next_slot)

    @staticmethod
    def fits(state: FastState) -> bool:
        return all(isinstance(layer, RingWindow | LinearAttentionState) for layer in state.layers)

    def nbytes(self) -> int:
        tensors = [self.seen, *(t for layer in self.layers for t in _tensors(layer))]
        return sum(t.nbytes for t in tensors)

    def view(self) -> FastState:
        """The active rows as one FastState whose tensors are views of the buffers."""
        rows = self.active
        layers: list[RingWindow | LinearAttentionState] = []
        for layer in self.layers:
            if isinstance(layer, RingWindow):
                layers.append(RingWindow(*(getattr(layer, n)[:rows] for n in _RING_TENSORS), layer.sinks))
            else:
                layers.append(LinearAttentionState(layer.kv[:rows], layer.k_sum[:rows]))
        return FastState(layers, self.seen[:rows], self.next_slot)

    def add(self, row: FastState) -> int:
        """Copy a one-row FastState into the next free slot; returns the slot."""
        if self.active >= self.capacity:
            raise RuntimeError("every slot is taken")
        slot, shift = self.active, int(self.next_slot) - int(row.next_slot)
        for mine, theirs in zip(self.layers, row.layers, strict=True):
            if isinstance(mine, RingWindow):
                assert isinstance(theirs, RingWindow)
                fixed = theirs.fixed_slots
                for name in _RING_TENSORS:
                    source = getattr(theirs, name)[0]
                    if name in ("keys", "values", "linear_keys", "valid"):
                        # the window slots (after the sinks and the global cache, if any) follow the ring
                        dim, start = (0, fixed) if name == "valid" else (1, fixed if name != "linear_keys" else 0)
                        window = source.narrow(dim, start, source.shape[dim] - start)
                        source = torch.cat([source.narrow(dim, 0, start), torch.roll(window, shift, dim)], dim)
                    getattr(mine, name)[slot].copy_(source)
            else:
                assert isinstance(theirs, LinearAttentionState)
                mine.kv[slot].copy_(theirs.kv[0])
                mine.k_sum[slot].copy_(theirs.k_sum[0])
        self.seen[slot] = row.seen[0]
        self.active += 1
        return slot

    def keep(self, rows: list[int]) -> None:
        """Keep only the active rows `rows` (ascending), moved down to the first slots in order."""
        for target, source in enumerate(rows):
            if target != source:
                for buffer in [self.seen, *(t for layer in self.layers for t in _tensors(layer))]:
                    buffer[target].copy_(buffer[source])
        self.active = len(rows)

    def row(self, index: int) -> FastState:
        """A copy of one active row as a one-row FastState (e.g. a session's state to keep)."""
        return self.view().select(torch.tensor([index], device=self.seen.device))


def _tensors(layer: RingWindow | LinearAttentionState) -> list[torch.Tensor]:
    if isinstance(layer, RingWindow):
        return [getattr(layer, n) for n in _RING_TENSORS]
    return [layer.kv, layer.k_sum]
