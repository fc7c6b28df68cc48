"""Continuous batching over the recurrent state: the decode loop a server runs.

Every active sequence advances one token per `step()`, all in one batched fast step. A submitted
request waits until a row is free (`max_batch`), is prefilled alone through the chunked form and
joins the running batch (`FastState.join`); a row that emits a stop token, reaches its budget or is
cancelled leaves at once (`FastState.select`). Each request keeps its own sampling (its own seeded
generator), so a request's tokens do not depend on what else is being served: greedy requests
decode exactly what `t2r.inference.generate` decodes for them alone.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from t2r.inference.sampling import Sampling, chooser
from t2r.modeling.fast_decode import FastState, fast_step
from t2r.modeling.model import T2RForCausalLM

Step = Callable[[T2RForCausalLM, torch.Tensor, FastState], torch.Tensor]
GREEDY = Sampling(greedy=True)


@dataclass(eq=False)
class Request:
    """prompt [T] token ids; `tokens` grows as the request is served; `finish` is set when it ends:
    "stop" (a stop token, not kept), "length" (max_new_tokens reached) or "cancelled"."""

    prompt: torch.Tensor
    max_new_tokens: int
    sampling: Sampling = GREEDY
    stop_ids: frozenset[int] = frozenset()
    on_token: Callable[[int], None] | None = None
    tokens: list[int] = field(default_factory=list)
    finish: str | None = None

    def __post_init__(self) -> None:
        if len(self.prompt) == 0:
            raise ValueError("a request needs a prompt of at least one token")
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        self.choose = chooser(self.sampling)


class Scheduler:
    """The active rows' state and next-token logits [B, V], and the queue of waiting requests."""

    def __init__(self, model: T2RForCausalLM, max_batch: int, step: Step = fast_step) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.model, self.max_batch, self.decode = model, max_batch, step
        self.waiting: deque[Request] = deque()
        self.active: list[Request] = []
        self.state: FastState | None = None
        self.logits: torch.Tensor | None = None

    def submit(self, request: Request) -> Request:
        self.waiting.append(request)
        return request

    def cancel(self, request: Request) -> None:
        """End a request now (a client that went away): it leaves the batch at the next step."""
        if request.finish is None:
            request.finish = "cancelled"
        if request in self.waiting:
            self.waiting.remove(request)

    @property
    def busy(self) -> bool:
        return bool(self.active or self.waiting)

    @torch.no_grad()
    def step(self) -> None:
        """Admit waiting requests, emit one token for every active row, then decode the next
        logits of the rows still running."""
        self._admit()
        if not self.active:
            return
        assert self.state is not None and self.logits is not None
        tokens = []
        for row, request in enumerate(self.active):
            token = int(request.choose(self.logits[row : row + 1])[0]) if request.finish is None else -1
            tokens.append(token)
            if request.finish is not None:
                continue
            if token in request.stop_ids:
                request.finish = "stop"
                continue
            request.tokens.append(token)
            if request.on_token is not None:
                request.on_token(token)
            if len(request.tokens) >= request.max_new_tokens:
                request.finish = "length"
        keep = [row for row, request in enumerate(self.active) if request.finish is None]
        if len(keep) < len(self.active):
            self.active = [self.active[row] for row in keep]
            if not keep:
                self.state, self.logits = None, None
                return
            index = torch.tensor(keep, device=self.logits.device)
            self.state = self.state.select(index)
            tokens = [tokens[row] for row in keep]
        ids = torch.tensor(tokens, device=self.logits.device)
        self.logits = self.decode(self.model, ids, self.state)

    def _admit(self) -> None:
        while self.waiting and len(self.active) < self.max_batch:
            request = self.waiting.popleft()
            if request.finish is not None:
                continue
            ids = request.prompt[None].to(self.model.device)
            logits, state = self.model(ids, form="chunked", logits_to_keep=1)
            fresh = FastState.from_model_state(state)
            if self.state is None:
                self.state, self.logits = fresh, logits[:, -1]
            else:
                assert self.logits is not None
                self.state = FastState.join([self.state, fresh])
                self.logits = torch.cat([self.logits, logits[:, -1]])
            self.active.append(request)
