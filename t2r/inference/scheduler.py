"""Continuous batching over the recurrent state: the decode loop a server runs.

Every active sequence advances one token per `step()`, all in one batched fast step. A submitted
request waits until a row is free (`max_batch`), is prefilled through the chunked form one piece
per step (about half a decode step's time, paused between two blocks: `prefill_budget`; the
running rows decode between two pieces, so a long prompt does not stall them; short prompts
arriving together share one forward) and joins the running
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
from t2r.inference.prefill_budget import PREFILL_SEGMENT, Pace, PrefillBudget, paced_forward
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


# prefill(model, request): a generator that prefills the prompt in pieces. It first yields 0 before
# any work (the scheduler primes it with next()); then each send(seconds) runs a piece of about that
# many seconds (at least one block; None: one whole segment, `t2r.inference.prefill_budget`) and
# yields the prompt tokens done, so that the scheduler decodes a step of the running rows between
# two pieces; it returns (logits [1, V] after the prompt, the state after it).
PrefillSteps = Generator[int, float | None, tuple[torch.Tensor, ModelState]]
Prefill = Callable[[T2RForCausalLM, Request], PrefillSteps]
# The scheduler's own: one prefill of n requests' prompts, returning logits [n, V] and their n rows.
RowsPrefill = Generator[int, float | None, tuple[torch.Tensor, FastState]]


def plain_prefill(model: T2RForCausalLM, request: Request) -> PrefillSteps:
    """The prompt through the chunked form, in segments of PREFILL_SEGMENT tokens, paced."""
    ids, state, logits = request.prompt[None].to(model.device), request.start_state, None
    start = 0
    pace = Pace((yield 0))
    while start < ids.shape[1]:
        if logits is not None and pace.spent(segment_done=True):
            pace.restart((yield start))
        end = min(ids.shape[1], start + PREFILL_SEGMENT)
        logits, state = yield from paced_forward(
            model, ids[:, start:end], state, pace, start, form="chunked", logits_to_keep=1
        )
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
        # Admitted, prompts partly prefilled: the requests prefilled together (one, or a wave of
        # short ones left-padded) and their prefill, which returns logits [n, V] and their n rows' state.
        self.prefilling: list[tuple[list[Request], RowsPrefill]] = []
        self.budget = PrefillBudget() if budget is None else budget  # each segment's size
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
        for request in [*self.waiting, *self.active, *(r for group, _ in self.prefilling for r in group)]:
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
        """Start prefilling the waiting requests that fit: those `batchable` says may share one
        left-padded forward do (a wave of arrivals costs one batched prefill, not one per request;
        they wait while such a prefill runs, to go together after it), the rest go through
        `prefill` one by one; then a piece of every prefill."""
        admitted: list[Request] = []
        held = len(self.active) + sum(len(group) for group, _ in self.prefilling)
        # While a prefill of batchable prompts runs, batchable arrivals wait for it to end and then
        # go together: one forward for many prompts costs little more than one for one prompt (most
        # of a short prompt's forward is fixed cost), and under load prompts arrive one at a time.
        hold_batchable = any(all(map(self.batchable, group)) for group, _ in self.prefilling)
        held_back: list[Request] = []
        while self.waiting and held + len(admitted) < self.max_batch:
            request = self.waiting.popleft()
            if request.finish is not None:
                continue
            (held_back if hold_batchable and self.batchable(request) else admitted).append(request)
        self.waiting.extendleft(reversed(held_back))
        together = [r for r in admitted if self.batchable(r)] if len(admitted) > 1 else []
        groups = [together] if len(together) > 1 else []
        groups += [[r] for r in admitted if not (len(together) > 1 and r in together)]
        for group in groups:
            try:
                steps = self._prefill_together(group) if len(group) > 1 else self._prefill_alone(group[0])
                next(steps)  # primed: it waits for its first piece's seconds
                self.prefilling.append((group, steps))
            except Exception as error:
                for request in group:
                    request.fail(error)
        self._advance_prefills()

    def _prefill_alone(self, request: Request) -> RowsPrefill:
        logits, state = yield from self.prefill(self.model, request)
        return logits, FastState.from_model_state(state)

    def _prefill_together(self, requests: list[Request]) -> RowsPrefill:
        """Short prompts from the empty state, left-padded into one forward, paced as one prompt."""
        ids, mask = left_padded([r.prompt for r in requests])
        device = self.model.device
        pace = Pace((yield 0))
        logits, state = yield from paced_forward(
            self.model, ids.to(device), None, pace, 0, attention_mask=mask.to(device), form="chunked", logits_to_keep=1
        )
        return logits[:, -1], FastState.from_model_state(state)

    def _advance_prefills(self) -> None:
        """A piece of every prefill; the requests of a prefill done join the batch. Between two
        pieces the running rows decode a step: a long prompt does not stall them."""
        still: list[tuple[list[Request], RowsPrefill]] = []
        seconds = self.budget.seconds(decoding=bool(self.active))
        for group, steps in self.prefilling:
            if all(request.finish is not None for request in group):  # cancelled while prefilled
                steps.close()
                continue
            try:
                steps.send(seconds)
                still.append((group, steps))
            except StopIteration as finished:
                logits, fresh = finished.value
                for row, request in enumerate(group):
                    if request.finish is None:
                        index = torch.tensor([row], device=fresh.seen.device)
                        self._join(request, logits[row : row + 1], fresh if len(group) == 1 else fresh.select(index))
            except Exception as error:
                for request in group:
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
