"""`t2r eval --long`: one stream through the recurrent state, scored per position bucket."""

from __future__ import annotations

import math

import torch

from t2r.evaluation.long_context import make_buckets, score_long
from t2r.modeling.config import T2RConfig
from t2r.modeling.convert import convert
from tests.conftest import VOCAB, tiny_model


def stream(length: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (length,), generator=torch.Generator().manual_seed(4))


def test_buckets_cover_every_target_once() -> None:
    buckets = make_buckets(300, (0, 50, 120, 1000))
    assert [(b.begin, b.end) for b in buckets] == [(1, 50), (50, 120), (120, 300)]


@torch.no_grad()
def test_stream_in_segments_scores_like_one_pass() -> None:
    """Segments carry the hybrid state exactly: the summed loss equals one forward over it all."""
    model = convert(tiny_model("llama"), T2RConfig(feature_map="hedgehog", window=5, chunk_size=8))
    ids = stream(200)
    result = score_long(model, ids, segment=13, edges=(0, 50, 120), progress=False)
    assert sum(b.model.tokens for b in result.buckets) == len(ids) - 1
    logits, _ = model(ids[None], form="parallel")
    expected = torch.nn.functional.cross_entropy(logits[0, :-1], ids[1:], reduction="sum").item()
    # ~200 token NLLs of ~5 each; segments (chunked form) vs one parallel pass differ by ~1e-6 per
    # logit: relative 1e-5 of the ~1000-nat sum is 5e-5 a token, ~10x that.
    assert math.isclose(sum(b.model.nll for b in result.buckets), expected, rel_tol=1e-5)
    assert len(set(result.state_bytes)) == 1  # the state never grows


@torch.no_grad()
def test_teacher_runs_within_its_context_only() -> None:
    """A model whose layers are all kept softmax is the teacher: equal loss, agreement 1, KL 0; past
    the teacher's context there is nothing to compare."""
    teacher = tiny_model("llama")
    model = convert(tiny_model("llama"), T2RConfig(softmax_layers=(0, 1)))
    teacher.config.max_position_embeddings = 100
    result = score_long(model, stream(180), segment=50, edges=(0, 40, 100), teacher=teacher, progress=False)
    first, second, beyond = (b.to_dict() for b in result.buckets)
    for bucket in (first, second):
        # Softmax layers through the adapter compute the teacher's sums in the teacher's order (logits
        # equal to ~1e-6): relative 1e-5 on perplexity; the KL is ~0, so it gets an absolute bound.
        assert math.isclose(bucket["perplexity"], bucket["teacher_perplexity"], rel_tol=1e-5)
        assert bucket["top1_agreement"] == 1.0 and abs(bucket["kl"]) < 1e-5
    assert "teacher_perplexity" not in beyond and "kl" not in beyond
    assert result.teacher_context == 100
