"""The server under schema-driven fuzzing: request bodies drawn from its own OpenAPI schema
(hypothesis-jsonschema, as schemathesis does) and arbitrary JSON, on every POST endpoint. No answer
may be a 5xx, every answer is JSON, and the server still serves a plain request afterwards. Bounded:
a fixed number of examples, small token limits, so that it runs in well under a minute."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx2
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema

from tests.serving import NAME, Served, serving, tiny_served_model

ENDPOINTS = {"completions": "CompletionRequest", "chat/completions": "ChatCompletionRequest"}
EXAMPLES = 40  # per endpoint and kind of body
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)


@pytest.fixture(autouse=True)
def subnormal_floats() -> Iterator[None]:
    """hypothesis draws floats with subnormals, which a thread that flushes them to zero cannot hold
    (the decode path turns flushing on, `t2r.ops.denormals`, in the thread an earlier test decoded
    in: this one). This thread keeps them while the bodies are drawn; the server's threads are theirs."""
    torch.set_flush_denormal(False)
    yield


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    # Small limits: a drawn max_tokens or n beyond them is refused (400), within them it is cheap.
    with serving(tiny_served_model(), max_tokens_limit=16, max_prompt_tokens=64) as server:
        yield server


def schema_for(served: Served, name: str) -> dict:
    spec = httpx2.get(f"{served.url}/openapi.json", timeout=30).json()
    return {"$ref": f"#/components/schemas/{name}", "components": spec["components"]}


def answered(served: Served, path: str, body: object) -> None:
    response = httpx2.post(f"{served.v1}/{path}", content=json.dumps(body), timeout=60,
                           headers={"content-type": "application/json"})  # fmt: skip
    assert response.status_code < 500, (path, body, response.text)
    if response.headers.get("content-type", "").startswith("application/json"):
        response.json()


@pytest.mark.parametrize("path", ENDPOINTS)
def test_bodies_from_the_schema_never_get_a_5xx(served: Served, path: str) -> None:
    schema = schema_for(served, ENDPOINTS[path])

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(from_schema(schema))
    def check(body: dict) -> None:
        body = {**body, "model": NAME, "stream": False}  # the right model: the request goes deep
        answered(served, path, body)

    check()
    health = httpx2.get(f"{served.url}/health", timeout=30)
    assert health.status_code == 200


@pytest.mark.parametrize("path", ENDPOINTS)
def test_arbitrary_json_never_gets_a_5xx(served: Served, path: str) -> None:
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(JSON)
    def check(body: object) -> None:
        answered(served, path, body)

    check()
    plain = {"model": NAME, "prompt": "x", "max_tokens": 2} if path == "completions" else {
        "model": NAME, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}  # fmt: skip
    assert httpx2.post(f"{served.v1}/{path}", json=plain, timeout=30).status_code == 200
