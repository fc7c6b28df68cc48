"""The JSON of OpenAI's responses: text completions and chat completions, whole or as stream chunks."""

from __future__ import annotations

import time
import uuid
from typing import Any

from t2r.serving.protocol import ChatCompletionRequest, CompletionRequest
from t2r.serving.runs import Run, Update


class Shape:
    """Collects Updates into a whole response, or turns each into a stream chunk."""

    object_name = ""
    chunk_name = ""
    request: Any  # the request body

    def __init__(self, model: str, tokenizer: Any, prefix: str) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.id, self.created = f"{prefix}-{uuid.uuid4().hex}", int(time.time())
        self.texts: dict[int, list[str]] = {}
        self.finishes: dict[int, str] = {}
        self.tokens: dict[int, list[tuple[int, float, dict[int, float]]]] = {}

    def add(self, update: Update) -> None:
        self.texts.setdefault(update.index, []).append(update.text)
        self.tokens.setdefault(update.index, []).extend(update.tokens)
        if update.finish is not None:
            self.finishes[update.index] = update.finish

    def piece(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def usage(self, run: Run) -> dict[str, Any]:
        prompt, completion = run.prompt_tokens, run.completion_tokens
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": run.cached_tokens}}  # fmt: skip

    def with_ids(self, run: Run, index: int, choice: dict[str, Any]) -> dict[str, Any]:
        """t2r's `return_token_ids` extension (vLLM's name): the ids behind the text."""
        if self.request.return_token_ids:
            served = run.choices[index]
            choice["prompt_token_ids"] = served.job.request.prompt.tolist()
            choice["token_ids"] = served.tokens[: served.sent_tokens]
        return choice

    def envelope(self, name: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        envelope = {"id": self.id, "object": name, "created": self.created, "model": self.model, "choices": choices}
        if self.request.new_session:  # the name the server made for the session: the client continues it
            envelope["session"] = self.request.session
        return envelope

    def usage_chunk(self, run: Run) -> dict[str, Any]:
        return {**self.envelope(self.chunk_name, []), "usage": self.usage(run)}

    def opening(self) -> list[dict[str, Any]]:
        return []

    def body(self, run: Run) -> dict[str, Any]:
        raise NotImplementedError

    def chunk(self, update: Update, run: Run) -> dict[str, Any] | None:
        raise NotImplementedError


class CompletionShape(Shape):
    object_name = chunk_name = "text_completion"

    def __init__(self, model: str, tokenizer: Any, body: CompletionRequest, prompts: list[list[int]]) -> None:
        super().__init__(model, tokenizer, "cmpl")
        self.request, self.prompts = body, prompts
        self.echoed: set[int] = set()

    def prompt_for(self, index: int) -> list[int]:
        return self.prompts[index // self.request.n]

    def echo_text(self, index: int) -> str:
        return self.tokenizer.decode(self.prompt_for(index)) if self.request.echo else ""

    def logprobs(self, run: Run, index: int, tokens: list[tuple[int, float, dict[int, float]]],
                 with_prompt: bool) -> dict[str, Any] | None:  # fmt: skip
        if self.request.logprobs is None:
            return None
        entries: list[tuple[int, float | None, dict[int, float] | None]] = []
        if with_prompt and self.request.echo:
            prompt = self.prompt_for(index)
            scored = run.choices[index].job.prompt_logprobs or []
            entries.append((prompt[0], None, None))
            entries += [(t, lp, top) for t, (lp, top) in zip(prompt[1:], scored, strict=True)]
        entries += tokens
        pieces = [self.piece(t) for t, _, _ in entries]
        offsets, at = [], 0
        for piece in pieces:
            offsets.append(at)
            at += len(piece)
        tops = [None if top is None else {self.piece(t): v for t, v in top.items()} for _, _, top in entries]
        return {"tokens": pieces, "token_logprobs": [lp for _, lp, _ in entries], "top_logprobs": tops,
                "text_offset": offsets}  # fmt: skip

    def body(self, run: Run) -> dict[str, Any]:
        choices = []
        for index in sorted(self.texts):
            text = self.echo_text(index) + "".join(self.texts[index])
            logprobs = self.logprobs(run, index, self.tokens[index], with_prompt=True)
            choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": self.finishes.get(index)}
            choices.append(self.with_ids(run, index, choice))
        return {**self.envelope(self.object_name, choices), "usage": self.usage(run)}

    def chunk(self, update: Update, run: Run) -> dict[str, Any] | None:
        first = update.index not in self.echoed
        self.echoed.add(update.index)
        text = (self.echo_text(update.index) if first else "") + update.text
        if not text and update.finish is None and not update.tokens:
            return None
        choice = {"index": update.index, "text": text,
                  "logprobs": self.logprobs(run, update.index, update.tokens, with_prompt=first),
                  "finish_reason": update.finish}  # fmt: skip
        out = self.envelope(self.chunk_name, [choice])
        if update.finish is not None and all(c.finish is not None for c in run.choices):
            out["usage"] = self.usage(run)
        return out


class ChatShape(Shape):
    object_name, chunk_name = "chat.completion", "chat.completion.chunk"

    def __init__(self, model: str, tokenizer: Any, body: ChatCompletionRequest) -> None:
        super().__init__(model, tokenizer, "chatcmpl")
        self.request = body

    def logprobs(self, tokens: list[tuple[int, float, dict[int, float]]]) -> dict[str, Any] | None:
        if not self.request.logprobs:
            return None

        def entry(token: int, logprob: float) -> dict[str, Any]:
            piece = self.piece(token)
            return {"token": piece, "logprob": logprob, "bytes": list(piece.encode())}

        content = [{**entry(t, lp), "top_logprobs": [entry(i, v) for i, v in top.items()]} for t, lp, top in tokens]
        return {"content": content}

    def body(self, run: Run) -> dict[str, Any]:
        choices = []
        for index in sorted(self.texts):
            message = {"role": "assistant", "content": "".join(self.texts[index])}
            choice = {"index": index, "message": message, "logprobs": self.logprobs(self.tokens[index]),
                      "finish_reason": self.finishes.get(index)}  # fmt: skip
            choices.append(self.with_ids(run, index, choice))
        return {**self.envelope(self.object_name, choices), "usage": self.usage(run)}

    def opening(self) -> list[dict[str, Any]]:
        return [self.envelope(self.chunk_name, [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                 "logprobs": None, "finish_reason": None}])
                for i in range(self.request.n)]  # fmt: skip

    def chunk(self, update: Update, run: Run) -> dict[str, Any] | None:
        if not update.text and update.finish is None and not update.tokens:
            return None
        delta = {"content": update.text} if update.text or update.finish is None else {}
        choice = {"index": update.index, "delta": delta, "logprobs": self.logprobs(update.tokens),
                  "finish_reason": update.finish}  # fmt: skip
        out = self.envelope(self.chunk_name, [choice])
        if update.finish is not None and all(c.finish is not None for c in run.choices):
            out["usage"] = self.usage(run)
        return out
