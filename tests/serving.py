"""A real uvicorn server on a free port around a tiny converted model, for the serving tests."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import uvicorn

from t2r.serving.app import Settings, create_app
from t2r.serving.engine import Engine
from t2r.serving.metrics import Metrics
from t2r.serving.prefix_cache import PrefixCache
from t2r.serving.sessions import SessionStore
from tests.conftest import tiny_tokenizer
from tests.test_model import converted, trained_looking_model

NAME = "tiny"
EOS = frozenset({2})


def tiny_served_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return trained_looking_model(converted("llama", "hedgehog", tie_qk=False, window=5))


@dataclass
class Served:
    url: str
    engine: Engine
    metrics: Metrics

    @property
    def v1(self) -> str:
        return f"{self.url}/v1"

    def metric(self, name: str) -> float:
        """A sample's value from /metrics (by its full name, labels included)."""
        import httpx2

        for line in httpx2.get(f"{self.url}/metrics").text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
        raise KeyError(name)


@contextmanager
def serving(
    model: torch.nn.Module,
    max_batch: int = 4,
    max_queue: int = 16,
    api_key: str | None = None,
    prefix_block: int = 8,
    sessions_dir: Path | None = None,
    max_tokens_limit: int = 512,
    max_body_bytes: int = 2**20,
    max_prompt_tokens: int = 2048,
    api_keys: dict[str, str] | None = None,
) -> Iterator[Served]:
    metrics = Metrics()
    sessions = SessionStore(2**28, sessions_dir, model_id=NAME)
    engine = Engine(model, max_batch, metrics, prefix_cache=PrefixCache(2**28), prefix_block=prefix_block,
                    sessions=sessions)  # fmt: skip
    settings = Settings(NAME, max_batch, max_queue, max_tokens_limit, api_key, max_body_bytes, max_prompt_tokens,
                        api_keys or {})  # fmt: skip
    app = create_app(engine, tiny_tokenizer(), settings, EOS, metrics, sessions)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield Served(f"http://127.0.0.1:{port}", engine, metrics)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        if thread.is_alive():  # a stream a test left open: do not wait for it to finish
            server.force_exit = True
            thread.join(timeout=30)
