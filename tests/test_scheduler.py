"""Continuous batching: requests that join and leave a running batch decode what they decode alone."""

from __future__ import annotations

import pytest
import torch

from t2r.inference.generate import generate
from t2r.inference.sampling import Sampling
from t2r.inference.scheduler import Request, Scheduler
from tests.conftest import VOCAB
from tests.test_model import converted, trained_looking_model


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return trained_looking_model(converted("llama", "hedgehog", tie_qk=False, window=5))


def prompts(count: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(11)
    return [torch.randint(3, VOCAB, (5 + 3 * i,), generator=generator) for i in range(count)]


def test_eight_requests_joining_and_leaving_decode_what_they_decode_alone(model: torch.nn.Module) -> None:
    greedy = Sampling(greedy=True)
    budgets = [12, 5, 9, 14, 3, 8, 11, 6]
    requests = [Request(prompt, budget, greedy) for prompt, budget in zip(prompts(8), budgets, strict=True)]
    scheduler = Scheduler(model, max_batch=4)
    arrivals = {0: requests[:3], 2: requests[3:6], 5: requests[6:]}  # some wait: 4 rows at most
    steps = 0
    while scheduler.busy or arrivals:
        for request in arrivals.pop(steps, []):
            scheduler.submit(request)
        assert len(scheduler.active) <= 4
        scheduler.step()
        steps += 1
    for request in requests:
        alone = generate(model, request.prompt, request.max_new_tokens, greedy)
        assert request.tokens == alone.new_tokens and request.finish == "length"


def test_sampled_requests_keep_their_own_seeds(model: torch.nn.Module) -> None:
    sampling = Sampling(temperature=0.9, top_p=0.95, seed=4)
    first, second = prompts(2)
    alone = Request(first, 10, sampling)
    solo = Scheduler(model, max_batch=1)
    solo.submit(alone)
    while solo.busy:
        solo.step()
    together = [Request(first, 10, sampling), Request(second, 10, Sampling(temperature=1.3, seed=9))]
    shared = Scheduler(model, max_batch=2)
    for request in together:
        shared.submit(request)
    while shared.busy:
        shared.step()
    assert together[0].tokens == alone.tokens


def test_stop_tokens_and_cancelled_rows_leave(model: torch.nn.Module) -> None:
    greedy = Sampling(greedy=True)
    first, second = prompts(2)
    expected = generate(model, first, 10, greedy).new_tokens
    stopping = Request(first, 10, greedy, stop_ids=frozenset({expected[3]}))
    cancelled = Request(second, 50, greedy)
    scheduler = Scheduler(model, max_batch=2)
    scheduler.submit(stopping)
    scheduler.submit(cancelled)
    for _ in range(6):
        scheduler.step()
    assert stopping.finish == "stop" and stopping.tokens == expected[: expected.index(expected[3])]
    scheduler.cancel(cancelled)
    scheduler.step()
    assert cancelled.finish == "cancelled" and not scheduler.active and not scheduler.busy
    assert scheduler.state is None


def test_bad_requests_are_refused() -> None:
    with pytest.raises(ValueError, match="prompt"):
        Request(torch.tensor([], dtype=torch.long), 4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        Request(torch.tensor([5]), 0)
