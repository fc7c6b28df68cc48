"""The drop-in attention modules: the teacher's projections around a new attention computation.

`LinearAttention.forward(hidden, rotary, mask, state, form)` runs any of the three forms of
`t2r.ops` (parallel, chunked, recurrent) with the same weights: prefill, scoring and decoding are
the same maths. With `window > 0` it is the hybrid of `ops.windowed` (exact softmax over the last
`window` tokens, linear attention before them, a learned share per head). `SoftmaxAttention` keeps a
layer exact (`--softmax-layers`), with a KV cache as its state. The state goes in and comes out;
no module holds any.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from t2r.modeling.adapters.base import Adapter, HeadShape
from t2r.modeling.feature_maps import FeatureMap, map_query_heads
from t2r.modeling.window_keys import WindowKeys
from t2r.ops.dispatch import attention_op
from t2r.ops.state import HybridAttentionState, KVCacheState, LinearAttentionState, RingWindow
from t2r.ops.windowed import capped, repeat_heads


class LinearAttention(nn.Module):
    """Replaces one softmax attention layer by linear (window 0) or hybrid attention.

    projections: the teacher's attention module, kept whole; the adapter reads its q/k/v/o
        projections, so those weights are the teacher's own tensors.
    feature_map_q: phi for queries; feature_map_k: phi for keys, or None when tied (phi_q is used).
        Each has H heads (a linear state per query head) or G (one per key/value head: every
        query head of a group goes through its key/value head's map; hybrid only).
    window: softmax window W in tokens (0: pure linear attention).
    rotary_features: the feature maps see q and k with rotary positions applied (as the teacher's
        softmax does); False feeds them q and k before positions, so that the linear part is the
        same function at every position, also beyond the teacher's context (the window keeps order).
    window_logit [H]: sigmoid of it is each head's share of the softmax part (window > 0 only).
    decay: the linear part's per-token forgetting factor in (0, 1) (window > 0 only), or None.
    sinks: the first `sinks` tokens stay in the softmax part for good (window > 0 only).
    global_cache: N slots per key/value head of a sparse global cache (`ops.global_cache`; window
        and a linear part only): a setting of inference (`T2RForCausalLM.with_global_cache`).
    global_select: how a prefill fills the cache: "recall" (token by token, `ops.global_cache`) or
        "prompt" (by the prompt's last queries, `ops.global_select`).
    """

    def __init__(
        self,
        projections: nn.Module,
        adapter: Adapter,
        shape: HeadShape,
        feature_map_q: FeatureMap,
        feature_map_k: FeatureMap | None,
        eps: float,
        window: int = 0,
        rotary_features: bool = True,
        chunk_size: int = 64,
        decay: float | None = None,
        sinks: int = 0,
        global_cache: int = 0,
        global_select: str = "recall",
    ) -> None:
        super().__init__()
        self.projections = projections
        self.feature_map_q = feature_map_q
        self.feature_map_k = feature_map_k
        self.adapter = adapter
        self.shape = shape
        self.eps = eps
        self.window = window
        self.rotary_features = rotary_features
        self.chunk_size = chunk_size
        self.decay = decay
        self.sinks = sinks
        self.global_cache = global_cache
        self.global_select = global_select
        self.compiled = False  # the chunked form through torch.compile (a setting of the process, not saved)
        if window > 0:
            weight = next(feature_map_q.parameters(), None)
            dtype = torch.float32 if weight is None else weight.dtype
            # With no linear part the window takes the whole share: sigmoid(1e4) is 1.0 exactly.
            start = 1e4 if self.feature_dim == 0 else 0.0
            self.window_logit = nn.Parameter(torch.full((shape.query_heads,), start, dtype=dtype))

    @property
    def feature_dim(self) -> int:
        return self.feature_map_q.out_dim

    @property
    def linear_heads(self) -> int:
        """L: the linear state's heads, H or G."""
        return self.feature_map_q.heads

    def key_map(self) -> FeatureMap:
        return self.feature_map_q if self.feature_map_k is None else self.feature_map_k

    def query_features(self, q_features: torch.Tensor) -> torch.Tensor:
        """phi of queries [B, H, T, D] -> [B, H, T, F] (by their key/value head's map when L = G)."""
        return map_query_heads(self.feature_map_q, q_features)

    def feature_inputs(
        self, q: torch.Tensor, k: torch.Tensor, q_raw: torch.Tensor, k_raw: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What the feature maps see: q and k with positions (rotary_features) or before them;
        with no linear part (feature_dim 0) nothing: [..., 0], so the state keeps no copy of the keys."""
        q_features, k_features = (q, k) if self.rotary_features else (q_raw, k_raw)
        if self.feature_dim == 0:
            return q_features[..., :0], k_features[..., :0]
        return q_features, k_features

    def window_share(self) -> torch.Tensor:
        """[H] each head's share of the softmax part, sigmoid(window_logit) (window > 0 only)."""
        return torch.sigmoid(self.window_logit)

    def decay_per_head(self) -> torch.Tensor | None:
        """[L] fp32 forgetting factors of the linear part, or None."""
        if self.decay is None:
            return None
        return torch.full((self.linear_heads,), self.decay, device=self.window_logit.device)

    def init_state(
        self, batch: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> LinearAttentionState | HybridAttentionState:
        shape = self.shape
        if self.window == 0:
            return LinearAttentionState.zeros(batch, shape.query_heads, self.feature_dim, shape.head_dim, device)
        return HybridAttentionState.zeros(
            batch,
            self.linear_heads,
            shape.kv_heads,
            self.feature_dim,
            shape.head_dim,
            self.window,
            dtype,
            device,
            self.sinks,
            linear_key_dim=0,  # the linear part's keys come from the window's (`window_linear_keys`)
            global_slots=self.global_cache if self.feature_dim else 0,
        )

    def window_linear_keys(self, state: HybridAttentionState, window_keys: WindowKeys | None) -> HybridAttentionState:
        """`state` with its window's keys as the key feature map sees them, for the ops (which take
        a key's pre-rotary form from `linear_keys` when it leaves the window). A state keeps none
        (`init_state`): with rotary features they are the window's keys, else those turned back by
        their positions (`t2r.modeling.window_keys`). window_keys None: a fresh state (no valid
        slot, as in attention transfer), whose keys are never read. A state that holds them (a
        session saved before they were dropped) is used as it is."""
        if state.linear_keys.shape[-1] or not self.feature_dim:
            return state
        if self.rotary_features:
            linear_keys = state.keys
        elif window_keys is None:
            linear_keys = torch.zeros_like(state.keys)
        else:
            linear_keys = window_keys.window(state.keys, state.valid, self.projections).to(state.keys.dtype)
        return dataclasses.replace(state, linear_keys=linear_keys)

    def leaving_linear_key(self, ring: RingWindow, slot: torch.Tensor, window_keys: WindowKeys) -> torch.Tensor | None:
        """The decode ring's oldest window key (slot [1]) as the key feature map sees it [B, G, D],
        as `window_linear_keys` makes them; None when the ring keeps its own linear keys."""
        if ring.linear_keys.shape[-1] or not self.feature_dim:
            return None
        key = ring.keys.index_select(2, slot + ring.fixed_slots)  # [B, G, 1, D]
        if not self.rotary_features:
            key = window_keys.oldest(key, ring.valid[:, ring.fixed_slots :], self.projections)
        return key[:, :, 0]

    def forward(
        self,
        hidden: torch.Tensor,
        rotary: Any,
        mask: torch.Tensor,
        state: LinearAttentionState | HybridAttentionState,
        form: str,
        sink_rotary: Any = None,
        window_keys: WindowKeys | None = None,
    ) -> tuple[torch.Tensor, LinearAttentionState | HybridAttentionState]:
        """hidden [B, T, E], mask [B, T] (1 = real token, 0 = padding) -> out [B, T, E], next state.

        sink_rotary: rotary data for the queries that score the sinks (`T2RForCausalLM.sink_rotary`),
        None for the tokens' own. window_keys: how this forward turns the state's window keys back
        before positions (`window_linear_keys`); None only for a fresh state.
        """
        q_raw, k_raw, v = self.adapter.project_heads(self.projections, hidden)
        q, k = self.adapter.apply_rotary(q_raw, k_raw, rotary, self.projections)
        q_features, k_features = self.feature_inputs(q, k, q_raw, k_raw)
        phi_q = self.query_features(q_features)  # [B, H, T, F]
        if self.window == 0:
            heads = self.shape.query_heads
            k_features, v = repeat_heads(k_features, heads), repeat_heads(v, heads)  # GQA, as in the teacher
            # A padded key leaves the numerator and the normaliser: zero its features.
            phi_k = self.key_map()(k_features) * mask[:, None, :, None].to(k_features.dtype)
            op = attention_op(form, self.chunk_size, compiled=self.compiled)
            out, next_state = op(phi_q, phi_k, v, initial_state=state, eps=self.eps)  # [B, H, T, D]
        else:
            stores_linear_keys = bool(state.linear_keys.shape[-1])
            op = attention_op(
                form, self.chunk_size, hybrid=True, compiled=self.compiled, global_select=self.global_select
            )
            out, next_state = op(
                q, k, v, phi_q, k_features, mask.bool(), self.window_linear_keys(state, window_keys),
                feature_map_k=self.key_map(),
                window_share=self.window_share(),
                scale=self.adapter.softmax_scale(self.projections),
                eps=self.eps,
                decay=self.decay_per_head(),
                sink_queries=self.sink_queries(q_raw, k_raw, sink_rotary),
                softcap=self.adapter.softcap(self.projections),
            )  # fmt: skip
            if not stores_linear_keys:  # the next state keeps only the rotated keys, as it came
                next_state = dataclasses.replace(next_state, linear_keys=next_state.linear_keys[..., :0])
        out = out.transpose(1, 2).reshape(*hidden.shape[:-1], -1)
        return self.adapter.output(self.projections, out), next_state

    def sink_queries(self, q_raw: torch.Tensor, k_raw: torch.Tensor, sink_rotary: Any) -> torch.Tensor | None:
        """q_raw [B, H, T, D] rotated by sink_rotary, or None (the ops then use q itself)."""
        if sink_rotary is None or not self.sinks:
            return None
        return self.adapter.apply_rotary(q_raw, k_raw, sink_rotary, self.projections)[0]


class SoftmaxAttention(nn.Module):
    """A layer kept as the teacher's exact softmax attention; its state is a KV cache.

    Memory grows by 2 * kv_heads * head_dim values per token: what `--softmax-layers` costs.
    """

    def __init__(self, projections: nn.Module, adapter: Adapter, shape: HeadShape) -> None:
        super().__init__()
        self.projections = projections
        self.adapter = adapter
        self.shape = shape

    def init_state(
        self, batch: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> KVCacheState:
        return KVCacheState.empty(batch, self.shape.kv_heads, self.shape.head_dim, dtype, device)

    def forward(
        self,
        hidden: torch.Tensor,
        rotary: Any,
        mask: torch.Tensor,
        state: KVCacheState,
        form: str,
        sink_rotary: Any = None,
        window_keys: WindowKeys | None = None,
    ) -> tuple[torch.Tensor, KVCacheState]:
        """hidden [B, T, E], mask [B, T] -> out [B, T, E], the cache with these T tokens appended.

        sink_rotary and window_keys are unused: the teacher's own attention has neither sinks nor a window.

        Every form is the same computation here: the cache makes one token as cheap as it gets.
        """
        q, k, v = self.adapter.project(self.projections, hidden, rotary)
        cache = KVCacheState(
            keys=torch.cat([state.keys, k.to(state.keys.dtype)], dim=2),
            values=torch.cat([state.values, v.to(state.values.dtype)], dim=2),
            valid=torch.cat([state.valid, mask.bool()], dim=1),
        )
        length, total = q.shape[2], cache.keys.shape[2]
        query_slot = torch.arange(length, device=q.device)[:, None] + (total - length)
        key_slot = torch.arange(total, device=q.device)[None, :]
        # Causal and real keys only; a query always sees its own slot, so a padded query has a
        # finite (unused) output instead of a softmax over nothing.
        allowed = ((key_slot <= query_slot) & cache.valid[:, None, None, :]) | (key_slot == query_slot)
        window = self.adapter.sliding_window(self.projections)
        if window is not None:  # the teacher's own sliding-window layer (Mistral, Gemma 3's local layers)
            allowed = allowed & (key_slot > query_slot - window)
        heads = self.shape.query_heads
        keys, values = repeat_heads(cache.keys, heads).to(q.dtype), repeat_heads(cache.values, heads).to(q.dtype)
        scale, softcap = self.adapter.softmax_scale(self.projections), self.adapter.softcap(self.projections)
        if softcap is None:
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed, scale=scale)
        else:  # soft-capped scores (Gemma 2): no fused kernel takes them, so the scores are made here
            scores = capped(torch.einsum("bhtd,bhsd->bhts", q, keys) * scale, softcap)
            out = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ values
        out = out.transpose(1, 2).reshape(*hidden.shape[:-1], -1)
        return self.adapter.output(self.projections, out), cache
