"""Tokens to text as they stream (stop strings held back until they cannot match), and prompts
from chat messages (the model's chat template; a session's next turn as only its new text)."""

from __future__ import annotations

from typing import Any

from t2r.serving.protocol import OpenAIError


class TextStream:
    """Decodes a growing list of token ids to text and finds stop strings.

    `push(token)` returns the text that is now safe to send: never a partial UTF-8 character, and
    never the first characters of what may still become a stop string. `stopped` is set once a stop
    string appears; the text ends before it. Each token is decoded once, incrementally (`tokenizers`'
    DecodeStream), not the whole answer again per token; a tokenizer without a Rust backend, or one
    that cleans up spaces after decoding, is decoded whole each time (the same text either way).
    """

    def __init__(self, tokenizer: Any, stop: list[str]) -> None:
        from tokenizers.decoders import DecodeStream

        self.tokenizer, self.stop = tokenizer, stop
        self._backend = getattr(tokenizer, "_tokenizer", None)
        incremental = self._backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False)
        self._decoder = DecodeStream(skip_special_tokens=True) if incremental else None
        self._decoded = ""  # the incremental decoder's text so far
        self.ids: list[int] = []
        self.text = ""  # everything decoded so far (up to a stop string)
        self.sent = 0  # characters of `text` already returned
        self.stopped = False
        self.offsets: list[int] = []  # per token, where its text starts in `text`

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self.offsets.append(len(self.text))
        self.ids.append(token)
        if self._decoder is not None:
            piece = self._decoder.step(self._backend, token)
            if piece is None:  # an incomplete UTF-8 sequence: wait for the next token
                return ""
            self._decoded += piece
            text = self._decoded
        else:
            text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
            if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
                return ""
        self.text = text
        for stop in self.stop:
            at = self.text.find(stop, max(0, self.sent - len(stop)))
            if at >= 0:
                self.text, self.stopped = self.text[:at], True
        safe = len(self.text) if self.stopped else len(self.text) - self._held_back()
        piece = self.text[self.sent : safe] if safe > self.sent else ""
        self.sent = max(self.sent, safe)
        return piece

    def flush(self) -> str:
        """The text held back, when the stream ends without a stop string."""
        piece, self.sent = self.text[self.sent :], len(self.text)
        return piece

    def _held_back(self) -> int:
        """Characters at the end of the text that begin some stop string."""
        held = 0
        for stop in self.stop:
            for size in range(min(len(stop) - 1, len(self.text)), 0, -1):
                if self.text.endswith(stop[:size]):
                    held = max(held, size)
                    break
        return held


def chat_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a whole conversation, ending with the assistant's turn opened."""
    if not getattr(tokenizer, "chat_template", None):
        raise OpenAIError(400, "this model has no chat template: use /v1/completions", param="messages")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False).input_ids


_ASSISTANT = "T2Rassistantturnmarker"


def chat_continuation(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids that follow an assistant's reply to carry a conversation on with `messages`: the
    end of the reply's turn, the new messages and the assistant's turn opened. Found by rendering
    a conversation that ends with a marker reply and keeping what the template puts after it."""
    if not getattr(tokenizer, "chat_template", None):
        raise OpenAIError(400, "this model has no chat template: use /v1/completions", param="messages")
    history = [{"role": "user", "content": "x"}, {"role": "assistant", "content": _ASSISTANT}]
    text = tokenizer.apply_chat_template(history + messages, tokenize=False, add_generation_prompt=True)
    at = text.find(_ASSISTANT)
    if at < 0:
        raise OpenAIError(400, "this model's chat template cannot continue a session", param="session")
    return tokenizer(text[at + len(_ASSISTANT) :], add_special_tokens=False).input_ids
