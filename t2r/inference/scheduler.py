"""Continuous batching over the recurrent state: the decode loop a server runs.

Every active sequence advances one token per `step()`, all in one batched fast step. A submitted
request waits until a row is free (`max_batch`), is prefilled through the chunked form one segment
per step (as many tokens as `PrefillBudget` allows: about half a decode step's time; the running
rows decode between two segments, so a long prompt does not stall them; short prompts arriving
together share one forward) and joins the running
batch; a row that emits a stop token, reaches its budget or is cancelled leaves at once. Each
request keeps its own sampling (its own seeded generator), so a request's tokens do not depend on
what else is being served: greedy requests decode exactly what `t2r.inference.generate` decodes
for them alone.

The rows' state lives in `StateSlots` allocated once for `max_batch` rows (a model with layers
kept as softmax, whose KV caches grow, joins and selects FastStates instead). A failure inside one
request (its prefill, its sampling, its token callback) ends that request with finish "error";
the other rows go on.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Generator
from dataclasses import dataclass, field

import torch

from t2r.inference.generate import left_padded
from t2r.inference.prefill_budget import PREFILL_SEGMENT, PrefillBudget
from t2r.inference.sampling import Sampling, chooser
from t2r.inference.state_slots import StateSlots
from t2r.modeling.fast_decode import FastState, fast_step
from t2r.modeling.model import T2RForCausalLM
from t2r.ops.state import ModelState

Step = Callable[[T2RForCausalLM, torch.Tensor, FastState], torch.Tensor]
GREEDY = Sampling(greedy=True)


@dataclass(eq=False)
class Request:
    """prompt [T] token ids, fed after `start_state` (None: from the empty state).

    `tokens` grows as the request is served; `finish` is set when it ends: "stop" (a stop token,
    not kept), "length" (max_new_tokens reached), "cancelled" or "error" (`error` says why).
    logprobs=k records, per new token, its log-probability and the k most likely tokens'
    (`token_logprobs`). keep_state=True leaves the state after every kept token (the last one
    fed too) in `final_state`: a conversation continues from it.
    """

    prompt: torch.Tensor
    max_new_tokens: int
    sampling: Sampling = GREEDY
    stop_ids: frozenset[int] = frozenset()
    on_token: Callable[[int], None] | None = None
    start_state: ModelState | None = None
    logprobs: int | None = None
    keep_state: bool = False
    tokens: list[int] = field(default_factory=list)
    token_logprobs: list[tuple[float, dict[int, float]]] = field(default_factory=list)
    finish: str | None = None
    error: BaseException | None = None
    final_state: ModelState | None = None

    def __post_init__(self) -> None:
        if len(self.prompt) == 0:
            raise ValueError("a request needs a prompt of at least one token")
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        self.choose = chooser(self.sampling)

    def fail(self, error: BaseException) -> None:
        self.finish, self.error = "error", error


# prefill(model, request): a generator that prefills the prompt in segments. It first yields 0
# before any work (the scheduler primes it with next()); then each send(n) prefills one segment of
# at most n tokens (None: PREFILL_SEGMENT) and yields the tokens done, so that the scheduler decodes
# a step of the running rows between two segments; it returns (logits [1, V] after the prompt, the
# state after it).
PrefillSteps = Generator[int, int | None, tuple[torch.Tensor, ModelState]]
Prefill = Callable[[T2RForCausalLM, Request], PrefillSteps]


def plain_prefill(model: T2RForCausalLM, request: Request) -> PrefillSteps:
    """The prompt through the chunked form, in segments of the sizes sent."""
    ids, state, logits = request.prompt[None].to(model.device), request.start_state, None
    start = 0
    budget = yield 0
    while start < ids.shape[1]:
        if logits is not None:
            budget = yield start
        end = min(ids.shape[1], start + (budget or PREFILL_SEGMENT))
        with torch.no_grad():
            logits, state = model(ids[:, start:end], state=state, form="chunked", logits_to_keep=1)
        start = end
    assert logits is not None and state is not None
    return logits[:, -1], state


def top_logprobs(logits: torch.Tensor, token: int, count: int) -> tuple[float, dict[int, float]]:
    """logits [V] -> (log p(token), {id: log p} of the `count` most likely ids)."""
    logp = torch.log_softmax(logits.float(), -1)
    values, ids = logp.topk(count) if count > 0 else (logp[:0], logp[:0].long())
    return float(logp[token]), dict(zip(ids.tolist(), values.tolist(), strict=True))


class Scheduler:
    """The active rows' state and next-token logits [B, V], and the queue of waiting requests."""

    def __init__(
        self,
        model: T2RForCausalLM,
        max_batch: int,
        step: Step = fast_step,
        prefill: Prefill = plain_prefill,
        batchable: Callable[[Request], bool] = lambda request: request.start_state is None,
        budget: PrefillBudget | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.model, self.max_batch, self.decode, self.prefill = model, max_batch, step, prefill
        self.batchable = batchable  # requests that may be prefilled together (left-padded) instead
        self.waiting: deque[Request] = deque()
        self.active: list[Request] = []
        self.prefilling: list[tuple[Request, PrefillSteps]] = []  # admitted, prompt partly prefilled
        self.budget = PrefillBudget() if budget is None else budget  # each segment's size
        self._prefilled: dict[Request, int] = {}  # tokens of each prompt prefilled so far
        self.logits: torch.Tensor | None = None
        empty = FastState.from_model_state(model.init_state(1))
        # The state of `max_batch` rows, allocated once (None: softmax layers, states are joined).
        self.slots = StateSlots(empty, max_batch) if StateSlots.fits(empty) else None
        self._joined: FastState | None = None
        self.steps, self.step_seconds = 0, 0.0  # batched decode steps run, and their total time

    @property
    def state(self) -> FastState | None:
        if self.slots is not None:
            return self.slots.view() if self.slots.active else None
        return self._joined

    def state_bytes(self) -> int:
        """Bytes of the rows' state: all `max_batch` slots (allocated once), or the joined rows'."""
        if self.slots is not None:
            return self.slots.nbytes()
        return 0 if self._joined is None else self._joined.nbytes()

    def submit(self, request: Request) -> Request:
        self.waiting.append(request)
        return request

    def cancel(self, request: Request, finish: str = "cancelled") -> None:
        """End a request now (a client that went away, a stop string): it leaves at the next step."""
        if request.finish is None:
            request.finish = finish
        if request in self.waiting:
            self.waiting.remove(request)

    def fail_all(self, error: BaseException) -> None:
        """Every request held, waiting or decoding, fails with `error` and leaves (after a fault the
        batch's state cannot be trusted); the scheduler is empty and ready for new requests."""
        for request in [*self.waiting, *self.active, *(r for r, _ in self.prefilling)]:
            if request.finish is None:
                request.fail(error)
        self.waiting.clear()
        self.prefilling.clear()
        if self.active:
            if self.logits is None:  # a fault between a step's parts: nothing to keep anyway
                self.active, self._joined = [], None
                if self.slots is not None:
                    self.slots.active = 0
            else:
                self._keep([])

    @property
    def busy(self) -> bool:
        return bool(self.active or self.waiting or self.prefilling)

    @torch.no_grad()
    def step(self) -> None:
        """Admit waiting requests, emit one token for every active row, then decode the next
        logits of the rows still running (and of rows that keep their state: their last token)."""
        self._admit()
        if not self.active:
            return
        assert self.logits is not None
        tokens = []
        for row, request in enumerate(self.active):
            tokens.append(self._emit(request, self.logits[row]) if request.finish is None else -1)
        # Rows that ended by length and keep their state take part in this last decode: it feeds
        # their last token, and its state is theirs to keep.
        for row, request in enumerate(self.active):
            if request.keep_state and request.finish == "stop":
                request.final_state = self._row_state(row)
        feed = [row for row, r in enumerate(self.active) if r.finish is None or (r.keep_state and r.finish == "length")]
        self._keep(feed)
        if not self.active:
            return
        ids = torch.tensor([tokens[row] for row in feed], device=self.model.device)
        started = time.perf_counter()
        try:
            self.logits = self.decode(self.model, ids, self.state)  # type: ignore[arg-type]
        except Exception as error:  # the batch cannot go on: every row fails, the loop does not
            for request in self.active:
                request.fail(error)
            self._keep([])
            return
        elapsed = time.perf_counter() - started
        self.step_seconds += elapsed
        self.budget.observe_step(elapsed)
        self.steps += 1
        for row, request in enumerate(self.active):
            if request.finish == "length":  # kept its state: it leaves now
                request.final_state = self._row_state(row)
        self._keep([row for row, r in enumerate(self.active) if r.finish is None])

    def _emit(self, request: Request, logits: torch.Tensor) -> int:
        """Choose a row's next token and hand it on; -1 when the row ends without a token to feed."""
        try:
            token = int(request.choose(logits[None])[0])
            if token in request.stop_ids:
                request.finish = "stop"
                return -1
            if request.logprobs is not None:
                request.token_logprobs.append(top_logprobs(logits, token, request.logprobs))
            request.tokens.append(token)
            if request.on_token is not None:
                request.on_token(token)
        except Exception as error:
            request.fail(error)
            return -1
        if len(request.tokens) >= request.max_new_tokens and request.finish is None:
            request.finish = "length"
        return token

    def _row_state(self, row: int) -> ModelState:
        state = self.state
        assert state is not None
        return state.select(torch.tensor([row], device=state.seen.device)).to_model_state()

    def _keep(self, rows: list[int]) -> None:
        """Only these active rows (ascending) stay, in their order."""
        if len(rows) == len(self.active):
            return
        assert self.logits is not None
        self.active = [self.active[row] for row in rows]
        if self.slots is not None:
            self.slots.keep(rows)
        elif rows:
            assert self._joined is not None
            self._joined = self._joined.select(torch.tensor(rows, device=self.logits.device))
        else:
            self._joined = None
        self.logits = self.logits[rows] if rows else None

    def _admit(self) -> None:
        """Prefill the waiting requests that fit: those `batchable` says may share one left-padded
        forward do (a wave of arrivals costs one batched prefill, not one per request), the rest
        go through `prefill` one by one."""
        admitted: list[Request] = []
        while self.waiting and len(self.active) + len(self.prefilling) + len(admitted) < self.max_batch:
            request = self.waiting.popleft()
            if request.finish is None:
                admitted.append(request)
        together = [r for r in admitted if self.batchable(r)] if len(admitted) > 1 else []
        if len(together) > 1:
            try:
                ids, mask = left_padded([r.prompt for r in together])
                logits, state = self.model(ids.to(self.model.device), mask.to(self.model.device), form="chunked",
                                           logits_to_keep=1)  # fmt: skip
                fresh = FastState.from_model_state(state)
                for row, request in enumerate(together):
                    index = torch.tensor([row], device=fresh.seen.device)
                    self._join(request, logits[row : row + 1, -1], fresh.select(index))
            except Exception as error:
                for request in together:
                    request.fail(error)
        for request in admitted:
            if request in together and len(together) > 1:
                continue
            try:
                steps = self.prefill(self.model, request)
                next(steps)  # primed: it waits for its first segment's size
                self.prefilling.append((request, steps))
                self._prefilled[request] = 0
            except Exception as error:
                request.fail(error)
        self._advance_prefills()

    def _advance_prefills(self) -> None:
        """One segment of every prompt being prefilled; a prompt done joins the batch. Between two
        segments the running rows decode a step: a long prompt does not stall them."""
        still: list[tuple[Request, PrefillSteps]] = []
        size = self.budget.tokens(decoding=bool(self.active), prompts=len(self.prefilling))
        for request, steps in self.prefilling:
            if request.finish is not None:  # cancelled while its prompt was prefilled
                steps.close()
                self._prefilled.pop(request, None)
                continue
            started, before = time.perf_counter(), self._prefilled[request]
            try:
                done = steps.send(size)
                self.budget.observe_prefill(done - before, time.perf_counter() - started)
                self._prefilled[request] = done
                still.append((request, steps))
            except StopIteration as finished:
                self._prefilled.pop(request)
                self.budget.observe_prefill(len(request.prompt) - before, time.perf_counter() - started)
                logits, state = finished.value
                self._join(request, logits, FastState.from_model_state(state))
            except Exception as error:
                self._prefilled.pop(request, None)
                request.fail(error)
        self.prefilling = still

    def _join(self, request: Request, logits: torch.Tensor, fresh: FastState) -> None:
        """A prefilled request (logits [1, V], its one-row state) takes the next row."""
        if self.slots is not None:
            self.slots.add(fresh)
        else:
            self._joined = fresh if self._joined is None else FastState.join([self._joined, fresh])
        self.logits = logits if self.logits is None else torch.cat([self.logits, logits])
        self.active.append(request)
