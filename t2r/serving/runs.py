"""One HTTP request's choices in flight: their jobs in the engine, their text as it streams, and
what the response reports (text, finish reason, logprobs, token counts)."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import torch

from t2r.inference.sampling import Sampling
from t2r.inference.scheduler import Request
from t2r.ops.state import ModelState
from t2r.serving.engine import Engine, Job
from t2r.serving.protocol import SamplingFields, internal_error
from t2r.serving.text import TextStream


@dataclass
class Choice:
    """One choice's progress: its job, its text stream, and its logprobs so far."""

    index: int
    job: Job
    stream: TextStream
    finish: str | None = None
    logprobs: list[tuple[int, float, dict[int, float]]] = field(default_factory=list)  # (token, logp, top)
    sent_tokens: int = 0

    @property
    def tokens(self) -> list[int]:
        return self.job.request.tokens


@dataclass
class Update:
    """What one event changed: `text` newly safe to send for choice `index`; `finish` once it ended."""

    index: int
    text: str
    tokens: list[tuple[int, float, dict[int, float]]]
    finish: str | None = None


class Run:
    """Submits one job per (prompt, n) pair and turns the engine's events into Updates."""

    def __init__(
        self,
        engine: Engine,
        tokenizer: Any,
        prompts: list[list[int]],
        body: SamplingFields,
        max_tokens: int,
        stop_ids: frozenset[int],
        logprobs: int | None = None,
        score_prompt: int | None = None,
        start_state: ModelState | None = None,
        session: tuple[str, str, int] | None = None,  # (name, kind, tokens already in start_state)
        cache_salt: bytes = b"",
    ) -> None:
        self.engine, self.tokenizer = engine, tokenizer
        self.prompts = prompts
        self.events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        stop = body.stop_strings()
        seed = body.seed if body.seed is not None else secrets.randbits(31)
        self.choices: list[Choice] = []
        for prompt_index, prompt in enumerate(prompts):
            for sample in range(body.n):
                index = prompt_index * body.n + sample
                sampling = Sampling(greedy=body.temperature == 0, temperature=body.temperature or 1.0,
                                    top_p=body.top_p, seed=seed + index)  # fmt: skip
                request = Request(
                    torch.tensor(prompt, dtype=torch.long),
                    max_tokens,
                    sampling,
                    frozenset() if body.ignore_eos else stop_ids,
                    start_state=start_state,
                    logprobs=logprobs,
                    keep_state=session is not None,
                )
                job = Job(request, loop, self.events, score_prompt=score_prompt, index=index, cache_salt=cache_salt)
                if session is not None:
                    job.session, job.session_kind, job.session_tokens = session
                self.choices.append(Choice(index, job, TextStream(tokenizer, stop)))

    def start(self) -> None:
        for choice in self.choices:
            self.engine.submit(choice.job)

    def cancel(self) -> None:
        """The client went away: every choice still running leaves the batch."""
        for choice in self.choices:
            if choice.finish is None:
                self.engine.cancel(choice.job)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def completion_tokens(self) -> int:
        return sum(c.sent_tokens for c in self.choices)

    @property
    def cached_tokens(self) -> int:
        return sum(c.job.cached_tokens for c in self.choices[:: max(1, len(self.choices) // len(self.prompts))])

    def ended(self) -> bool:
        """Every choice's job has ended in the engine (a session's state is kept by then)."""
        return getattr(self, "running", None) == 0

    async def updates(self) -> AsyncIterator[Update]:
        """Until every choice has ended. A choice that failed raises OpenAIError (500)."""
        self.running = len(self.choices)
        while self.running:
            index, kind, payload = await self.events.get()
            choice = self.choices[index]
            if kind == "token":
                if choice.finish is not None:
                    continue  # decoded after a stop string, before the cancel arrived
                token, logprob = payload
                text = choice.stream.push(token)
                choice.sent_tokens += 1
                new = [] if logprob is None else [(token, *logprob)]
                choice.logprobs += new
                if choice.stream.stopped:
                    choice.finish = "stop"
                    self.engine.cancel(choice.job, "stop", keep_tokens=choice.sent_tokens)
                yield Update(index, text, new)
                continue
            finish, error = payload
            self.running -= 1
            if finish == "error":
                raise internal_error(error)
            if choice.finish is None:
                choice.finish = "stop" if finish == "stop" else "length" if finish == "length" else finish
                yield Update(index, choice.stream.flush(), [], choice.finish)
            else:
                yield Update(index, "", [], choice.finish)
