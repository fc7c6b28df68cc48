"""Recurrent state: the whole memory of a converted model, allocated, passed in and returned.

A linear or hybrid (sliding window + linear) layer's state has a size set by batch, heads, feature
size and window, never by how many tokens it has seen. A layer kept as softmax attention
(`--softmax-layers`) carries a KV cache that grows by one key and value per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LinearAttentionState:
    """State of one linear-attention layer, always fp32.

    kv:    [B, H, F, D]  sum over seen tokens of phi(k_s) outer v_s
    k_sum: [B, H, F]     sum over seen tokens of phi(k_s) (the normaliser)
    """

    kv: torch.Tensor
    k_sum: torch.Tensor

    @classmethod
    def zeros(
        cls, batch: int, heads: int, feature_dim: int, head_dim: int, device: torch.device | str = "cpu"
    ) -> LinearAttentionState:
        return cls(
            kv=torch.zeros(batch, heads, feature_dim, head_dim, dtype=torch.float32, device=device),
            k_sum=torch.zeros(batch, heads, feature_dim, dtype=torch.float32, device=device),
        )

    def nbytes(self) -> int:
        return self.kv.nbytes + self.k_sum.nbytes

    def select(self, index: torch.Tensor) -> LinearAttentionState:
        """Keep the batch rows in `index` (a sequence leaving the batch)."""
        return LinearAttentionState(self.kv[index], self.k_sum[index])


@dataclass(frozen=True)
class HybridAttentionState:
    """State of one hybrid layer: exact softmax over the first S and the last W tokens, linear
    attention for the rest.

    linear:      LinearAttentionState over every token older than the window, at L heads: one per
                 query head, or one per key/value head (read by all query heads of its group)
    keys:        [B, G, W, D] the last W keys as the softmax sees them (positions applied), G = kv heads
    values:      [B, G, W, D]
    linear_keys: [B, G, W, D] the same keys as the key feature map sees them; phi of the oldest one
                 enters `linear` when a new token pushes it out of the window
    valid:       [B, W] bool, False for an empty slot, a padded token or a sink (which the sink
                 slots hold: it never enters `linear`)
    sink_keys:   [B, G, S, D] the first S real tokens' keys (attention sinks, kept for good)
    sink_values: [B, G, S, D]
    sink_valid:  [B, S] bool, True once the slot holds a token (slots fill in order)
    global_keys, global_values [B, G, N, D], global_features [B, L, N, F] fp32, global_valid [B, N]:
                 the sparse global cache (`ops.global_cache`; N = 0: none), keys that left the
                 window and that the linear state recalls worst, with their key features phi(k)
                 (what the choice and the linear state read of them: F values, not the key's D)
    Window slots are in time order, oldest first.
    """

    linear: LinearAttentionState
    keys: torch.Tensor
    values: torch.Tensor
    linear_keys: torch.Tensor
    valid: torch.Tensor
    sink_keys: torch.Tensor
    sink_values: torch.Tensor
    sink_valid: torch.Tensor
    global_keys: torch.Tensor
    global_values: torch.Tensor
    global_features: torch.Tensor
    global_valid: torch.Tensor

    @classmethod
    def zeros(
        cls,
        batch: int,
        heads: int,
        kv_heads: int,
        feature_dim: int,
        head_dim: int,
        window: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        sinks: int = 0,
        linear_key_dim: int | None = None,
        global_slots: int = 0,
    ) -> HybridAttentionState:
        """linear_key_dim: the size of `linear_keys` (None: head_dim; 0 when there is no linear
        part, so that a window-only layer stores its keys and values and nothing else);
        global_slots: N, the global cache's slots."""

        def empty(slots: int, size: int = head_dim) -> torch.Tensor:
            return torch.zeros(batch, kv_heads, slots, size, dtype=dtype, device=device)

        return cls(
            linear=LinearAttentionState.zeros(batch, heads, feature_dim, head_dim, device),
            keys=empty(window),
            values=empty(window),
            linear_keys=empty(window, head_dim if linear_key_dim is None else linear_key_dim),
            valid=torch.zeros(batch, window, dtype=torch.bool, device=device),
            sink_keys=empty(sinks),
            sink_values=empty(sinks),
            sink_valid=torch.zeros(batch, sinks, dtype=torch.bool, device=device),
            global_keys=empty(global_slots),
            global_values=empty(global_slots),
            global_features=torch.zeros(batch, heads, global_slots, feature_dim, device=device),
            global_valid=torch.zeros(batch, global_slots, dtype=torch.bool, device=device),
        )

    @property
    def window(self) -> int:
        return self.keys.shape[2]

    @property
    def global_slots(self) -> int:
        return self.global_keys.shape[2]

    @property
    def sinks(self) -> int:
        return self.sink_keys.shape[2]

    def nbytes(self) -> int:
        window = self.keys.nbytes + self.values.nbytes + self.linear_keys.nbytes + self.valid.nbytes
        sinks = self.sink_keys.nbytes + self.sink_values.nbytes + self.sink_valid.nbytes
        cache = self.global_keys.nbytes + self.global_values.nbytes + self.global_features.nbytes
        return self.linear.nbytes() + window + sinks + cache + self.global_valid.nbytes

    def select(self, index: torch.Tensor) -> HybridAttentionState:
        return HybridAttentionState(
            self.linear.select(index),
            *(getattr(self, name)[index] for name in self.__dataclass_fields__ if name != "linear"),
        )


@dataclass(frozen=True)
class KVCacheState:
    """State of a layer kept as softmax attention: every key and value seen (grows with tokens).

    keys, values: [B, G, S, D] (positions applied), G = kv heads; valid: [B, S] bool (False = pad).
    """

    keys: torch.Tensor
    values: torch.Tensor
    valid: torch.Tensor

    @classmethod
    def empty(
        cls, batch: int, kv_heads: int, head_dim: int, dtype: torch.dtype = torch.float32, device="cpu"
    ) -> KVCacheState:
        return cls(
            keys=torch.zeros(batch, kv_heads, 0, head_dim, dtype=dtype, device=device),
            values=torch.zeros(batch, kv_heads, 0, head_dim, dtype=dtype, device=device),
            valid=torch.zeros(batch, 0, dtype=torch.bool, device=device),
        )

    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes + self.valid.nbytes

    def bytes_per_token(self) -> int:
        """What one more token costs this layer, per sequence."""
        _, kv_heads, _, head_dim = self.keys.shape
        return 2 * kv_heads * head_dim * self.keys.element_size() + self.valid.element_size()

    def select(self, index: torch.Tensor) -> KVCacheState:
        return KVCacheState(self.keys[index], self.values[index], self.valid[index])


LayerState = LinearAttentionState | HybridAttentionState | KVCacheState


@dataclass(frozen=True)
class ModelState:
    """State of a whole converted model.

    layers: one state per layer (linear, hybrid, or a KV cache for a layer kept as softmax).
    seen:   [B] int64, real (unpadded) tokens seen so far per sequence; the next position id.
    """

    layers: tuple[LayerState, ...]
    seen: torch.Tensor

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers) + self.seen.nbytes

    def bytes_per_token(self) -> int:
        """Bytes per sequence that each further token adds (0 without softmax layers)."""
        return sum(layer.bytes_per_token() for layer in self.layers if isinstance(layer, KVCacheState))

    def select(self, index: torch.Tensor) -> ModelState:
        return ModelState(tuple(layer.select(index) for layer in self.layers), self.seen[index])


@dataclass
class RingWindow:
    """A hybrid layer's state for in-place decoding (the same content as HybridAttentionState).

    kv [B, L, F, D], k_sum [B, L, F] fp32 (L: the linear state's heads, H or G); keys, values
    [B, G, S + N + W, D] and valid [B, S + N + W]: the S sink slots first, then the N global
    cache slots, then the W window slots, so that one product scores them all without a copy;
    linear_keys [B, G, W, D'] (the window slots only), global_features [B, L, N, F].
    The window slots are a ring: slot `FastState.next_slot` mod W is the oldest, the next to be
    overwritten (layers may differ in W: a teacher's local layer kept beside converted ones).
    Mutable: `ops.windowed_ring.windowed_ring_step_` writes it in place.
    """

    kv: torch.Tensor
    k_sum: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    linear_keys: torch.Tensor
    valid: torch.Tensor
    global_features: torch.Tensor
    sinks: int

    @classmethod
    def from_hybrid(cls, state: HybridAttentionState) -> RingWindow:
        """A copy of `state` (time-ordered window, oldest first: the ring starts at slot 0)."""
        return cls(
            state.linear.kv.clone(),
            state.linear.k_sum.clone(),
            torch.cat([state.sink_keys, state.global_keys, state.keys], 2),
            torch.cat([state.sink_values, state.global_values, state.values], 2),
            state.linear_keys.clone(),
            torch.cat([state.sink_valid, state.global_valid, state.valid], 1),
            state.global_features.clone(),
            state.sinks,
        )

    @property
    def global_slots(self) -> int:
        return self.global_features.shape[2]

    @property
    def fixed_slots(self) -> int:
        """S + N: the slots before the window's in keys, values and valid."""
        return self.sinks + self.global_slots

    def to_hybrid(self, pointer: int) -> HybridAttentionState:
        """The same content as a HybridAttentionState: the window rolled back into time order
        (`pointer`: steps taken since the ring started at slot 0)."""

        def ordered(x: torch.Tensor, dim: int = 2) -> torch.Tensor:
            return torch.roll(x, -pointer, dims=dim)

        sinks, fixed = self.sinks, self.fixed_slots
        return HybridAttentionState(
            LinearAttentionState(self.kv.clone(), self.k_sum.clone()),
            ordered(self.keys[:, :, fixed:]),
            ordered(self.values[:, :, fixed:]),
            ordered(self.linear_keys),
            ordered(self.valid[:, fixed:], 1),
            self.keys[:, :, :sinks].clone(),
            self.values[:, :, :sinks].clone(),
            self.valid[:, :sinks].clone(),
            self.keys[:, :, sinks:fixed].clone(),
            self.values[:, :, sinks:fixed].clone(),
            self.global_features.clone(),
            self.valid[:, sinks:fixed].clone(),
        )

    @property
    def linear(self) -> LinearAttentionState:
        """The linear state: views of kv and k_sum (writing one writes the ring)."""
        return LinearAttentionState(self.kv, self.k_sum)

    def select(self, index: torch.Tensor) -> RingWindow:
        tensors = (self.kv, self.k_sum, self.keys, self.values, self.linear_keys, self.valid, self.global_features)
        return RingWindow(*(x[index] for x in tensors), self.sinks)
