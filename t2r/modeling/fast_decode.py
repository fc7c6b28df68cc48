"""The decode path built for speed: one token through every layer, state updated in place.

`model.step` (the reference) builds a new state every token: it concatenates the window, copies
the linear state and walks the reference step. Here the state is allocated once and written in
place: the window is a ring buffer (one slot overwritten per token, a pointer shared by the batch),
the linear state takes a rank-1 update, and GQA reads key/value heads through a view instead of
repeating them. The maths of a token is `ops`' (`ops.windowed_ring`, `ops.reference`'s in-place
step), tested against the reference there; this module runs it through the model's layers. Layers
kept as softmax attention fall back to their module (their cache grows anyway). `fast_step` is
tested against `model.step`: logits and state.

    state = FastState.from_model_state(prefill_state)   # after a chunked prefill
    logits = fast_step(model, ids, state)               # state is updated in place and returned
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from t2r.modeling.attention import LinearAttention, SoftmaxAttention
from t2r.modeling.model import T2RForCausalLM
from t2r.modeling.step_artifacts import load_or_compile
from t2r.modeling.window_keys import WindowKeys
from t2r.ops.denormals import flush_denormals
from t2r.ops.reference import linear_attention_step_
from t2r.ops.state import HybridAttentionState, KVCacheState, LinearAttentionState, ModelState, RingWindow
from t2r.ops.windowed import repeat_heads
from t2r.ops.windowed_ring import windowed_ring_step_

LayerFastState = RingWindow | LinearAttentionState | KVCacheState


@dataclass
class FastState:
    """The whole model's decode state; mutable, updated in place by `fast_step`.

    layers: per layer a RingWindow (hybrid), a LinearAttentionState whose tensors are updated in
        place (pure linear), or a KVCacheState (a softmax layer; replaced every step).
    seen [B]: tokens seen per sequence (the next position); next_slot [1] long: steps taken since
        the rings started, the same for every row (every row advances one token per step); a
        layer's ring pointer is next_slot mod its window, and rolling a ring by a difference of
        next_slots is right for every window (torch.roll wraps). A tensor, not an int, so that a
        compiled step is one graph for every slot (an int would be a constant per value).
    """

    layers: list[LayerFastState]
    seen: torch.Tensor
    next_slot: torch.Tensor

    @classmethod
    def from_model_state(cls, state: ModelState) -> FastState:
        """Copy a ModelState (time-ordered windows, oldest first: the ring starts at slot 0)."""
        layers: list[LayerFastState] = []
        for layer in state.layers:
            if isinstance(layer, HybridAttentionState):
                layers.append(RingWindow.from_hybrid(layer))
            elif isinstance(layer, LinearAttentionState):
                layers.append(LinearAttentionState(layer.kv.clone(), layer.k_sum.clone()))
            else:
                layers.append(layer)
        return cls(layers, state.seen.clone(), torch.zeros(1, dtype=torch.long, device=state.seen.device))

    def to_model_state(self) -> ModelState:
        """The equivalent ModelState (windows rolled back into time order)."""
        layers = []
        for layer in self.layers:
            if isinstance(layer, RingWindow):
                layers.append(layer.to_hybrid(int(self.next_slot)))
            elif isinstance(layer, LinearAttentionState):
                layers.append(LinearAttentionState(layer.kv.clone(), layer.k_sum.clone()))
            else:
                layers.append(layer)
        return ModelState(tuple(layers), self.seen.clone())

    def nbytes(self) -> int:
        return self.to_model_state().nbytes()

    def select(self, index: torch.Tensor) -> FastState:
        """Keep the rows in `index` (sequences that finished leave the batch)."""
        layers: list[LayerFastState] = []
        for layer in self.layers:
            layers.append(layer.select(index))
        return FastState(layers, self.seen[index], self.next_slot.clone())

    @classmethod
    def join(cls, states: list[FastState]) -> FastState:
        """One batch of every row of `states`, in order (a new sequence joins a running batch:
        continuous batching). The ring pointer is shared by a batch, so each state's window slots
        are rolled to put its oldest slot at the first state's pointer; the KV caches of layers
        kept as softmax, whose lengths differ, are padded on the left with invalid slots."""
        pointer = int(states[0].next_slot)
        layers: list[LayerFastState] = []
        for parts in zip(*(state.layers for state in states), strict=True):
            first = parts[0]
            if isinstance(first, RingWindow):
                shifts = [pointer - int(state.next_slot) for state in states]
                rolled = [_ring_rolled(part, shift) for part, shift in zip(parts, shifts, strict=True)]
                tensors = [torch.cat(group) for group in zip(*rolled, strict=True)]
                layers.append(RingWindow(*tensors, first.sinks))
            elif isinstance(first, LinearAttentionState):
                kv, k_sum = torch.cat([p.kv for p in parts]), torch.cat([p.k_sum for p in parts])
                layers.append(LinearAttentionState(kv, k_sum))
            else:
                layers.append(_left_padded_caches(parts))
        seen = torch.cat([state.seen for state in states])
        return cls(layers, seen, states[0].next_slot.clone())


def _ring_rolled(layer: RingWindow, shift: int) -> tuple[torch.Tensor, ...]:
    """A RingWindow's tensors with its W window slots rolled by `shift` (its sink and global cache
    slots stay)."""
    fixed = layer.fixed_slots

    def rolled(x: torch.Tensor, dim: int, start: int) -> torch.Tensor:
        head, window = x.narrow(dim, 0, start), x.narrow(dim, start, x.shape[dim] - start)
        return torch.cat([head, torch.roll(window, shift, dims=dim)], dim)

    return (
        layer.kv,
        layer.k_sum,
        rolled(layer.keys, 2, fixed),
        rolled(layer.values, 2, fixed),
        rolled(layer.linear_keys, 2, 0),
        rolled(layer.valid, 1, fixed),
        layer.global_features,
    )


def _left_padded_caches(parts: tuple[KVCacheState, ...]) -> KVCacheState:
    """KV caches of several rows as one, shorter ones padded on the left with invalid slots."""
    length = max(part.keys.shape[2] for part in parts)

    def padded(x: torch.Tensor, dim: int) -> torch.Tensor:
        shape = list(x.shape)
        shape[dim] = length - x.shape[dim]
        return torch.cat([x.new_zeros(shape), x], dim)

    return KVCacheState(
        torch.cat([padded(p.keys, 2) for p in parts]),
        torch.cat([padded(p.values, 2) for p in parts]),
        torch.cat([padded(p.valid, 1) for p in parts]),
    )


def _linear_step(
    attention: LinearAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: LinearAttentionState
) -> torch.Tensor:
    """Pure linear layer, one token: q [B, H, D], k, v [B, G, D]; kv and k_sum updated in place."""
    heads = q.shape[1]
    phi_q = attention.feature_map_q(q[:, :, None])[:, :, 0]  # [B, H, F]
    phi_k = attention.key_map()(repeat_heads(k[:, :, None], heads))[:, :, 0]  # GQA, as in the teacher
    return linear_attention_step_(phi_q, phi_k, repeat_heads(v[:, :, None], heads)[:, :, 0], state, attention.eps)


def _hybrid_step(
    attention: LinearAttention,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_features: torch.Tensor,
    k_features: torch.Tensor,
    ring: RingWindow,
    slot: torch.Tensor,
    sink_q: torch.Tensor | None = None,
    leaving_linear_key: torch.Tensor | None = None,
) -> torch.Tensor:
    """Hybrid layer, one token: q, q_features [B, H, D]; k, v, k_features [B, G, D]; the ring
    written in place (`ops.windowed_ring`). sink_q [B, H, D] scores the sinks instead of q (past
    the teacher's context), or None; leaving_linear_key [B, G, D]: the oldest slot's key for the
    linear part (`LinearAttention.leaving_linear_key`)."""
    return windowed_ring_step_(
        q, k, v, attention.query_features(q_features[:, :, None])[:, :, 0], k_features, ring, slot,
        feature_map_k=attention.key_map(),
        window_share=attention.window_share(),
        scale=attention.adapter.softmax_scale(attention.projections),
        eps=attention.eps,
        decay=attention.decay_per_head(),
        sink_queries=sink_q,
        softcap=attention.adapter.softcap(attention.projections),
        leaving_linear_key=leaving_linear_key,
    )  # fmt: skip


@torch.no_grad()
def fast_step(model: T2RForCausalLM, input_ids: torch.Tensor, state: FastState) -> torch.Tensor:
    """One decode step for every row: input_ids [B] -> logits [B, V]; `state` advances in place.

    With sinks, the sinks are always scored by queries rotated at min(position, the teacher's last
    one) (`T2RForCausalLM.sink_rotary`): within the teacher's context these are the tokens' own
    queries, bit for bit, so the step does the same work at every context (flat speed, one compiled
    graph, no host sync to decide).
    """
    adapter = model.adapter
    positions = state.seen[:, None]  # [B, 1]
    hidden = adapter.embed(model.base, input_ids[:, None], positions)  # [B, 1, E]
    rotary = adapter.rotary(model.base, hidden, positions)
    sink_rotary = model.capped_rotary(hidden, positions)
    window_keys = WindowKeys(adapter, model.base, state.seen)
    mask = torch.ones_like(positions)
    rings = False
    for index, layer in enumerate(adapter.layers(model.base)):
        attention = adapter.attention(layer)
        layer_state = state.layers[index]

        def attend(x: torch.Tensor, attention: Any = attention, layer_state: Any = layer_state, index: int = index):
            if isinstance(attention, SoftmaxAttention):
                out, state.layers[index] = attention(x, rotary, mask, layer_state, "recurrent")
                return out
            q_raw, k_raw, v = adapter.project_heads(attention.projections, x)  # [B, H|G, 1, D]
            q, k = adapter.apply_rotary(q_raw, k_raw, rotary, attention.projections)
            q_features, k_features = attention.feature_inputs(q, k, q_raw, k_raw)
            if isinstance(layer_state, RingWindow):
                sink_q = attention.sink_queries(q_raw, k_raw, sink_rotary)
                slot = state.next_slot.remainder(layer_state.linear_keys.shape[2])  # this layer's oldest slot
                heads_out = _hybrid_step(
                    attention, q[:, :, 0], k[:, :, 0], v[:, :, 0], q_features[:, :, 0], k_features[:, :, 0],
                    layer_state, slot, None if sink_q is None else sink_q[:, :, 0],
                    attention.leaving_linear_key(layer_state, slot, window_keys),
                )  # fmt: skip
            else:
                heads_out = _linear_step(attention, q_features[:, :, 0], k_features[:, :, 0], v[:, :, 0], layer_state)
            return adapter.output(attention.projections, heads_out.reshape(x.shape[0], 1, -1))

        hidden = adapter.block(layer, hidden, attend)
        rings = rings or isinstance(layer_state, RingWindow)
    state.seen += 1
    if rings:
        state.next_slot.add_(1)
    return adapter.head(model.base, hidden)[:, 0]


class Decoder:
    """`fast_step` for one model, optionally through `torch.compile`: `decoder(model, ids, state)`.

    Compiled, the thousands of small operations of a step (every layer's projections, norms, RoPE,
    feature maps, window softmax, state update) run as a few fused kernels and fewer Python calls.
    The first call compiles (what that costs: BENCHMARKS.md, bench notes); a new batch size
    recompiles once, then the batch dimension is dynamic. The compiled step is tested equal to
    `model.step`.

    With `artifacts` (a folder), the step is compiled ahead of time per batch-size class and kept
    there (`t2r.modeling.step_artifacts`): one step for batch 1 and one for every batch of 2 or
    more (its batch dimension symbolic), each made at the first call of its class, or by `warm_up`;
    the next process loads them in seconds instead of compiling. Calls their guards reject (a
    growing softmax cache, another shape) take the lazy step.
    """

    def __init__(self, compile: bool = False, backend: str = "inductor", artifacts: Path | None = None) -> None:
        # backend "aot_eager" traces and functionalises the same graph without generating code:
        # the quick test of the capture (in-place state updates, ring indices); inductor is the speed.
        # The lazily compiled step is made at its first use: building it imports inductor (seconds),
        # which a process that loads its step ahead of time never needs.
        self._step: Any = None if compile else fast_step
        self._backend = backend
        self._artifacts = artifacts if compile else None
        # Per batch-size class (True: 2 or more), the ahead-of-time step once its first call has
        # made or loaded it (None: it could not be; the lazy step runs).
        self._ahead_by_class: dict[bool, Any] = {}
        # The step's subnormals cost a quarter of its time (t2r.ops.denormals). This reaches the
        # intra-op threads only if no parallel operation has run yet (`t2r` sets it at start-up).
        flush_denormals()

    @property
    def _ahead(self) -> Any:
        """The ahead-of-time step of batch 1 (None: none made or loaded)."""
        return self._ahead_by_class.get(False)

    def warm_up(self, model: T2RForCausalLM, max_batch: int) -> None:
        """Make or load now the ahead-of-time steps a server of `max_batch` rows will call (each
        class decodes one token of a scratch state), so that no request waits for a compilation."""
        if self._artifacts is None:
            return
        for rows in sorted({1, min(2, max_batch)}):
            scratch = FastState.from_model_state(model.init_state(rows))
            with torch.no_grad():
                self(model, torch.zeros(rows, dtype=torch.long, device=model.device), scratch)

    def __call__(self, model: T2RForCausalLM, input_ids: torch.Tensor, state: FastState) -> torch.Tensor:
        many = input_ids.shape[0] > 1
        # A softmax layer's cache grows every step: a step specialised on its shape would serve one call.
        if self._artifacts is not None and many not in self._ahead_by_class:
            growing = any(isinstance(layer, KVCacheState) for layer in state.layers)
            ahead = None if growing else load_or_compile(
                fast_step, (model, input_ids, state), self._artifacts, self._backend, dynamic_batch=many
            )  # fmt: skip
            if ahead is not None:
                ahead.disable_guard_check()  # checked here, once per call
            self._ahead_by_class[many] = ahead
        ahead = self._ahead_by_class.get(many)
        if ahead is not None and ahead.guard_check(model, input_ids, state):
            return ahead(model, input_ids, state)
        if self._step is None:
            self._step = torch.compile(fast_step, backend=self._backend)
        return self._step(model, input_ids, state)
