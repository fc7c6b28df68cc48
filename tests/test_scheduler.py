"""Continuous batching: requests that join and leave a running batch decode what they decode alone."""

from __future__ import annotations

import pytest
import torch

from t2r.inference.generate import generate
from t2r.inference.sampling import Sampling
from t2r.inference.scheduler import Request, Scheduler
from t2r.modeling.fast_decode import FastState
from tests.conftest import VOCAB
from tests.test_model import converted, state_tensors, trained_looking_model


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return trained_looking_model(converted("llama", "hedgehog", tie_qk=False, window=5))


def prompts(count: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(11)
    return [torch.randint(3, VOCAB, (5 + 3 * i,), generator=generator) for i in range(count)]


def steps_until_joined(scheduler: Scheduler, late: Request, running: list[Request]) -> int:
    """Step until `late` joins the batch, asserting that every running row gains a token each step
    (nobody waits for the late prompt's prefill); returns the steps taken."""
    steps = 0
    while late not in scheduler.active:
        before = [len(r.tokens) for r in running]
        scheduler.step()
        steps += 1
        assert [len(r.tokens) for r in running] == [n + 1 for n in before]
    return steps


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


@pytest.mark.parametrize("budget_or_stop", ["length", "stop"])
def test_a_kept_state_is_the_state_after_the_prompt_and_every_token(model: torch.nn.Module, budget_or_stop) -> None:
    prompt = prompts(1)[0]
    expected = generate(model, prompt, 8, Sampling(greedy=True)).new_tokens
    stop = frozenset({expected[5]}) if budget_or_stop == "stop" else frozenset()
    kept = Request(prompt, 8, stop_ids=stop, keep_state=True)
    other = Request(prompts(2)[1], 12)  # a row that goes on after the kept one leaves
    scheduler = Scheduler(model, max_batch=2)
    scheduler.submit(kept)
    scheduler.submit(other)
    while scheduler.busy:
        scheduler.step()
    assert kept.finish == budget_or_stop and kept.final_state is not None
    fed = torch.cat([prompt, torch.tensor(kept.tokens, dtype=torch.long)])[None]
    with torch.no_grad():
        _, reference = model(fed, form="chunked")
    for mine, theirs in zip(kept.final_state.layers, reference.layers, strict=True):
        for a, b in zip(state_tensors(mine), state_tensors(theirs), strict=True):
            # A state built token by token (fast step) vs by the chunked form: sums in another order,
            # fp32; the absolute floor for entries near 0.
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert int(kept.final_state.seen) == fed.shape[1]
    assert other.tokens == generate(model, other.prompt, 12, Sampling(greedy=True)).new_tokens


def test_logprobs_are_the_model_distribution(model: torch.nn.Module) -> None:
    prompt = prompts(1)[0]
    request = Request(prompt, 3, logprobs=2)
    scheduler = Scheduler(model, max_batch=1)
    scheduler.submit(request)
    while scheduler.busy:
        scheduler.step()
    with torch.no_grad():
        logits, _ = model(torch.cat([prompt, torch.tensor(request.tokens)])[None], form="parallel")
    logp = torch.log_softmax(logits[0, len(prompt) - 1 : -1], -1)
    for (chosen, top), token, row in zip(request.token_logprobs, request.tokens, logp, strict=True):
        # log-probs of O(1)-O(10) from the decode step vs the parallel form: rounding ~1e-6, 1e-4 absolute
        assert chosen == pytest.approx(float(row[token]), abs=1e-4) and token == max(top, key=top.get)
        assert len(top) == 2


def test_a_failing_request_fails_alone(model: torch.nn.Module) -> None:
    def broken(token: int) -> None:
        raise RuntimeError("client bug")

    first, second = prompts(2)
    failing, fine = Request(first, 6, on_token=broken), Request(second, 6)
    scheduler = Scheduler(model, max_batch=2)
    scheduler.submit(failing)
    scheduler.submit(fine)
    while scheduler.busy:
        scheduler.step()
    assert failing.finish == "error" and "client bug" in str(failing.error)
    assert fine.tokens == generate(model, second, 6, Sampling(greedy=True)).new_tokens


def test_state_slots_are_allocated_once_and_softmax_layers_join_instead() -> None:
    linear = trained_looking_model(converted("llama", "hedgehog", tie_qk=False, window=5))
    scheduler = Scheduler(linear, max_batch=3)
    assert scheduler.slots is not None
    allocated = scheduler.state_bytes()
    assert allocated == 3 * FastState.from_model_state(linear.init_state(1)).nbytes()
    with_softmax = trained_looking_model(converted("llama", "hedgehog", tie_qk=False, window=5, softmax_layers=(1,)))
    joined = Scheduler(with_softmax, max_batch=3)
    assert joined.slots is None
    requests = [Request(p, 7) for p in prompts(4)]
    for request in requests:
        joined.submit(request)
        scheduler.submit(Request(request.prompt, 7))
    while joined.busy or scheduler.busy:
        joined.step()
        scheduler.step()
        assert scheduler.state_bytes() == allocated
    for request in requests:
        assert request.tokens == generate(with_softmax, request.prompt, 7, Sampling(greedy=True)).new_tokens


def test_a_wave_of_arrivals_is_prefilled_in_one_forward(model: torch.nn.Module, monkeypatch) -> None:
    calls = []
    forward = type(model).forward_by_blocks

    def counted(self, input_ids, *args, **kwargs):
        calls.append(tuple(input_ids.shape))
        return forward(self, input_ids, *args, **kwargs)

    requests = [Request(p, 6) for p in prompts(5)]
    scheduler = Scheduler(model, max_batch=8)
    for request in requests:
        scheduler.submit(request)
    monkeypatch.setattr(type(model), "forward_by_blocks", counted)
    scheduler.step()
    monkeypatch.undo()
    assert calls == [(5, max(len(r.prompt) for r in requests))]  # one left-padded forward for all five
    while scheduler.busy:
        scheduler.step()
    for request in requests:
        assert request.tokens == generate(model, request.prompt, 6, Sampling(greedy=True)).new_tokens


def test_a_vanishing_temperature_is_the_argmax_not_a_nan() -> None:
    """A temperature of 1e-222 (found by fuzzing the server) made logits / T overflow to inf and the
    draw fail; below MIN_TEMPERATURE a draw is the argmax."""
    from t2r.inference.sampling import chooser

    logits = torch.tensor([[1.0, 3.0, 2.0], [30.0, -5.0, 29.9]])
    for temperature in (1e-222, 1e-6):
        assert chooser(Sampling(temperature=temperature))(logits).tolist() == [1, 0]


def test_a_long_prompt_is_prefilled_between_the_decode_steps_of_the_running_rows(model: torch.nn.Module) -> None:
    """A prompt of 4 segments and a bit arrives while 3 rows decode: it is prefilled one segment
    per step, each running row still gains a token every step, and everyone decodes what it
    decodes alone."""
    from t2r.inference.prefill_budget import PREFILL_SEGMENT, PrefillBudget

    class OneSegment(PrefillBudget):  # a piece of one whole segment: the count of steps below is exact
        def seconds(self, decoding: bool) -> float | None:
            return None

    greedy = Sampling(greedy=True)
    running = [Request(prompt, 20, greedy) for prompt in prompts(3)]
    scheduler = Scheduler(model, max_batch=4, budget=OneSegment())
    for request in running:
        scheduler.submit(request)
    scheduler.step()
    long_prompt = torch.randint(3, VOCAB, (4 * PREFILL_SEGMENT + 10,), generator=torch.Generator().manual_seed(3))
    late = scheduler.submit(Request(long_prompt, 5, greedy))
    assert steps_until_joined(scheduler, late, running) == 5  # one segment per step
    while scheduler.busy:
        scheduler.step()
    for request in [*running, late]:
        assert request.tokens == generate(model, request.prompt, request.max_new_tokens, greedy).new_tokens


def test_arrivals_while_a_prompt_is_prefilled_wait_and_go_together(model: torch.nn.Module, monkeypatch) -> None:
    """Under load prompts arrive one at a time: those arriving while a batchable prompt is being
    prefilled wait for it, then share one forward; nobody decodes differently for it."""
    from t2r.inference.prefill_budget import PREFILL_SEGMENT, PrefillBudget

    class OneBlock(PrefillBudget):  # a piece of one block while rows decode: A's prefill spans steps
        def seconds(self, decoding: bool) -> float | None:
            return 0.0 if decoding else None

    calls = []
    forward = type(model).forward_by_blocks

    def counted(self, input_ids, *args, **kwargs):
        calls.append(tuple(input_ids.shape))
        return forward(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(type(model), "forward_by_blocks", counted)
    scheduler = Scheduler(model, max_batch=8, budget=OneBlock())
    first, b, c = (Request(p, 9) for p in prompts(3))
    # a: two segments, so that its prefill spans 2 x blocks steps
    a = Request(torch.randint(3, VOCAB, (PREFILL_SEGMENT + 10,), generator=torch.Generator().manual_seed(4)), 9)
    scheduler.submit(first)
    scheduler.step()  # `first` decodes from now on
    scheduler.submit(a)
    scheduler.step()  # a's prefill starts: one block
    scheduler.submit(b)
    scheduler.step()
    scheduler.submit(c)  # one step later: without the hold, b and c would go one by one
    while a not in scheduler.active:
        scheduler.step()
        assert b in scheduler.waiting and c in scheduler.waiting  # held while a's prompt is prefilled
    while scheduler.busy:
        scheduler.step()
    a_segments = [(1, PREFILL_SEGMENT), (1, 10)]
    assert calls == [(1, len(first.prompt)), *a_segments, (2, max(len(b.prompt), len(c.prompt)))]
    monkeypatch.undo()
    for request in (first, a, b, c):
        assert request.tokens == generate(model, request.prompt, 9, Sampling(greedy=True)).new_tokens
