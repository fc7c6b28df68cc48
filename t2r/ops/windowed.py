"""The specification of hybrid attention: exact softmax over a sliding window (and a few sinks),
linear attention before.

For a query at position t, keys at t-W+1 .. t (the window, the query's own token included) are
weighted by softmax scores and every older key by linear-attention scores, in one normalised sum
(LoLCATs, Zhang et al. 2024):

    a_s = exp(cap(q_t . k_s * scale) - m_t)   s in the window or a sink, m_t = max over those
    l_s = phi(q_t) . phi(k_s)                 s older than the window (and the linear state)
    out_t = (g * sum a_s v_s + (1 - g) * sum l_s v_s) / (g * sum a_s + (1 - g) * sum l_s + eps)

with a learned share g per head; cap(x) = x, or c * tanh(x / c) with `softcap` c (Gemma 2's
attention soft-capping). With a decay lambda per head (`decay`, None = 1), the linear
part forgets: key s counts lambda^(t - W - s) for the query at t, so it weighs 1 as it leaves the
window and its weight halves every half-life after that; the linear state's total mass is then
bounded (at most 1 / (1 - lambda) keys' worth) at any length, as it is in training, instead of
growing with every token while the window's stays at W. The window counts token slots: a padded slot sits in it but is
masked, which with left or right padding is the same as "the last W real tokens".

Sinks (S >= 0 slots): the first S real tokens of a sequence stay in the softmax part for good
(StreamingLLM's attention sinks, Xiao et al. 2023): pretrained models park much of their
attention on the first tokens, which a window loses after W tokens and a forgetting linear state
after a few half-lives. A sink sits in its window slot as an invalid slot (so it is counted once
and never enters the linear state) and in a sink slot of the state.

The state (`HybridAttentionState`) holds the sinks, the last W keys and values, in time order, and
the linear state of everything older: its size never grows. All forms here and in
`windowed_chunked` share

    op(q, k, v, phi_q, linear_keys, valid, initial_state, *, feature_map_k, window_share, scale, eps,
       decay, sink_queries, softcap) -> (out, final_state)

q [B, H, T, D] and k, v [B, G, T, D] are what the softmax sees (positions applied; G kv heads, H a
multiple of G); phi_q [B, H, T, F] and linear_keys [B, G, T, D] are what the linear part sees;
valid [B, T] bool; window_share [H] in (0, 1). The linear state has L heads, L = H (a state per
query head) or L = G (one per key/value head, read by every query head of its group: 1 / (H / G)
of the bytes); L is the initial state's. feature_map_k maps keys [B, L, S, D] -> [B, L, S, F];
decay [L] in (0, 1] or None. The number of sinks is the state's (`initial_state.sinks`).
sink_queries (q's shape, or None = q) score the sinks: past the teacher's context the model passes
the queries rotated at its last position, so that a sink is never further from a query than the
teacher has seen (the window's offsets stay below W anyway).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from t2r.ops.state import HybridAttentionState, LinearAttentionState

FeatureMapFn = Callable[[torch.Tensor], torch.Tensor]


def capped(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Attention soft-capping (Gemma 2): c * tanh(scores / c), or the scores themselves."""
    return scores if softcap is None else torch.tanh(scores / softcap) * softcap


def repeat_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, G, S, D] -> [B, H, S, D]: query head h reads kv head h // (H / G), as in GQA."""
    groups = heads // x.shape[1]
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def key_features(
    linear_keys: torch.Tensor, valid: torch.Tensor, feature_map_k: FeatureMapFn, heads: int
) -> torch.Tensor:
    """phi of keys [B, G, S, D] at the linear state's L heads, fp32, zero where invalid: [B, L, S, F]."""
    return feature_map_k(repeat_heads(linear_keys, heads)).float() * valid[:, None, :, None]


def per_query_head(decay: torch.Tensor | None, heads: int) -> torch.Tensor | None:
    """decay [L] -> [H]: what each query head reads the linear state of its group with."""
    if decay is None or decay.shape[0] == heads:
        return decay
    return decay.repeat_interleave(heads // decay.shape[0])


def combine(
    window_num: torch.Tensor,
    window_den: torch.Tensor,
    linear_num: torch.Tensor,
    linear_den: torch.Tensor,
    window_share: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """Numerators [B, H, ..., D] and denominators [B, H, ...] of both parts -> out [B, H, ..., D]."""
    g = window_share.float().view(1, -1, *[1] * (window_den.dim() - 2))  # [1, H, 1, ...]
    numerator = g[..., None] * window_num + (1 - g[..., None]) * linear_num
    denominator = g * window_den + (1 - g) * linear_den
    return numerator / (denominator.unsqueeze(-1) + eps)


def decay_powers(decay: torch.Tensor, exponent: torch.Tensor) -> torch.Tensor:
    """decay [H], exponent [...] (integers; only entries >= 0 are used) -> decay^exponent [H, ...].

    Negative exponents (entries that are masked anyway) are clamped to 0 so that nothing overflows.
    """
    log_decay = decay.float().log().view(-1, *[1] * exponent.dim())
    return (exponent.clamp(min=0).float() * log_decay).exp()


def decayed_final_linear(
    linear: LinearAttentionState, phi_leaving: torch.Tensor, values_leaving: torch.Tensor, decay: torch.Tensor | None
) -> LinearAttentionState:
    """The linear state after L slots left the window, one per step, oldest first.

    phi_leaving [B, H, L, F], values_leaving [B, H, L, D]: the state decays once per step, so the
    initial state counts decay^L and leaving slot s (0-based) counts decay^(L - 1 - s).
    """
    if decay is None:
        kv = linear.kv + torch.einsum("bhsf,bhsd->bhfd", phi_leaving, values_leaving)
        return LinearAttentionState(kv, linear.k_sum + phi_leaving.sum(2))
    steps = phi_leaving.shape[2]
    age = steps - 1 - torch.arange(steps, device=phi_leaving.device)
    weighted = phi_leaving * decay_powers(decay, age)[None, :, :, None]  # [B, H, L, F]
    initial = decay_powers(decay, torch.tensor(steps, device=phi_leaving.device))[None]  # [1, H]
    return LinearAttentionState(
        kv=initial[..., None, None] * linear.kv + torch.einsum("bhsf,bhsd->bhfd", weighted, values_leaving),
        k_sum=initial[..., None] * linear.k_sum + weighted.sum(2),
    )


EXP_FLOOR = -80.0  # see masked_softmax_weights


def masked_softmax_weights(scores: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """exp(scores - max over allowed) where allowed, else 0; rows with nothing allowed give 0."""
    masked = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    peak = masked.amax(-1, keepdim=True).detach()  # the stabiliser is a constant: no gradient needed
    # The vector exp is ~10x slower where its result underflows (below -87.3: denormal or 0) than
    # elsewhere. So: -inf where not allowed (exp gives exactly 0, fast, and a zero gradient), and
    # allowed differences floored at EXP_FLOOR: a weight under exp(-80) = 1.8e-35 of the peak's 1 is
    # below fp32's resolution of any sum that holds the peak (its ulp is 1.2e-7), so no output changes.
    shifted = (scores - peak).clamp_min(EXP_FLOOR)
    return shifted.masked_fill(~allowed, float("-inf")).exp()


@dataclass(frozen=True)
class Sinks:
    """The sinks after T new tokens, and which new tokens are sinks.

    keys, values [B, G, S, D]; valid [B, S]; visible_from [B, S]: the first new token (0..T-1)
    whose query sees sink slot s (-1 for a sink from before, T for a slot still empty);
    window_valid [B, T]: the new tokens' validity as window slots (real and not a sink).
    """

    keys: torch.Tensor
    values: torch.Tensor
    valid: torch.Tensor
    visible_from: torch.Tensor
    window_valid: torch.Tensor

    def visible(self, query_index: torch.Tensor) -> torch.Tensor:
        """query_index [...] (0-based new-token indices) -> [B, ..., S] bool."""
        shape = (self.valid.shape[0], *[1] * query_index.dim(), self.valid.shape[1])
        return query_index[None, ..., None] >= self.visible_from.view(shape)


def take_sinks(state: HybridAttentionState, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor) -> Sinks:
    """The first S real tokens of each row become sinks: k, v [B, G, T, D], valid [B, T] bool.

    A row's real tokens are ranked after the sinks it already has; slot j takes the rank-(j + 1)
    token, written by a one-hot product (differentiable, no data-dependent indexing).
    """
    sinks, length = state.sinks, valid.shape[1]
    rank = state.sink_valid.sum(1, keepdim=True) + valid.long().cumsum(1)  # [B, T], 1-based
    is_sink = valid & (rank <= sinks)
    place = is_sink[:, :, None] & (rank[:, :, None] - 1 == torch.arange(sinks, device=k.device))  # [B, T, S]
    weights = place.to(state.sink_keys.dtype)
    taken = place.any(1)  # [B, S]
    first = (place * torch.arange(length, device=k.device)[:, None]).sum(1)  # [B, S]
    never = torch.full_like(first, length)
    return Sinks(
        keys=state.sink_keys + torch.einsum("bts,bgtd->bgsd", weights, k.to(weights.dtype)),
        values=state.sink_values + torch.einsum("bts,bgtd->bgsd", weights, v.to(weights.dtype)),
        valid=state.sink_valid | taken,
        visible_from=torch.where(state.sink_valid, -1, torch.where(taken, first, never)),
        window_valid=valid & ~is_sink,
    )


def softmax_with_sinks(
    scores: torch.Tensor, allowed: torch.Tensor, sink_scores: torch.Tensor, sink_allowed: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unnormalised softmax weights of window [..., K] and sink [..., S] keys under one stabiliser."""
    both = masked_softmax_weights(
        torch.cat([scores, sink_scores], -1),
        torch.cat([allowed, sink_allowed], -1).expand(*scores.shape[:-1], -1),
    )
    return both.split([scores.shape[-1], sink_scores.shape[-1]], dim=-1)


def leading_empty_slots(valid: torch.Tensor) -> int:
    """valid [B, W] -> how many leading window slots are empty (invalid) in every row."""
    used = valid.any(0)  # [W]
    return int(used.long().argmax()) if bool(used.any()) else valid.shape[1]


def no_global_cache(state: HybridAttentionState) -> None:
    """The parallel and chunked forms take no global cache: whether a key stays cached depends on
    every earlier choice (`ops.global_cache`), so such a state goes token by token (`ops.dispatch`)."""
    if state.global_slots:
        raise ValueError("a state with a global cache advances one token at a time (the recurrent form)")


def windowed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    phi_q: torch.Tensor,
    linear_keys: torch.Tensor,
    valid: torch.Tensor,
    initial_state: HybridAttentionState,
    *,
    feature_map_k: FeatureMapFn,
    window_share: torch.Tensor,
    scale: float,
    eps: float = 1e-6,
    decay: torch.Tensor | None = None,
    sink_queries: torch.Tensor | None = None,
    softcap: float | None = None,
    skip_empty: bool = False,
) -> tuple[torch.Tensor, HybridAttentionState]:
    """Parallel (quadratic) form over the window slots of the state followed by the T new tokens.

    Returns out [B, H, T, D] in v's dtype and the final state. skip_empty: the state's leading
    window slots that are empty in every row (a window not yet filled: every prompt's first
    segment) are left out of the scores; they add nothing (masked in the softmax, zero features in
    the linear part), so the result is the same in fewer operations (a fresh 64-token prompt: 64
    key slots per query instead of W + 64). It reads the valid slots (a sync on an accelerator);
    not while compiling.
    """
    state = initial_state
    no_global_cache(state)
    heads, length, window = q.shape[1], q.shape[2], state.window
    sinks = take_sinks(state, k, v, valid.bool())
    # One sequence of S = W + T slots: the state's window (indices 0..W-1), then the new tokens.
    keys = torch.cat([state.keys, k.to(state.keys.dtype)], dim=2)
    values = torch.cat([state.values, v.to(state.values.dtype)], dim=2)
    all_linear_keys = torch.cat([state.linear_keys, linear_keys.to(state.linear_keys.dtype)], dim=2)
    all_valid = torch.cat([state.valid, sinks.window_valid], dim=1)  # [B, S]
    # Scored slots: first .. S - 1 (first > 0 only with skip_empty: the leading slots empty in every row).
    first = leading_empty_slots(state.valid) if skip_empty and not torch.compiler.is_compiling() else 0
    values_h = repeat_heads(values[:, :, first:], heads).float()  # [B, H, S - first, D]
    linear_heads = state.linear.kv.shape[1]  # L: H, or G for a state per key/value head
    phi_k = key_features(all_linear_keys[:, :, first:], all_valid[:, first:], feature_map_k, linear_heads)
    read_decay = per_query_head(decay, heads)

    query_slot = torch.arange(length, device=q.device)[:, None] + window  # [T, 1]
    key_slot = torch.arange(first, window + length, device=q.device)[None, :]  # [1, S - first]
    causal = key_slot <= query_slot
    in_window = key_slot > query_slot - window
    key_ok = all_valid[:, None, None, first:]  # [B, 1, 1, S - first]

    scored_keys = repeat_heads(keys[:, :, first:], heads).float()
    scores = capped(torch.einsum("bhtd,bhsd->bhts", q.float(), scored_keys) * scale, softcap)
    sink_q = q if sink_queries is None else sink_queries
    sink_scores = torch.einsum("bhtd,bhsd->bhts", sink_q.float(), repeat_heads(sinks.keys, heads).float()) * scale
    sink_scores = capped(sink_scores, softcap)
    sink_ok = sinks.visible(torch.arange(length, device=q.device))[:, None]  # [B, 1, T, S]
    soft, soft_sink = softmax_with_sinks(scores, causal & in_window & key_ok, sink_scores, sink_ok)
    lin = torch.einsum("bhtf,bhsf->bhts", phi_q.float(), repeat_heads(phi_k, heads)) * (causal & ~in_window)
    from_state = torch.einsum("bhtf,bhfd->bhtd", phi_q.float(), repeat_heads(state.linear.kv, heads))
    from_state_den = torch.einsum("bhtf,bhf->bht", phi_q.float(), repeat_heads(state.linear.k_sum, heads))
    if read_decay is not None:
        # Key slot s counts decay^(i - W - s) for the query at slot i; the state, decay^(t + 1).
        lin = lin * decay_powers(read_decay, query_slot - window - key_slot)  # [H, T, S] broadcast
        state_weight = decay_powers(read_decay, torch.arange(1, length + 1, device=q.device))  # [H, T]
        from_state, from_state_den = from_state * state_weight[..., None], from_state_den * state_weight
    out = combine(
        soft @ values_h + soft_sink @ repeat_heads(sinks.values, heads).float(),
        soft.sum(-1) + soft_sink.sum(-1),
        lin @ values_h + from_state,
        lin.sum(-1) + from_state_den,
        window_share,
        eps,
    )
    # The last W slots stay in the window; the T slots before them leave it for the linear state
    # (a skipped slot as zero features: it adds nothing, but it is a step of the decay).
    skipped = min(first, length)
    phi_leaving = F.pad(phi_k[:, :, : length - skipped], (0, 0, skipped, 0))
    values_leaving = repeat_heads(values, linear_heads)[:, :, :length].float()
    final_state = HybridAttentionState(
        linear=decayed_final_linear(state.linear, phi_leaving, values_leaving, decay),
        keys=keys[:, :, length:],
        values=values[:, :, length:],
        linear_keys=all_linear_keys[:, :, length:],
        valid=all_valid[:, length:],
        sink_keys=sinks.keys,
        sink_values=sinks.values,
        sink_valid=sinks.valid,
        global_keys=state.global_keys,
        global_values=state.global_values,
        global_features=state.global_features,
        global_valid=state.global_valid,
    )
    return out.to(v.dtype), final_state
