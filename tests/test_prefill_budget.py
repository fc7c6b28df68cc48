"""The chunked prefill's time budget (t2r.inference.prefill_budget) and the scheduler following it.

Whether a long prompt keeps the running streams' pace is a timing, measured by the load test
(`scripts/serve_load.py`, BENCHMARKS.md "serve-load"), not asserted here: these tests pin the policy
(what the measurements allow) and that the scheduler prefills exactly what it allows."""

from __future__ import annotations

import pytest
import torch

from t2r.inference.generate import generate
from t2r.inference.prefill_budget import PREFILL_SEGMENT, PrefillBudget
from t2r.inference.sampling import Sampling
from t2r.inference.scheduler import Request, Scheduler
from tests.conftest import VOCAB
from tests.test_model import converted, state_tensors, trained_looking_model
from tests.test_scheduler import prompts, steps_until_joined


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return trained_looking_model(converted("llama", "hedgehog", tie_qk=False, window=5))


def test_a_piece_takes_about_half_a_decode_step() -> None:
    budget = PrefillBudget()
    assert budget.seconds(decoding=False) is None  # nobody to stall: one whole segment
    assert budget.seconds(decoding=True) == 0.0  # nothing measured yet: one block
    budget.observe_step(0.040)
    assert budget.seconds(decoding=True) == pytest.approx(0.020)  # 0.5 x 40 ms
    budget.observe_step(1.0)  # a slow step (averaged: 0.8 x 40 ms + 0.2 x 1 s = 232 ms)
    assert budget.seconds(decoding=True) == pytest.approx(0.5 * 0.232)
    with pytest.raises(ValueError):
        PrefillBudget(share=0)


class OneBlockWhileDecoding(PrefillBudget):
    """A piece of one block while rows decode, whatever is measured: step counts are exact."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[bool] = []

    def seconds(self, decoding: bool) -> float | None:
        self.asked.append(decoding)
        return 0.0 if decoding else None


def test_the_scheduler_prefills_one_piece_between_two_steps(model: torch.nn.Module) -> None:
    """A long prompt arriving while rows decode is prefilled a block at a time (each running row
    still gains a token every step, and nothing waits for a whole segment), and decodes what it
    decodes alone."""
    greedy = Sampling(greedy=True)
    budget = OneBlockWhileDecoding()
    scheduler = Scheduler(model, max_batch=4, budget=budget)
    running = [scheduler.submit(Request(prompt, 40, greedy)) for prompt in prompts(3)]
    scheduler.step()
    long_prompt = torch.randint(3, VOCAB, (PREFILL_SEGMENT + 10,), generator=torch.Generator().manual_seed(3))
    late = scheduler.submit(Request(long_prompt, 5, greedy))
    blocks = len(model.attentions)
    assert blocks > 1
    assert steps_until_joined(scheduler, late, running) == 2 * blocks  # two segments, a block per step
    assert budget.step_seconds is not None and True in budget.asked  # it measured the steps
    while scheduler.busy:
        scheduler.step()
    for request in [*running, late]:
        assert request.tokens == generate(model, request.prompt, request.max_new_tokens, greedy).new_tokens


def test_the_forward_by_blocks_is_the_forward(model: torch.nn.Module) -> None:
    """forward_by_blocks yields between two blocks (one fewer than the blocks) and returns exactly
    what forward returns: the pause is in the driving, not in the maths."""
    ids = torch.randint(3, VOCAB, (2, 23), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        logits, state = model(ids, form="chunked")
        blocks = model.forward_by_blocks(ids, form="chunked")
        yielded = []
        while True:
            try:
                yielded.append(next(blocks))
            except StopIteration as done:
                paused_logits, paused_state = done.value
                break
    assert yielded == list(range(1, len(model.attentions)))
    assert torch.equal(logits, paused_logits)
    assert torch.equal(state.seen, paused_state.seen)
    for layer, paused in zip(state.layers, paused_state.layers, strict=True):
        for a, b in zip(state_tensors(layer), state_tensors(paused), strict=True):
            assert torch.equal(a, b)
