"""The decode path built for speed: one token through every layer, state updated in place.

`model.step` (the reference) builds a new state every token: it concatenates the window, copies
the linear state and walks the reference step. Here the state is allocated once and written in
place: the window is a ring buffer (one slot overwritten per token, a pointer shared by the batch),
the linear state takes a rank-1 update (`addcmul_`), and GQA reads key/value heads through a view
instead of repeating them. Layers kept as softmax attention fall back to their module (their cache
grows anyway). Every function here is tested against `model.step`: logits and state.

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
from t2r.ops.denormals import flush_denormals
from t2r.ops.state import HybridAttentionState, KVCacheState, LinearAttentionState, ModelState
from t2r.ops.windowed import capped


@dataclass
class RingWindow:
    """A hybrid layer's state for in-place decoding (the same content as HybridAttentionState).

    kv [B, L, F, D], k_sum [B, L, F] fp32 (L: the linear state's heads, H or G); keys, values
    [B, G, S + W, D] and valid [B, S + W]: the S sink slots first, then the W window slots, so
    that one product scores both without a copy; linear_keys [B, G, W, D] (the window slots only).
    The window slots are a ring: slot `FastState.next_slot` mod W is the oldest, the next to be
    overwritten (layers may differ in W: a teacher's local layer kept beside converted ones).
    """

    kv: torch.Tensor
    k_sum: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    linear_keys: torch.Tensor
    valid: torch.Tensor
    sinks: int

    def select(self, index: torch.Tensor) -> RingWindow:
        tensors = (self.kv, self.k_sum, self.keys, self.values, self.linear_keys, self.valid)
        return RingWindow(*(x[index] for x in tensors), self.sinks)


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
                layers.append(
                    RingWindow(
                        layer.linear.kv.clone(),
                        layer.linear.k_sum.clone(),
                        torch.cat([layer.sink_keys, layer.keys], 2),
                        torch.cat([layer.sink_values, layer.values], 2),
                        layer.linear_keys.clone(),
                        torch.cat([layer.sink_valid, layer.valid], 1),
                        layer.sinks,
                    )
                )
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

                def ordered(x: torch.Tensor, dim: int = 2) -> torch.Tensor:
                    return torch.roll(x, -int(self.next_slot), dims=dim)

                sinks = layer.sinks
                layers.append(
                    HybridAttentionState(
                        LinearAttentionState(layer.kv.clone(), layer.k_sum.clone()),
                        ordered(layer.keys[:, :, sinks:]),
                        ordered(layer.values[:, :, sinks:]),
                        ordered(layer.linear_keys),
                        ordered(layer.valid[:, sinks:], 1),
                        layer.keys[:, :, :sinks].clone(),
                        layer.values[:, :, :sinks].clone(),
                        layer.valid[:, :sinks].clone(),
                    )
                )
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
    """A RingWindow's tensors with its W window slots rolled by `shift` (its sink slots stay)."""
    sinks = layer.sinks

    def rolled(x: torch.Tensor, dim: int, start: int) -> torch.Tensor:
        head, window = x.narrow(dim, 0, start), x.narrow(dim, start, x.shape[dim] - start)
        return torch.cat([head, torch.roll(window, shift, dims=dim)], dim)

    return (
        layer.kv,
        layer.k_sum,
        rolled(layer.keys, 2, sinks),
        rolled(layer.values, 2, sinks),
        rolled(layer.linear_keys, 2, 0),
        rolled(layer.valid, 1, sinks),
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
    groups = q.shape[1] // k.shape[1]
    phi_q = attention.feature_map_q(q[:, :, None])[:, :, 0].float()  # [B, H, F]
    k_heads = k.repeat_interleave(groups, 1) if groups > 1 else k
    phi_k = attention.key_map()(k_heads[:, :, None])[:, :, 0].float()
    v_heads = (v.repeat_interleave(groups, 1) if groups > 1 else v).float()
    state.kv.addcmul_(phi_k.unsqueeze(-1), v_heads.unsqueeze(-2))
    state.k_sum.add_(phi_k)
    numerator = torch.matmul(phi_q.unsqueeze(-2), state.kv).squeeze(-2)  # [B, H, D]
    denominator = (phi_q * state.k_sum).sum(-1, keepdim=True)
    return (numerator / (denominator + attention.eps)).to(v.dtype)


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
) -> torch.Tensor:
    """Hybrid layer, one token: q, q_features [B, H, D]; k, v, k_features [B, G, D].

    The oldest slot's key leaves the window into the linear state, the new key takes its slot.
    sink_q [B, H, D] scores the sinks instead of q (past the teacher's context), or None.
    """
    batch, heads, head_dim = q.shape
    kv_heads, linear_heads = k.shape[1], ring.kv.shape[1]
    groups, linear_groups = heads // kv_heads, linear_heads // kv_heads  # linear_groups: 1 or groups
    sinks = ring.sinks
    window_slot = slot + sinks if sinks else slot  # the slot in keys / values / valid
    # 1. Evict: phi(oldest linear key) (x) its value into the linear state (only valid slots).
    leaving_key = ring.linear_keys.index_select(2, slot)  # [B, G, 1, D]
    leaving_key = leaving_key.repeat_interleave(linear_groups, 1) if linear_groups > 1 else leaving_key
    phi_leaving = attention.key_map()(leaving_key.to(k_features.dtype))[:, :, 0].float()  # [B, L, F]
    phi_leaving = phi_leaving * ring.valid.index_select(1, window_slot)[:, :, None]
    leaving_value = ring.values.index_select(2, window_slot)[:, :, 0].float()
    leaving_value = leaving_value.repeat_interleave(linear_groups, 1) if linear_groups > 1 else leaving_value
    if attention.decay is not None:  # the linear state forgets once per step (ops.windowed)
        ring.kv.mul_(attention.decay)
        ring.k_sum.mul_(attention.decay)
    ring.kv.addcmul_(phi_leaving.unsqueeze(-1), leaving_value.unsqueeze(-2))
    ring.k_sum.add_(phi_leaving)
    # 2. The new token takes the slot; while a row has fewer than S sinks, it is a sink instead
    #    (its window slot stays invalid: counted once, never evicted into the linear state).
    ring.keys.index_copy_(2, window_slot, k[:, :, None])
    ring.values.index_copy_(2, window_slot, v[:, :, None])
    ring.linear_keys.index_copy_(2, slot, k_features[:, :, None])
    if sinks:
        sink_valid = ring.valid[:, :sinks]  # a view: written in place
        filled = sink_valid.sum(1, keepdim=True)  # [B, 1]
        place = torch.arange(sinks, device=filled.device)[None, :] == filled  # [B, S]; none once full
        for part, new in ((ring.keys[:, :, :sinks], k), (ring.values[:, :, :sinks], v)):
            part.copy_(torch.where(place[:, None, :, None], new[:, :, None], part))
        sink_valid.logical_or_(place)
        ring.valid.index_copy_(1, window_slot, filled >= sinks)
    else:
        ring.valid.index_fill_(1, window_slot, True)
    # 3. Softmax over the sinks and the window: query heads grouped by their key/value head, no repeat.
    scale = attention.adapter.softmax_scale(attention.projections)
    q_grouped = q.float().view(batch, kv_heads, groups, head_dim)
    valid = ring.valid[:, None, None, :]
    if sink_q is not None and sinks:  # the sinks scored by sink_q, the window by q
        sink_q_grouped = sink_q.float().view(batch, kv_heads, groups, head_dim)
        sink_scores = torch.matmul(sink_q_grouped, ring.keys[:, :, :sinks].float().transpose(-1, -2))
        window_scores = torch.matmul(q_grouped, ring.keys[:, :, sinks:].float().transpose(-1, -2))
        scores = torch.cat([sink_scores, window_scores], dim=-1) * scale  # [B, G, groups, S + W]
    else:
        scores = torch.matmul(q_grouped, ring.keys.float().transpose(-1, -2)) * scale
    scores = capped(scores, attention.adapter.softcap(attention.projections))
    scores = scores.masked_fill(~valid, torch.finfo(scores.dtype).min)
    weights = (scores - scores.amax(-1, keepdim=True)).exp() * valid
    window_num = torch.matmul(weights, ring.values.float()).view(batch, heads, head_dim)
    window_den = weights.sum(-1).view(batch, heads)
    # 4. Linear part from the state (the evicted key included): query heads grouped by their
    #    linear head (H / L of them each), no repeat of the state.
    phi_q = attention.query_features(q_features[:, :, None])[:, :, 0].float()  # [B, H, F]
    phi_q_grouped = phi_q.view(batch, linear_heads, heads // linear_heads, -1)  # [B, L, H / L, F]
    linear_num = torch.matmul(phi_q_grouped, ring.kv).view(batch, heads, head_dim)
    linear_den = (phi_q_grouped * ring.k_sum[:, :, None]).sum(-1).view(batch, heads)
    share = torch.sigmoid(attention.window_logit.float())[None, :]  # [1, H]
    numerator = share[..., None] * window_num + (1 - share[..., None]) * linear_num
    denominator = share * window_den + (1 - share) * linear_den
    return (numerator / (denominator.unsqueeze(-1) + attention.eps)).to(v.dtype)


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

    With `artifacts` (a folder), the first call's step is compiled ahead of time and kept there
    (`t2r.modeling.step_artifacts`): the next process loads it in seconds instead of compiling.
    Calls its guards reject (another batch size, a growing softmax cache) take the lazy step.
    """

    def __init__(self, compile: bool = False, backend: str = "inductor", artifacts: Path | None = None) -> None:
        # backend "aot_eager" traces and functionalises the same graph without generating code:
        # the quick test of the capture (in-place state updates, ring indices); inductor is the speed.
        # The lazily compiled step is made at its first use: building it imports inductor (seconds),
        # which a process that loads its step ahead of time never needs.
        self._step: Any = None if compile else fast_step
        self._backend = backend
        self._artifacts = artifacts if compile else None
        self._ahead: Any = None  # the ahead-of-time step, once the first call has made or loaded it
        # The step's subnormals cost a quarter of its time (t2r.ops.denormals). This reaches the
        # intra-op threads only if no parallel operation has run yet (`t2r` sets it at start-up).
        flush_denormals()

    def __call__(self, model: T2RForCausalLM, input_ids: torch.Tensor, state: FastState) -> torch.Tensor:
        if self._artifacts is not None:
            folder, self._artifacts = self._artifacts, None  # one try, at the first call
            # A softmax layer's cache grows every step: a step specialised on its shape would
            # serve one call.
            if not any(isinstance(layer, KVCacheState) for layer in state.layers):
                self._ahead = load_or_compile(fast_step, (model, input_ids, state), folder, self._backend)
                if self._ahead is not None:
                    self._ahead.disable_guard_check()  # checked here, once per call
        if self._ahead is not None and self._ahead.guard_check(model, input_ids, state):
            return self._ahead(model, input_ids, state)
        if self._step is None:
            self._step = torch.compile(fast_step, backend=self._backend)
        return self._step(model, input_ids, state)
