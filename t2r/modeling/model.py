"""The converted model: a teacher whose attention layers are `LinearAttention`, run block by block.

t2r drives the decoder itself (through the architecture adapter) so that every layer gets its
recurrent state explicitly. All other modules are the teacher's own: embeddings, norms, MLPs, head.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Generator
from typing import Any

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from t2r.errors import UsageError
from t2r.modeling.adapters import Adapter
from t2r.modeling.attention import LinearAttention, SoftmaxAttention
from t2r.modeling.config import T2RConfig
from t2r.modeling.window_keys import WindowKeys
from t2r.ops.state import ModelState


class T2RForCausalLM(nn.Module):
    """A causal LM with linear attention.

    base: the Hugging Face model, attention layers replaced in place (its `config` is the teacher's).
    """

    def __init__(self, base: nn.Module, adapter: Adapter, config: T2RConfig) -> None:
        super().__init__()
        self.base = base
        self.adapter = adapter
        self.config = config

    def with_global_cache(self, slots: int | None, select: str | None = None) -> T2RForCausalLM:
        """This model with a sparse global cache of `slots` per layer and key/value head
        (`ops.global_cache`; 0: none), in place: the cache is training-free, a setting of inference.
        select: how a prefill fills it, "recall" or "prompt" (`T2RConfig.global_select`). None
        keeps what the model has. Layers with no linear part (a teacher's local layer kept) take none."""
        slots = self.config.global_cache if slots is None else slots
        if select == "prompt" and not slots:
            raise UsageError("--global-select prompt chooses the keys of a global cache: give one (--global-cache N)")
        select = self.config.global_select if select is None else select
        self.config = dataclasses.replace(self.config, global_cache=slots, global_select=select)  # checked there
        for attention in self.attentions:
            if isinstance(attention, LinearAttention):
                attention.global_cache = slots
                attention.global_select = select
        return self

    @property
    def attentions(self) -> list[LinearAttention | SoftmaxAttention]:
        return [self.adapter.attention(layer) for layer in self.adapter.layers(self.base)]

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def teacher_context(self) -> int | None:
        """The longest sequence the teacher takes, in tokens (None: no limit known)."""
        return self.adapter.context_length(self.base.config)

    @property
    def sink_position_limit(self) -> int | None:
        """The teacher's context in tokens when this model has sinks (their scores are capped past
        it, see `sink_rotary`), else None."""
        return self.teacher_context if self.config.sinks else None

    def past_sink_limit(self, positions: torch.Tensor) -> bool:
        """Whether any of these positions [B, T] lies past the teacher's context (a host sync)."""
        limit = self.sink_position_limit
        return limit is not None and positions.numel() > 0 and int(positions.max()) >= limit

    def sink_rotary(self, hidden: torch.Tensor, positions: torch.Tensor) -> Any:
        """Rotary data for the queries that score the sinks: None (the tokens' own) within the
        teacher's context; past it, the positions capped at its last one.

        A sink keeps the position it came at (0..S-1), so its offset to a query grows with the
        stream; past the teacher's context the angles of the slow RoPE frequencies would be ones
        the teacher never saw (BENCHMARKS.md, the long-context notes, shows what that costs). Capped,
        a query scores each sink as the teacher did at its farthest, and nothing changes within
        the context. (The fast decode step always takes the capped positions: no host sync.)
        """
        if not self.past_sink_limit(positions):
            return None
        return self.capped_rotary(hidden, positions)

    def capped_rotary(self, hidden: torch.Tensor, positions: torch.Tensor) -> Any:
        """Rotary data at min(position, the teacher's last one); None when the model has no sinks.
        Within the context it equals the tokens' own: the fast step always takes it (no branch)."""
        limit = self.sink_position_limit
        return None if limit is None else self.adapter.rotary(self.base, hidden, positions.clamp(max=limit - 1))

    def init_state(self, batch: int) -> ModelState:
        """An empty state for `batch` sequences; its size never changes while decoding."""
        parameter = next(self.parameters())
        device, dtype = parameter.device, parameter.dtype
        return ModelState(
            layers=tuple(attention.init_state(batch, device, dtype) for attention in self.attentions),
            seen=torch.zeros(batch, dtype=torch.long, device=device),
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        state: ModelState | None = None,
        form: str = "chunked",
        logits_to_keep: int = 0,
        return_hidden: bool = False,
        checkpoint_layers: bool = False,
    ) -> tuple[torch.Tensor, ModelState]:
        """input_ids [B, T], attention_mask [B, T] (1 real, 0 pad; left or right padding).

        Returns logits [B, T, V] (only the last `logits_to_keep` positions when > 0: a long prefill
        needs one row, not T x V) and the state after these tokens. `form` picks the attention
        computation (parallel / chunked / recurrent); all give the same result. return_hidden: the
        last block's output [B, T, E] instead of logits (a loss can then make logits chunk by chunk).
        checkpoint_layers (training): each block's activations are recomputed in backward instead of
        kept, so one block's exist at a time; the returned state then has no autograd history.
        """
        blocks = self.forward_by_blocks(
            input_ids, attention_mask, state, form, logits_to_keep, return_hidden, checkpoint_layers
        )
        while True:
            try:
                next(blocks)
            except StopIteration as done:
                return done.value

    def forward_by_blocks(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        state: ModelState | None = None,
        form: str = "chunked",
        logits_to_keep: int = 0,
        return_hidden: bool = False,
        checkpoint_layers: bool = False,
    ) -> Generator[int, None, tuple[torch.Tensor, ModelState]]:
        """`forward` (the same arguments and result) as a generator that yields between two blocks
        (the number of blocks done): a server pauses a prompt's prefill there to decode a step of
        its running rows (`t2r.inference.prefill_budget`), so that a prefill's pause is a block's
        time, not a whole forward's."""
        batch, _ = input_ids.shape
        if state is None:
            state = self.init_state(batch)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(torch.long)
        # Position of a real token = real tokens before it; a pad repeats its neighbour's (unused).
        positions = (state.seen[:, None] + mask.cumsum(1) - 1).clamp_min(0)

        hidden = self.adapter.embed(self.base, input_ids, positions)
        rotary = self.adapter.rotary(self.base, hidden, positions)
        sink_rotary = self.sink_rotary(hidden, positions)
        window_keys = WindowKeys(self.adapter, self.base, state.seen)
        layers = self.adapter.layers(self.base)
        next_layers: list[Any] = [None] * len(layers)
        recompute = checkpoint_layers and torch.is_grad_enabled()
        for index, (layer, layer_state) in enumerate(zip(layers, state.layers, strict=True)):
            if index:
                yield index
            attention = self.adapter.attention(layer)

            def attend(x: torch.Tensor, attention=attention, layer_state=layer_state, index=index) -> torch.Tensor:
                out, next_state = attention(x, rotary, mask, layer_state, form, sink_rotary, window_keys)
                next_layers[index] = next_state  # set again (same values) when backward recomputes the block
                return out

            if recompute:
                hidden = checkpoint(self.adapter.block, layer, hidden, attend, use_reentrant=False)
            else:
                hidden = self.adapter.block(layer, hidden, attend)
        if logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        next_state = ModelState(tuple(next_layers), state.seen + mask.sum(1))
        if return_hidden:  # the last block's output; `adapter.head` makes logits of any part of it
            return hidden, next_state
        return self.adapter.head(self.base, hidden), next_state

    def step(
        self, input_ids: torch.Tensor, state: ModelState, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ModelState]:
        """One decode step: input_ids [B] -> logits [B, V], through the recurrent form."""
        logits, state = self.forward(
            input_ids[:, None], None if mask is None else mask[:, None], state, form="recurrent"
        )
        return logits[:, 0], state
