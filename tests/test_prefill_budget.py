"""The chunked prefill's token budget (t2r.inference.prefill_budget) and the scheduler following it.

Whether a long prompt keeps the running streams' pace is a timing, measured by the load test
(`scripts/serve_load.py`, BENCHMARKS.md "serve-load"), not asserted here: these tests pin the policy
(what the measurements allow) and that the scheduler prefills exactly what it allows."""

from __future__ import annotations

import pytest
import torch

from t2r.inference.generate import generate
from t2r.inference.prefill_budget import PREFILL_SEGMENT, SMALLEST_SEGMENT, PrefillBudget
from t2r.inference.sampling import Sampling
from t2r.inference.scheduler import Request, Scheduler
from tests.conftest import VOCAB
from tests.test_model import converted, trained_looking_model
from tests.test_scheduler import prompts, steps_until_joined


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return trained_looking_model(converted("llama", "hedgehog", tie_qk=False, window=5))


def test_a_segment_takes_about_half_a_decode_step() -> None:
    budget = PrefillBudget()
    assert budget.tokens(decoding=False) == PREFILL_SEGMENT  # nobody to stall
    assert budget.tokens(decoding=True) == SMALLEST_SEGMENT  # nothing measured yet
    budget.observe_step(0.040)
    budget.observe_prefill(100, 0.050)  # 2,000 tokens/s
    assert budget.tokens(decoding=True) == 40  # 0.5 x 40 ms x 2,000 tokens/s
    assert budget.tokens(decoding=True, prompts=2) == 20  # shared by the prompts being prefilled
    assert budget.tokens(decoding=True, prompts=4) == SMALLEST_SEGMENT  # never below the smallest
    budget.observe_step(1.0)  # a slow step (averaged: 0.8 x 40 ms + 0.2 x 1 s = 232 ms)
    assert budget.tokens(decoding=True) == min(PREFILL_SEGMENT, int(0.5 * 0.232 * 2000))
    with pytest.raises(ValueError):
        PrefillBudget(smallest=0)


class FixedWhileDecoding(PrefillBudget):
    """A budget of `size` tokens while rows decode, whatever is measured."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size, self.asked = size, []

    def tokens(self, decoding: bool, prompts: int = 1) -> int:
        self.asked.append(decoding)
        return self.size if decoding else self.largest


def test_the_scheduler_prefills_what_the_budget_allows_between_two_steps(model: torch.nn.Module) -> None:
    """A long prompt arriving while rows decode goes in segments of the budget's size, one per
    step (each running row still gains a token every step), and decodes what it decodes alone."""
    greedy = Sampling(greedy=True)
    budget = FixedWhileDecoding(40)
    scheduler = Scheduler(model, max_batch=4, budget=budget)
    running = [scheduler.submit(Request(prompt, 30, greedy)) for prompt in prompts(3)]
    scheduler.step()
    long_prompt = torch.randint(3, VOCAB, (170,), generator=torch.Generator().manual_seed(3))
    late = scheduler.submit(Request(long_prompt, 5, greedy))
    assert steps_until_joined(scheduler, late, running) == -(-170 // 40)  # ceil: a segment of 40 tokens per step
    assert budget.step_seconds is not None and budget.tokens_per_second is not None  # it measured both
    while scheduler.busy:
        scheduler.step()
    for request in [*running, late]:
        assert request.tokens == generate(model, request.prompt, request.max_new_tokens, greedy).new_tokens
