"""Prompt-prefix states: the state after the first k·block tokens of a prompt, kept in an LRU
cache bounded in bytes, so that a request starting with a cached prefix (a system prompt, a
shared few-shot header) prefills only the rest.

A KV-cache server keeps a prefix as keys and values that grow with its length; here a prefix of
any length is one state of fixed size. Every prompt is prefilled in segments that end at the
multiples of `block` (and at its end), whether or not a prefix is found, so a hit computes exactly
what a miss computes: the same tokens, bit for bit.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Generator
from typing import Any

import torch

from t2r.inference.prefill_budget import PREFILL_SEGMENT, Pace, paced_forward
from t2r.modeling.model import T2RForCausalLM
from t2r.ops.state import ModelState


class PrefixCache:
    """key (a digest of a token prefix) -> the state after it, least recently used evicted first."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes, self.bytes = max_bytes, 0
        self._states: OrderedDict[bytes, ModelState] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._states)

    def get(self, key: bytes) -> ModelState | None:
        with self._lock:
            state = self._states.get(key)
            if state is not None:
                self._states.move_to_end(key)
            return state

    def put(self, key: bytes, state: ModelState) -> None:
        size = state.nbytes()
        if size > self.max_bytes:
            return
        with self._lock:
            if key in self._states:
                self._states.move_to_end(key)
                return
            self._states[key] = state
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, old = self._states.popitem(last=False)
                self.bytes -= old.nbytes()


def prefix_keys(ids: torch.Tensor, block: int, salt: bytes = b"") -> list[tuple[int, bytes]]:
    """(k·block, digest of salt and ids[:k·block]) for every multiple of `block` strictly inside ids
    [T]. The salt (a tenant and its `cache_salt`) keeps one tenant's prefixes from another's."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(len(salt).to_bytes(4, "big") + salt)
    keys = []
    for end in range(block, len(ids), block):
        digest.update(ids[end - block : end].to(torch.int64).numpy().tobytes())
        keys.append((end, digest.copy().digest()))
    return keys


# A prompt is prefilled in segments of at most PREFILL_SEGMENT tokens, each paced (paused between two
# blocks: `t2r.inference.prefill_budget`): between two pieces the server decodes a step of the
# running rows, and a scored prompt (echo + logprobs) holds [<= PREFILL_SEGMENT, V] logits, never [T, V].
PrefillSteps = Generator[int, float | None, tuple[torch.Tensor, ModelState, int]]


def segmented_prefill_steps(
    model: T2RForCausalLM,
    ids: torch.Tensor,
    block: int,
    cache: PrefixCache | None,
    state: ModelState | None = None,
    each_segment: Callable[[torch.Tensor, int], None] | None = None,
    salt: bytes = b"",
) -> PrefillSteps:
    """Prefill ids [T] from `state` in segments of at most PREFILL_SEGMENT tokens that end at
    multiples of `block` too: first it yields 0 (primed, no work done), then each send(seconds) runs
    a piece of about that many seconds (at least one block; None: one segment) and yields the tokens
    done, except after the last piece.

    Without a starting state, the longest cached prefix is used (unless `each_segment`: every
    position's logits are needed) and the states at the boundaries passed are cached (`salt`: the
    requester's namespace). With `each_segment(logits [n, V], start)`, every segment's logits go
    there as they are made, and none is kept. Returns the last position's logits [1, V], the state
    after ids, and how many tokens came from the cache.
    """
    keys = prefix_keys(ids, block, salt) if state is None and block > 0 else []
    start = 0
    if cache is not None and keys and each_segment is None:
        for end, key in reversed(keys):
            found = cache.get(key)
            if found is not None:
                start, state = end, found
                break
        if start:
            cache.hits += 1
        else:
            cache.misses += 1
    cached = start
    key_at = dict(keys)
    boundaries = sorted(end for end in key_at if end > start)
    logits = None
    pace = Pace((yield 0))
    while start < len(ids):
        if logits is not None and pace.spent(segment_done=True):
            pace.restart((yield start))  # the caller may decode a step before the next piece
        end = min([len(ids), start + PREFILL_SEGMENT, *(b for b in boundaries if b > start)])
        segment = ids[start:end][None].to(model.device)
        logits, state = yield from paced_forward(
            model, segment, state, pace, start, form="chunked", logits_to_keep=0 if each_segment else 1
        )
        if each_segment is not None:
            each_segment(logits[0], start)
        if cache is not None and end in key_at:
            cache.put(key_at[end], state)
        start = end
    assert state is not None and logits is not None
    return logits[0, -1:], state, cached


def segmented_prefill(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, ModelState, int]:
    """`segmented_prefill_steps` run to its end at once (its arguments and its result)."""
    steps = segmented_prefill_steps(*args, **kwargs)
    next(steps)
    while True:
        try:
            steps.send(None)
        except StopIteration as done:
            return done.value
