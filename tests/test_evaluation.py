"""Perplexity, KL and agreement against a hand computation on two different models."""

from __future__ import annotations

import math

import torch

from t2r.evaluation.perplexity import evaluate
from tests.conftest import VOCAB, tiny_model


def sharpened(model: torch.nn.Module, factor: float) -> torch.nn.Module:
    """Scale the (untied) head so that the distributions are peaked: KL(p||q) and KL(q||p) then differ."""
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(factor)
    return model


def test_kl_is_teacher_to_model_and_agreement_is_top1_as_computed_by_hand() -> None:
    """Two different models, one window of 40 tokens (every token but the first scored): the eval's
    KL equals sum_v p_teacher (log p_teacher - log p_model) averaged over tokens, not the reverse;
    perplexity and agreement equal theirs too."""
    teacher = sharpened(tiny_model("mistral", seed=1), 30.0)  # peaked; the model's flatter: KL is asymmetric
    model = tiny_model("mistral", seed=1)  # the teacher's weights, perturbed: it agrees, not always
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.005)
    model = sharpened(model, 5.0)
    ids = torch.randint(3, VOCAB, (40,), generator=torch.Generator().manual_seed(0))
    result = evaluate(model, ids, seq_len=40, stride=40, teacher=teacher, progress=False)

    with torch.no_grad():
        log_p = teacher(input_ids=ids[None]).logits[0, :-1].log_softmax(-1)  # the teacher's, per target
        log_q = model(input_ids=ids[None]).logits[0, :-1].log_softmax(-1)
    forward = (log_p.exp() * (log_p - log_q)).sum(-1).mean().item()
    reverse = (log_q.exp() * (log_q - log_p)).sum(-1).mean().item()
    nll = -log_q.gather(-1, ids[1:, None]).mean().item()
    agreement = (log_p.argmax(-1) == log_q.argmax(-1)).float().mean().item()

    assert abs(forward - reverse) > 0.5 * forward  # the direction is plain on these two models
    assert result.tokens == 39
    # The KL here is O(1) nats (a teacher sharpened 30x): relative 1e-4 is ~1e-4 nats, 1000x what two
    # fp32 sums over the vocabulary in another order differ by. log-perplexity is a mean NLL of ~5 whose
    # rounding is ~1e-6: relative 1e-5 on the perplexity leaves 10x.
    assert math.isclose(result.kl, forward, rel_tol=1e-4)
    assert math.isclose(result.perplexity, math.exp(nll), rel_tol=1e-5)
    assert math.isclose(result.top1_agreement, agreement, abs_tol=1e-6)  # fp32 mean on our side
    assert 0 < agreement < 1  # a figure that could come out otherwise


def test_a_model_scored_against_itself_has_zero_kl_and_full_agreement() -> None:
    model = sharpened(tiny_model("mistral", seed=3), 10.0)
    ids = torch.randint(3, VOCAB, (50,), generator=torch.Generator().manual_seed(1))
    result = evaluate(model, ids, seq_len=20, stride=20, teacher=model, progress=False)
    assert abs(result.kl) < 1e-6 and result.top1_agreement == 1.0
