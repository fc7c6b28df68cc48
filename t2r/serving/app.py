"""The FastAPI application: OpenAI's /v1/models, /v1/completions and /v1/chat/completions (JSON or
server-sent events), /health and /metrics, API keys, queue limits, body limits and OpenAI-style
error objects. `create_app` wires an Engine in; `t2r serve` runs it under uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from t2r.serving.engine import Engine
from t2r.serving.limits import BodyLimit
from t2r.serving.metrics import Metrics
from t2r.serving.protocol import ChatCompletionRequest, CompletionRequest, OpenAIError, error_body, internal_error
from t2r.serving.responses import ChatShape, CompletionShape, Shape
from t2r.serving.runs import Run
from t2r.serving.sessions import SessionStore
from t2r.serving.text import chat_continuation, chat_prompt

log = logging.getLogger(__name__)


@dataclass
class Settings:
    model_name: str
    max_batch: int = 8
    max_queue: int = 64
    max_tokens_limit: int = 4096
    api_key: str | None = None
    max_body_bytes: int = 4 * 2**20
    # The prefill's work and an echo's logits grow with a prompt: its length is checked once it is
    # tokenised, before any of that work (a session's history counts: its state holds those tokens).
    max_prompt_tokens: int = 8192
    # --api-keys: key -> tenant. Sessions and prefix-cache states are the tenant's alone. (--api-key
    # is one key of the unnamed tenant "", as before tenants existed.)
    api_keys: dict[str, str] = field(default_factory=dict)

    def tenants(self) -> dict[str, str]:
        keys = dict(self.api_keys)
        if self.api_key is not None:
            keys[self.api_key] = ""
        return keys


def create_app(engine: Engine, tokenizer: Any, settings: Settings, stop_ids: frozenset[int],
               metrics: Metrics, sessions: SessionStore | None = None) -> FastAPI:  # fmt: skip
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()  # the decode thread lives as long as the app
        yield
        engine.stop()

    app = FastAPI(title="t2r", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.draining = False
    app.state.engine = engine
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    metrics.active_rows.set_function(lambda: engine.active())
    metrics.queue_length.set_function(lambda: engine.waiting())
    vocab = len(tokenizer)

    @app.exception_handler(OpenAIError)
    async def openai_error(request: Request, error: OpenAIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        message = "the body is not valid JSON" if first.get("type") == "json_invalid" else first.get("msg", "invalid")
        return JSONResponse(error_body(f"{where}: {message}" if where else message, "invalid_request_error", where),
                            status_code=400)  # fmt: skip

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(error.detail), "invalid_request_error"), status_code=error.status_code)

    @app.exception_handler(Exception)
    async def crashed(request: Request, error: Exception) -> JSONResponse:
        answer = internal_error(error)  # logged with its traceback; the client gets an id, no internals
        return JSONResponse(answer.body(), status_code=answer.status)

    routes: set[str] = set()  # the app's own paths, filled below: metrics label these, never a client's raw path
    tenants = settings.tenants()

    @app.middleware("http")
    async def guard(request: Request, call_next: Callable) -> Response:
        path = request.url.path
        if not routes:
            routes.update(getattr(route, "path", "") for route in app.routes)
        label = path if path in routes else "other"  # bounded: a label per route, not per path a client makes up
        request.state.tenant = ""
        if path.startswith("/v1/"):
            if tenants:
                header = request.headers.get("authorization", "")
                key = header[len("Bearer ") :] if header.startswith("Bearer ") else None
                if key not in tenants:
                    response: Response = JSONResponse(
                        error_body("missing or wrong API key (Authorization: Bearer ...)", "invalid_request_error",
                                   code="invalid_api_key"), status_code=401)  # fmt: skip
                    metrics.requests.labels(label, "401").inc()
                    return response
                request.state.tenant = tenants[key]
            if (app.state.draining or engine.broken is not None) and request.method == "POST":
                metrics.requests.labels(label, "503").inc()
                return JSONResponse(error_body("the server is shutting down", "server_error"), status_code=503)
        response = await call_next(request)
        if path != "/metrics":
            metrics.requests.labels(label, str(response.status_code)).inc()
        return response

    @app.get("/health")
    async def health() -> Response:
        status = "broken" if engine.broken is not None else "draining" if app.state.draining else "ok"
        body = {"status": status, "model": settings.model_name, "active_rows": engine.active(),
                "queued": engine.waiting()}  # fmt: skip
        return JSONResponse(body, status_code=503 if engine.broken is not None else 200)

    @app.get("/metrics")
    async def metrics_text() -> Response:
        metrics.prefix_cache_bytes.set(engine.prefix_cache.bytes if engine.prefix_cache else 0)
        metrics.session_bytes.set(sessions.bytes if sessions else 0)
        metrics.session_disk_bytes.set(sessions.disk_bytes if sessions else 0)
        metrics.session_files_evicted.set(sessions.evicted_files if sessions else 0)
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": settings.model_name, "object": "model", "created": int(time.time()), "owned_by": "t2r"}
        return {"object": "list", "data": [card]}

    def check(body: Any, default_max: int) -> int:
        if body.model != settings.model_name:
            raise OpenAIError(404, f"the model '{body.model}' does not exist; this server serves "
                              f"'{settings.model_name}'", param="model", code="model_not_found")  # fmt: skip
        max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens
        max_tokens = default_max if max_tokens is None else max_tokens
        if not 1 <= max_tokens <= settings.max_tokens_limit:
            raise OpenAIError(400, f"max_tokens must be between 1 and {settings.max_tokens_limit}", param="max_tokens")
        return max_tokens

    def admit(count: int) -> None:
        if engine.waiting() + engine.active() + count > settings.max_batch + settings.max_queue:
            raise OpenAIError(429, "too many requests are waiting; retry later", kind="rate_limit_error")

    def encode(text: str, special: bool) -> list[int]:
        return tokenizer(text, add_special_tokens=special).input_ids

    def prompt_ids(prompt: Any, continuing: bool) -> list[list[int]]:
        if isinstance(prompt, str):
            prompts = [encode(prompt, not continuing)]
        elif prompt and all(isinstance(p, int) for p in prompt):
            prompts = [list(prompt)]
        else:
            prompts = [p if isinstance(p, list) else encode(p, not continuing) for p in prompt]
        if not prompts or any(len(p) == 0 for p in prompts):
            raise OpenAIError(400, "the prompt is empty", param="prompt")
        if any(not 0 <= t < vocab for p in prompts for t in p):
            raise OpenAIError(400, f"token ids must be in [0, {vocab})", param="prompt")
        return prompts

    def check_length(prompts: list[list[int]], history: int) -> None:
        """Every prompt (after `history` tokens of a session) within --max-prompt-tokens."""
        longest = history + max(len(p) for p in prompts)
        if longest > settings.max_prompt_tokens:
            raise OpenAIError(400, f"the prompt is {longest} tokens; this server takes at most "
                              f"{settings.max_prompt_tokens}", param="prompt",
                              code="context_length_exceeded")  # fmt: skip

    def session_key(http: Request, body: Any) -> str | None:
        """The store's key of a request's session: the tenant's own namespace (no tenant: the name).
        `new_session` makes an unguessable name first (the response returns it)."""
        if body.new_session:
            if body.session is not None:
                raise OpenAIError(400, "give `session` or `new_session`, not both", param="new_session")
            body.session = secrets.token_urlsafe(18)
        name, tenant = body.session, http.state.tenant
        return None if name is None else f"{tenant}\n{name}" if tenant else name

    def cache_salt(http: Request, body: Any) -> bytes:
        """The prefix cache's namespace of a request: its tenant and its `cache_salt`."""
        tenant, salt = http.state.tenant, body.cache_salt or ""
        return f"{tenant}\n{salt}".encode() if tenant or salt else b""

    def claim(name: str | None, count: int, shown: str | None = None) -> Any:
        """The session to continue (None: a new one), claimed for this request; `shown`: the
        client's name for it (error messages)."""
        if name is None:
            return None
        if sessions is None:
            raise OpenAIError(400, "this server keeps no sessions (--session-cache-mb 0)", param="session")
        if count != 1:
            raise OpenAIError(400, "a session continues one prompt with n=1", param="session")
        if not sessions.claim(name):
            raise OpenAIError(409, f"session '{shown}' is answering another request", param="session")
        try:
            return sessions.get(name, engine.model.device)
        except Exception as error:
            sessions.release(name)
            log.warning("session %r cannot be read", shown, exc_info=error)
            raise OpenAIError(400, f"session '{shown}' cannot be read", param="session") from error

    async def serve(http: Request, run: Run, shape: Shape, stream: bool, include_usage: bool,
                    session: str | None) -> Response:  # fmt: skip
        """Start the run and answer: a stream, or the whole response once every choice ended. A
        session is released once its state is kept (before the client sees the end)."""
        run.start()
        if stream:
            return StreamingResponse(sse(run, shape, include_usage, session), media_type="text/event-stream")
        watcher = asyncio.create_task(watch_disconnect(http, run))
        try:
            async for update in run.updates():
                shape.add(update)
        finally:
            watcher.cancel()
            release(session)
        count_tokens(run)
        return JSONResponse(shape.body(run))

    def release(session: str | None) -> None:
        if session is not None and sessions is not None:
            sessions.release(session)

    async def sse(run: Run, shape: Shape, include_usage: bool, session: str | None) -> AsyncIterator[str]:
        try:
            for chunk in shape.opening():
                yield f"data: {json.dumps(chunk)}\n\n"
            async for update in run.updates():
                if run.ended():
                    release(session)  # the state is kept: the next turn may come as soon as this ends
                chunk = shape.chunk(update, run)
                if chunk is not None:
                    yield f"data: {json.dumps(chunk)}\n\n"
            release(session)
            if include_usage:
                yield f"data: {json.dumps(shape.usage_chunk(run))}\n\n"
            yield "data: [DONE]\n\n"
        except OpenAIError as error:
            yield f"data: {json.dumps(error.body())}\n\n"
        finally:  # normal end, or the client went away (the task is cancelled)
            run.cancel()
            release(session)
            count_tokens(run)

    async def watch_disconnect(http: Request, run: Run) -> None:
        while True:
            await asyncio.sleep(0.5)
            if await http.is_disconnected():
                run.cancel()
                return

    def count_tokens(run: Run) -> None:
        metrics.prompt_tokens.inc(run.prompt_tokens)
        metrics.generation_tokens.inc(run.completion_tokens)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: Request) -> Response:
        max_tokens = check(body, 16)
        single = isinstance(body.prompt, str) or all(isinstance(p, int) for p in body.prompt)
        key = session_key(http, body)
        session = claim(key, body.n * (1 if single else len(body.prompt)), body.session)
        try:
            prompts = prompt_ids(body.prompt, continuing=session is not None)
            check_length(prompts, session.tokens if session else 0)
            if session is not None and session.kind != "completion":
                raise OpenAIError(400, f"session '{body.session}' is a chat: continue it on /v1/chat/completions")
            admit(len(prompts) * body.n)
            score = body.logprobs if body.echo and body.logprobs is not None else None
            if score is not None and session is not None:
                raise OpenAIError(400, "echo with logprobs scores a whole prompt: not with a session", param="echo")
            start = session.state if session else None
            held = (key, "completion", session.tokens if session else 0) if key else None
            run = Run(engine, tokenizer, prompts, body, max_tokens, stop_ids, body.logprobs, score, start, held,
                      cache_salt(http, body))  # fmt: skip
        except BaseException:
            release(key)
            raise
        shape = CompletionShape(settings.model_name, tokenizer, body, prompts)
        return await serve(http, run, shape, body.stream, usage_wanted(body), key)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, http: Request) -> Response:
        max_tokens = check(body, settings.max_tokens_limit)
        key = session_key(http, body)
        session = claim(key, body.n, body.session)
        try:
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
            if session is not None and session.kind != "chat":
                raise OpenAIError(400, f"session '{body.session}' is a completion: continue it on /v1/completions")
            ids = chat_continuation(tokenizer, messages) if session else chat_prompt(tokenizer, messages)
            check_length([ids], session.tokens if session else 0)
            admit(body.n)
            top = (body.top_logprobs or 0) if body.logprobs else None
            start = session.state if session else None
            held = (key, "chat", session.tokens if session else 0) if key else None
            run = Run(engine, tokenizer, [ids], body, max_tokens, stop_ids, top, None, start, held,
                      cache_salt(http, body))  # fmt: skip
        except BaseException:
            release(key)
            raise
        shape = ChatShape(settings.model_name, tokenizer, body)
        return await serve(http, run, shape, body.stream, usage_wanted(body), key)

    def usage_wanted(body: Any) -> bool:
        return bool(body.stream_options and body.stream_options.include_usage)

    return app
