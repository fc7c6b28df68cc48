"""The OpenAI API's request bodies (the fields t2r serves, and its extensions) and error objects.

Unknown fields are accepted and ignored, as OpenAI-compatible servers do, so that clients sending
newer fields still work; fields t2r cannot honour with a different meaning are refused.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger(__name__)


class OpenAIError(Exception):
    """An error answered as OpenAI's `{"error": {...}}` object with an HTTP status."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.kind, self.param, self.code)


def internal_error(error: BaseException) -> OpenAIError:
    """A fault's answer: a 500 that names a request id and nothing of the fault (no exception text,
    no internals); the fault, its traceback and the id go to the server's log."""
    request_id = uuid.uuid4().hex[:16]
    log.error("request %s failed", request_id, exc_info=(type(error), error, error.__traceback__))
    return OpenAIError(500, f"internal error (request id {request_id}: see the server's log)", kind="server_error")


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """What both endpoints share. `session` and `ignore_eos` are t2r's extensions."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    # A torch generator takes seeds below 2**64; choice i of a request draws with seed + i.
    seed: int | None = Field(None, ge=0, le=2**62)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=16)
    user: str | None = None
    # t2r: continue a conversation from its kept state (send only the new turn); see README.
    session: str | None = Field(None, min_length=1, max_length=200)
    # t2r: start a session under a name the server makes (unguessable), returned as `session`
    new_session: bool = False
    # t2r (as vLLM): do not stop at the end-of-text token; return the prompt's and choices' token ids.
    ignore_eos: bool = False
    return_token_ids: bool = False
    # as vLLM: a prompt's cached prefix states are shared only by requests of the same tenant and salt
    cache_salt: str | None = Field(None, max_length=200)

    def stop_strings(self) -> list[str]:
        strings = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(strings) > 4:
            raise OpenAIError(400, "at most 4 stop sequences", param="stop")
        return [s for s in strings if s]


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise OpenAIError(400, "only text content parts are supported", param="messages")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    max_completion_tokens: int | None = None
