"""The t2r settings of a converted model: a small frozen dataclass saved as JSON beside the weights."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from t2r.errors import UsageError
from t2r.ops import GLOBAL_SELECTS

# "none": no linear part at all: the teacher's softmax over the sinks and the window only (the
# training-free sliding-window baseline, StreamingLLM; needs a window).
FEATURE_MAPS = ("elu", "rfa", "t2r", "hedgehog", "none")
# Whose linear state: one per query head, or one per key/value head shared by its query group (GQA).
LINEAR_HEADS = ("query", "kv")
WEIGHT_FORMATS = ("fp32", "bf16", "int8", "int4")  # how decoding may store the projections (t2r.modeling.quantize)
# The softmax window in tokens of the default hybrid (0 is pure linear attention).
DEFAULT_WINDOW = 64
# The linear part's half-life in tokens when a window is used and none is given (see T2RConfig).
DEFAULT_HALF_LIFE = 512
# Attention sinks kept in the softmax part when a window is used and none are given (see T2RConfig).
DEFAULT_SINKS = 4


@dataclass(frozen=True)
class T2RConfig:
    """How the softmax attention of a teacher is replaced.

    feature_map: one of FEATURE_MAPS; "none" keeps no linear part: exact softmax over the sinks and
        the last `window` tokens, everything older dropped (the sliding-window baseline; no training).
    feature_dim: size of the learned / random projection (t2r, rfa, hedgehog); `None` picks the
        map's default (32 for t2r, 64 random features for rfa, head_dim for hedgehog). ELU+1 keeps
        head_dim.
    tie_qk: one feature map shared by queries and keys (the T2R paper) or one each.
    eps: added to the fp32 denominator; feature maps are non-negative, so it is never 0/0.
    chunk_size: block length of the chunked form (memory O(T * chunk_size)).
    seed: seeds the initial feature-map parameters (and the fixed random features of rfa).
    base_model: how the teacher was named when converting (`--model`), kept for `eval --teacher`.
    window: exact softmax attention over the last `window` tokens, linear attention for older ones
        (the LoLCATs hybrid); 0 is pure linear attention. Memory stays constant either way.
    rotary_features: the feature maps see q and k with rotary positions applied; False (the
        default with a window) feeds them q and k before positions, which makes the linear part
        position-free, so it runs unchanged past the teacher's context; the window keeps the order.
    softmax_layers: indices of layers kept as exact softmax attention (a KV cache that grows).
    half_life: with a window, the linear part forgets: a key's weight halves every `half_life`
        tokens after it leaves the window (0: never forgets, the plain LoLCATs sum; None:
        DEFAULT_HALF_LIFE with a window, 0 without). Bounded, the linear state holds as much as it
        held in training at any length, instead of growing with the length.
    linear_heads: "query": a feature map and a linear state per query head; "kv": one per key/value
        head, read by every query head of its group through that head's map (GQA for the linear
        part: H / G times fewer state bytes; with a window only).
    sinks: with a window, the first `sinks` tokens of a sequence stay in the softmax part for good
        (attention sinks: the teacher parks much of its attention there); None: DEFAULT_SINKS with
        a window, 0 without. Constant memory: `sinks` keys and values per layer.
    keep_local: a layer the teacher already limits to a sliding window (Gemma 2/3's local layers,
        Mistral's `sliding_window`) stays its exact softmax over that window, its keys and values in
        a ring buffer of the window's size (constant memory, nothing to train); only the layers
        that see every token are converted. False converts every layer.
    global_cache: N slots per layer and key/value head of a sparse global cache (LoLA,
        `ops.global_cache`): of the keys that leave the window, the N the linear state recalls worst
        stay in the softmax part (N keys and values, and the keys as the feature map sees them,
        per head: constant memory). Needs a window and a linear part; training-free: a setting of
        inference, it can be given to a trained model at load time (0: none).
    global_select: how a prefill fills the global cache: "recall" (token by token, the keys the
        linear state recalls worst, as decoding does) or "prompt" (the keys the prompt's last 32
        queries attend to most, SnapKV's choice, `ops.global_select`; a parallel prefill).
    """

    feature_map: str = "t2r"
    feature_dim: int | None = None
    tie_qk: bool = True
    eps: float = 1e-6
    chunk_size: int = 64
    seed: int = 0
    base_model: str | None = None
    window: int = DEFAULT_WINDOW
    rotary_features: bool = False
    softmax_layers: tuple[int, ...] = ()
    half_life: int | None = None
    sinks: int | None = None
    linear_heads: str = "query"
    keep_local: bool = False
    global_cache: int = 0
    global_select: str = "recall"

    def __post_init__(self) -> None:
        object.__setattr__(self, "softmax_layers", tuple(sorted(set(self.softmax_layers))))
        if self.window < 0:
            raise UsageError(f"window must be >= 0, got {self.window}")
        if self.feature_map == "none" and not self.window:
            raise UsageError("--feature-map none keeps no linear part: it needs a window (--window > 0)")
        if self.half_life is None:
            has_linear_part = self.window and self.feature_map != "none"
            object.__setattr__(self, "half_life", DEFAULT_HALF_LIFE if has_linear_part else 0)
        if self.half_life and self.feature_map == "none":
            raise UsageError("--half-life needs a linear part; --feature-map none has none")
        if self.half_life < 0:
            raise UsageError(f"half life must be >= 0 tokens, got {self.half_life}")
        if self.half_life and not self.window:
            raise UsageError("--half-life needs a window (--window > 0): pure linear attention never forgets")
        if self.sinks is None:
            object.__setattr__(self, "sinks", DEFAULT_SINKS if self.window else 0)
        if self.sinks < 0:
            raise UsageError(f"sinks must be >= 0 tokens, got {self.sinks}")
        if self.sinks and not self.window:
            raise UsageError("--sinks needs a window (--window > 0): sinks are softmax slots beside the window")
        if self.linear_heads not in LINEAR_HEADS:
            raise UsageError(f"unknown linear heads {self.linear_heads!r}; choose one of {', '.join(LINEAR_HEADS)}")
        if self.linear_heads == "kv" and not self.window:
            raise UsageError("--linear-heads kv needs a window (--window > 0)")
        if self.global_cache < 0:
            raise UsageError(f"global cache must be >= 0 slots, got {self.global_cache}")
        if self.global_cache and (not self.window or self.feature_map == "none"):
            raise UsageError("--global-cache needs a window and a linear part (to hold what it recalls worst)")
        if self.global_select not in GLOBAL_SELECTS:
            raise UsageError(
                f"unknown global cache selection {self.global_select!r}; choose one of {', '.join(GLOBAL_SELECTS)}"
            )
        if any(index < 0 for index in self.softmax_layers):
            raise UsageError("softmax layer indices must be >= 0")
        if self.feature_map not in FEATURE_MAPS:
            raise UsageError(f"unknown feature map {self.feature_map!r}; choose one of {', '.join(FEATURE_MAPS)}")
        if self.feature_dim is not None and self.feature_dim < 1:
            raise UsageError(f"feature dim must be a positive integer, got {self.feature_dim}")
        if self.chunk_size < 1:
            raise UsageError(f"chunk size must be a positive integer, got {self.chunk_size}")
        if not self.eps > 0:
            raise UsageError(f"eps must be positive, got {self.eps}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> T2RConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {key: value for key, value in values.items() if key in known}
        # Models saved before the hybrid existed are pure linear with features after rotary.
        values.setdefault("window", 0)
        values.setdefault("rotary_features", True)
        values.setdefault("half_life", 0)
        values.setdefault("sinks", 0)
        values["softmax_layers"] = tuple(values.get("softmax_layers", ()))
        return cls(**values)

    def decay(self) -> float | None:
        """The per-token factor of the linear state, 2^(-1 / half_life), or None (no forgetting)."""
        return 2.0 ** (-1.0 / self.half_life) if self.half_life else None
