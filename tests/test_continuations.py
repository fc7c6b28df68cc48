"""Greedy continuations and candidate log-likelihoods: the same answers through a teacher's KV cache
and through a converted model's state (every layer kept as softmax: the teacher's own maths)."""

from __future__ import annotations

import copy

import torch

from t2r.inference.continuations import continuation_logprobs, greedy_tokens
from t2r.modeling.config import T2RConfig
from t2r.modeling.convert import convert
from tests.conftest import tiny_model

CANDIDATES = [[5], [7, 9], [11, 12, 13], [40, 41, 42, 43]]


def models() -> tuple[torch.nn.Module, torch.nn.Module]:
    teacher = tiny_model("llama", seed=3)
    exact = convert(copy.deepcopy(teacher), T2RConfig(softmax_layers=(0, 1)))
    return teacher, exact


def test_teacher_and_exact_conversion_agree() -> None:
    teacher, exact = models()
    prompt = torch.randint(3, 300, (37,), generator=torch.Generator().manual_seed(0))
    assert greedy_tokens(teacher, prompt, 12) == greedy_tokens(exact, prompt, 12)
    torch.testing.assert_close(
        continuation_logprobs(teacher, prompt, CANDIDATES),
        continuation_logprobs(exact, prompt, CANDIDATES, batch_size=3),
        atol=1e-4,  # sums of a few fp32 log-probs of O(1)-O(10), batched vs alone: ~1e-6 apart
        rtol=1e-5,
    )


def test_logprobs_are_the_sum_of_next_token_logprobs() -> None:
    teacher, _ = models()
    prompt = torch.randint(3, 300, (20,), generator=torch.Generator().manual_seed(1))
    candidate = CANDIDATES[3]
    full = torch.cat([prompt, torch.tensor(candidate)])
    logits = teacher(full[None]).logits[0].log_softmax(-1)
    expected = sum(logits[len(prompt) - 1 + i, token] for i, token in enumerate(candidate))
    torch.testing.assert_close(continuation_logprobs(teacher, prompt, [candidate])[0], expected, atol=1e-4, rtol=0)


def test_hybrid_model_scores_from_one_state() -> None:
    """A windowed converted model scores each candidate as if it ran prompt + candidate alone."""
    model = convert(tiny_model("llama", seed=4), T2RConfig(feature_map="hedgehog", window=8, sinks=2))
    prompt = torch.randint(3, 300, (30,), generator=torch.Generator().manual_seed(2))
    batched = continuation_logprobs(model, prompt, CANDIDATES, batch_size=4)
    for score, candidate in zip(batched, CANDIDATES, strict=True):
        full = torch.cat([prompt, torch.tensor(candidate)])
        logits = model(full[None])[0][0].log_softmax(-1)
        expected = sum(logits[len(prompt) - 1 + i, token] for i, token in enumerate(candidate))
        torch.testing.assert_close(score, expected, atol=1e-4, rtol=0)
    stop = greedy_tokens(model, prompt, 6)[2]
    assert stop not in greedy_tokens(model, prompt, 6, stop_ids=frozenset({stop}))
