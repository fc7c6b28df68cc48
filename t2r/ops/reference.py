"""The specification of causal linear attention, in plain fp32 PyTorch.

    out_t = sum_{s<=t} (phi(q_t) . phi(k_s)) v_s  /  (sum_{s<=t} phi(q_t) . phi(k_s) + eps)

with the sums also running over everything folded into `initial_state`. Every faster form
(`ops.chunked`, a compiled step, ...) is tested against these two functions: outputs, final state
and gradients. Inputs are already feature-mapped (non-negative); padding is masked by zeroing
phi(k) before the call, which removes a padded key from the numerator *and* the normaliser.
"""

from __future__ import annotations

import torch

from t2r.ops.state import LinearAttentionState


def _start(q: torch.Tensor, v: torch.Tensor, state: LinearAttentionState | None) -> LinearAttentionState:
    if state is not None:
        return state
    batch, heads, _, feature_dim = q.shape
    return LinearAttentionState.zeros(batch, heads, feature_dim, v.shape[-1], q.device)


def no_tokens(q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The output of an empty sequence: [B, H, 0, D] in v's dtype (H = q's heads). Every form gives
    it for T = 0, with the state it was given, as the parallel form does by construction."""
    return v.new_zeros(q.shape[0], q.shape[1], 0, v.shape[-1])


def causal_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    initial_state: LinearAttentionState | None = None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, LinearAttentionState]:
    """Parallel (quadratic) form.

    q, k: [B, H, T, F] feature-mapped queries and keys; v: [B, H, T, D].
    Returns out [B, H, T, D] in v's dtype and the final state (fp32).
    """
    state = _start(q, v, initial_state)
    qf, kf, vf = q.float(), k.float(), v.float()
    scores = torch.einsum("bhtf,bhsf->bhts", qf, kf).tril()  # [B, H, T, T], causal
    numerator = scores @ vf + torch.einsum("bhtf,bhfd->bhtd", qf, state.kv)
    denominator = scores.sum(-1) + torch.einsum("bhtf,bhf->bht", qf, state.k_sum)
    out = numerator / (denominator.unsqueeze(-1) + eps)
    final_state = LinearAttentionState(
        kv=state.kv + torch.einsum("bhtf,bhtd->bhfd", kf, vf),
        k_sum=state.k_sum + kf.sum(2),
    )
    return out.to(v.dtype), final_state


def read_linear_state(phi_q: torch.Tensor, kv: torch.Tensor, k_sum: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One query token against a linear state: phi_q [B, H, F]; kv [B, L, F, D], k_sum [B, L, F]
    with L dividing H (query head h reads state head h // (H / L): GQA, without repeating the state).

    Returns the numerator phi(q) . kv [B, H, D] and the normaliser phi(q) . k_sum [B, H], fp32.
    """
    batch, heads, features = phi_q.shape
    linear_heads = kv.shape[1]
    grouped = phi_q.float().reshape(batch, linear_heads, heads // linear_heads, features)  # [B, L, H / L, F]
    numerator = torch.matmul(grouped, kv).reshape(batch, heads, -1)
    denominator = (grouped * k_sum[:, :, None]).sum(-1).reshape(batch, heads)
    return numerator, denominator


def linear_attention_step_(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: LinearAttentionState, eps: float = 1e-6
) -> torch.Tensor:
    """One token of the recurrent form, the state updated in place (the decode path's form).

    q, k: [B, H, F]; v: [B, H, D]; state.kv [B, H, F, D] and state.k_sum [B, H, F] fp32, written.
    Returns out [B, H, D] in v's dtype.
    """
    kf = k.float()
    state.kv.addcmul_(kf.unsqueeze(-1), v.float().unsqueeze(-2))
    state.k_sum.add_(kf)
    numerator, denominator = read_linear_state(q, state.kv, state.k_sum)
    return (numerator / (denominator.unsqueeze(-1) + eps)).to(v.dtype)


def linear_attention_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: LinearAttentionState,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, LinearAttentionState]:
    """One token of the recurrent form: `linear_attention_step_` on a copy of the state.

    q, k: [B, H, F]; v: [B, H, D]. Returns out [B, H, D] in v's dtype and the next state.
    """
    next_state = LinearAttentionState(state.kv.clone(), state.k_sum.clone())
    return linear_attention_step_(q, k, v, next_state, eps), next_state


def recurrent_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    initial_state: LinearAttentionState | None = None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, LinearAttentionState]:
    """The recurrent form over a whole sequence: `linear_attention_step` looped over time.

    Same signature and shapes as `causal_linear_attention`; with T == 1 it is one decode step.
    """
    state = _start(q, v, initial_state)
    outputs = []
    for t in range(q.shape[2]):
        out, state = linear_attention_step(q[:, :, t], k[:, :, t], v[:, :, t], state, eps)
        outputs.append(out)
    return (torch.stack(outputs, dim=2) if outputs else no_tokens(q, v)), state
