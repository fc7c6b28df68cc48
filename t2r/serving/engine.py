"""The decode loop of the server, on one thread, and its hand-over to the web server's asyncio.

Requests come in through a thread-safe inbox and are served by `Scheduler` (continuous batching
over the recurrent state); every emitted token and every end is posted back to the request's own
asyncio queue with `call_soon_threadsafe`. The model is touched by this thread only: a thread of
the engine's own (`start`), or the caller's (`run_here`: `t2r serve` decodes on its main thread,
where the compiled step is ~3x faster on a 2-core machine; scripts/decode_thread_probe.py).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from t2r.inference.prefill_budget import PREFILL_SEGMENT
from t2r.inference.scheduler import PrefillSteps, Request, Scheduler, Step
from t2r.modeling.fast_decode import fast_step
from t2r.modeling.model import T2RForCausalLM
from t2r.ops.state import ModelState
from t2r.serving.metrics import Metrics
from t2r.serving.prefix_cache import PrefixCache, segmented_prefill, segmented_prefill_steps
from t2r.serving.sessions import Session, SessionStore

log = logging.getLogger(__name__)
# Faults of the decode loop in a row (outside any one request) after which it stops for good: the
# server then answers 503 and exits non-zero, for a supervisor to restart it.
MAX_LOOP_FAULTS = 3


@dataclass(eq=False)
class Job:
    """One choice of one HTTP request: the scheduler's Request, where its events go, and what it
    asks of the prefill (prompt scoring for echo + logprobs, a session to continue and keep)."""

    request: Request
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue  # (index, "token" | "done", payload), shared by a request's choices
    score_prompt: int | None = None  # top-k per prompt position (echo + logprobs), or None
    index: int = 0
    session: str | None = None
    session_kind: str = "completion"
    session_tokens: int = 0  # tokens the starting state had seen
    prompt_logprobs: list[tuple[float, dict[int, float]]] | None = None
    cached_tokens: int = 0
    cache_salt: bytes = b""  # the prefix cache's namespace: tenant and cache_salt
    keep_tokens: int | None = None  # a session keeps the state after this many new tokens (a stop string's)
    submitted: float = field(default_factory=time.perf_counter)
    first_token: float | None = None

    def post(self, kind: str, payload: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (self.index, kind, payload))
        except RuntimeError:  # the web server's loop has closed: nobody is listening any more
            pass


class Engine:
    """Owns the model and the scheduler; `submit` and `cancel` may be called from any thread."""

    def __init__(
        self,
        model: T2RForCausalLM,
        max_batch: int,
        metrics: Metrics,
        step: Step = fast_step,
        prefix_cache: PrefixCache | None = None,
        prefix_block: int = 256,
        sessions: SessionStore | None = None,
        own_thread: bool = True,
    ) -> None:
        self.model, self.metrics = model, metrics
        self.prefix_cache, self.prefix_block, self.sessions = prefix_cache, prefix_block, sessions
        self.scheduler = Scheduler(model, max_batch, step, prefill=self._prefill, batchable=self._batchable)
        self._jobs: dict[Request, Job] = {}  # the decode thread's only
        self._outstanding = 0  # jobs submitted and not yet ended (any thread, under the lock)
        self._lock = threading.Lock()
        self._inbox: queue.Queue[tuple[str, Job]] = queue.Queue()
        # own_thread=False: the caller runs the loop (`run_here`), and `start` leaves it to them.
        self._thread = threading.Thread(target=self._run, name="t2r-decode", daemon=True) if own_thread else None
        self._stopping = threading.Event()
        self.broken: BaseException | None = None  # set when the decode loop has stopped for good
        self.on_broken: Callable[[], None] = lambda: None  # the server's: stop, exit non-zero
        metrics.state_bytes.set(self.scheduler.state_bytes())

    # --- any thread -------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            self._thread.start()

    def run_here(self) -> None:
        """Run the decode loop on the calling thread until `stop` (or until it breaks)."""
        self._run()

    def stop(self) -> None:
        """Ask the loop to end (after the cycle in flight) and wait for the engine's own thread."""
        self._stopping.set()
        self._inbox.put(("wake", None))  # type: ignore[arg-type]
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        with self._lock:
            self._outstanding += 1
        self._inbox.put(("submit", job))

    def cancel(self, job: Job, finish: str = "cancelled", keep_tokens: int | None = None) -> None:
        """End a job; keep_tokens: the tokens its client was given (a stop string ended the text),
        after which a session's kept state must end, whatever was decoded since."""
        job.keep_tokens = keep_tokens
        self._inbox.put((finish, job))

    def waiting(self) -> int:
        """Requests not yet decoding: in the inbox or the scheduler's queue."""
        with self._lock:
            return max(0, self._outstanding - len(self.scheduler.active))

    def active(self) -> int:
        return len(self.scheduler.active)

    # --- the decode thread ------------------------------------------------------------------
    def _run(self) -> None:
        """The loop, supervised: a fault outside any one request's own guard fails the rows held
        then (logged with its traceback) and the loop goes on; MAX_LOOP_FAULTS in a row and it stops
        for good (`broken`), failing what waits, and tells the server (`on_broken`)."""
        torch.set_grad_enabled(False)
        faults = 0
        while not self._stopping.is_set():
            try:
                self._cycle()
                faults = 0
            except Exception as error:
                faults += 1
                log.exception("the decode loop failed (%d in a row); the requests it held fail", faults)
                try:
                    self._fail_held(error)
                except Exception:  # counted as the loop's own fault: the next ones decide
                    log.exception("could not fail the requests held")
                if faults >= MAX_LOOP_FAULTS:
                    log.critical("the decode loop cannot go on: the server stops")
                    self.broken = error
                    self._refuse_inbox(error)
                    self.on_broken()
                    return

    def _cycle(self) -> None:
        self._take_inbox(block=not self.scheduler.busy)
        if not self.scheduler.busy:
            return
        steps_before, seconds_before = self.scheduler.steps, self.scheduler.step_seconds
        self.scheduler.step()
        if self.scheduler.steps > steps_before:
            self.metrics.step_seconds.observe(self.scheduler.step_seconds - seconds_before)
        self._report_finished()
        self.metrics.active_rows.set(len(self.scheduler.active))

    def _fail_held(self, error: BaseException) -> None:
        self.scheduler.fail_all(error)
        self._report_finished()

    def _refuse_inbox(self, error: BaseException) -> None:
        """After the loop stopped: every request it still held or that is in the inbox fails."""
        for job in self._jobs.values():
            with self._lock:
                self._outstanding -= 1
            job.post("done", ("error", error))
        self._jobs.clear()
        while True:
            try:
                command, job = self._inbox.get_nowait()
            except queue.Empty:
                return
            if command == "submit":
                with self._lock:
                    self._outstanding -= 1
                job.post("done", ("error", error))

    def _take_inbox(self, block: bool) -> None:
        try:
            command, job = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            if command == "submit":
                self._jobs[job.request] = job
                job.request.on_token = lambda token, job=job: self._on_token(job, token)
                self.scheduler.submit(job.request)
            elif command != "wake" and job.request in self._jobs:
                self.scheduler.cancel(job.request, command)
                if job.request not in self.scheduler.active:
                    self._report_finished()
            try:
                command, job = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _on_token(self, job: Job, token: int) -> None:
        if job.first_token is None:
            job.first_token = time.perf_counter()
            self.metrics.time_to_first_token.observe(job.first_token - job.submitted)
        logprob = job.request.token_logprobs[-1] if job.request.logprobs is not None else None
        job.post("token", (token, logprob))

    def _report_finished(self) -> None:
        active = set(self.scheduler.active)
        for request, job in list(self._jobs.items()):
            if request.finish is None or request in active:
                continue
            del self._jobs[request]
            with self._lock:
                self._outstanding -= 1
            if job.session is not None and request.final_state is not None and self.sessions is not None:
                try:
                    state, kept = self._session_state(job)
                    tokens = job.session_tokens + len(request.prompt) + kept
                    self.sessions.put(job.session, Session(state, job.session_kind, tokens))
                except Exception as error:  # the response is complete; the session is not kept
                    log.exception("could not keep session %s", job.session)
                    request.fail(error)
            if request.finish == "cancelled":
                self.metrics.cancelled.inc()
            job.post("done", (request.finish, request.error))

    def _session_state(self, job: Job) -> tuple[ModelState, int]:
        """The state a session keeps and the new tokens it has seen: the request's final state, or,
        when a stop string ended the text before the last tokens decoded, the state after exactly
        the tokens returned (prefilled again from the turn's start: a recurrent state cannot forget)."""
        request = job.request
        assert request.final_state is not None
        if job.keep_tokens is None or job.keep_tokens >= len(request.tokens):
            return request.final_state, len(request.tokens)
        kept = torch.tensor(request.tokens[: job.keep_tokens], dtype=request.prompt.dtype, device=request.prompt.device)
        ids = torch.cat([request.prompt, kept])
        _, state, _ = segmented_prefill(self.model, ids, 0, None, request.start_state)
        return state, job.keep_tokens

    def _batchable(self, request: Request) -> bool:
        """A prompt of at most one segment with no prefix-state boundary inside it (shorter than a
        block), no session and no scoring: it never meets the prefix cache, so it may be prefilled
        with others at once (up to max_batch prompts of a segment each: a bounded forward)."""
        job = self._jobs[request]
        no_boundary = self.prefix_cache is None or self.prefix_block == 0 or len(request.prompt) <= self.prefix_block
        short = len(request.prompt) <= PREFILL_SEGMENT and no_boundary
        return request.start_state is None and job.score_prompt is None and short

    def _prefill(self, model: T2RForCausalLM, request: Request) -> PrefillSteps:
        """The scheduler's prefill (a generator: one segment per decode step) through the prefix
        cache, scoring the prompt segment by segment for echo + logprobs."""
        job = self._jobs[request]
        scored: list[tuple[float, dict[int, float]]] = []
        score = None
        if job.score_prompt is not None:  # echo + logprobs: segment by segment, [S, V] at a time

            def score(logits: torch.Tensor, start: int, top: int = job.score_prompt) -> None:
                following = request.prompt[start + 1 : start + 1 + logits.shape[0]]  # what each position predicts
                scored.extend(prompt_logprobs(logits[: len(following)], following, top))

        logits, state, cached = yield from segmented_prefill_steps(
            model,
            request.prompt,
            self.prefix_block,
            self.prefix_cache if request.start_state is None else None,
            request.start_state,
            each_segment=score,
            salt=job.cache_salt,
        )
        job.cached_tokens = cached
        self.metrics.prefix_cached_tokens.inc(cached)
        if job.score_prompt is not None:
            job.prompt_logprobs = scored
        return logits, state


def prompt_logprobs(logits: torch.Tensor, following: torch.Tensor, top: int) -> list[tuple[float, dict[int, float]]]:
    """logits [n, V] of n positions and the tokens that follow them, following [n] -> per position:
    (log p(the token that follows), top-k {id: log p})."""
    logp = torch.log_softmax(logits.float(), -1)
    chosen = logp.gather(1, following[:, None].to(logp.device))[:, 0].tolist()
    if top > 0:
        values, indices = logp.topk(top, dim=-1)
        tops = [dict(zip(i, v, strict=True)) for i, v in zip(indices.tolist(), values.tolist(), strict=True)]
    else:
        tops = [{} for _ in chosen]
    return list(zip(chosen, tops, strict=True))
