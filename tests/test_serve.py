"""`t2r serve` through a real uvicorn server and the real `openai` client: completions and chat,
streamed or not, continuous batching, disconnects, sessions, prefix states, and every bad input."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx2
import openai
import pytest
import torch

from t2r.inference.generate import generate
from t2r.inference.sampling import Sampling
from tests.conftest import tiny_tokenizer
from tests.serving import NAME, Served, serving, tiny_served_model

GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True, "return_token_ids": True}}


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_served_model()


@pytest.fixture(scope="module")
def served(model: torch.nn.Module):
    with serving(model) as server:
        yield server


def client(served: Served, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=served.v1, api_key=key, max_retries=0)


def alone(model: torch.nn.Module, ids: list[int], count: int) -> list[int]:
    return generate(model, torch.tensor(ids), count, Sampling(greedy=True)).new_tokens


def test_models_and_health(served: Served) -> None:
    assert [m.id for m in client(served).models.list().data] == [NAME]
    assert httpx2.get(f"{served.url}/health").json()["status"] == "ok"


def test_completion_streamed_and_whole_decode_what_generate_decodes(served: Served, model) -> None:
    whole = client(served).completions.create(model=NAME, prompt="It is a truth", max_tokens=12, **GREEDY)
    choice = whole.choices[0]
    ids = tiny_tokenizer()("It is a truth").input_ids
    assert choice.prompt_token_ids == ids and choice.token_ids == alone(model, ids, 12)
    assert choice.finish_reason == "length"
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (len(ids), 12)
    chunks = list(client(served).completions.create(model=NAME, prompt="It is a truth", max_tokens=12, stream=True,
                                                    stream_options={"include_usage": True}, **GREEDY))  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert chunks[-1].usage.completion_tokens == 12 and not chunks[-1].choices
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_chat_streamed_and_whole(served: Served, model) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Call me Ishmael."}]
    whole = client(served).chat.completions.create(model=NAME, messages=messages, max_tokens=10, **GREEDY)
    tokenizer = tiny_tokenizer()
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert whole.choices[0].token_ids == alone(model, ids, 10)
    assert whole.choices[0].message.role == "assistant" and whole.usage.prompt_tokens == len(ids)
    stream = client(served).chat.completions.create(model=NAME, messages=messages, max_tokens=10, stream=True,
                                                    **GREEDY)  # fmt: skip
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == 10


def test_eight_concurrent_streams_each_equal_the_request_alone(served: Served, model) -> None:
    prompts = [f"Call me Ishmael {i}" * (1 + i % 3) for i in range(8)]
    budgets = [6 + 3 * i for i in range(8)]

    async def one(api: openai.AsyncOpenAI, prompt: str, budget: int) -> list[int]:
        stream = await api.completions.create(model=NAME, prompt=prompt, max_tokens=budget, stream=True,
                                              logprobs=0, **GREEDY)  # fmt: skip
        tokens = []
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].logprobs:
                tokens += chunk.choices[0].logprobs.tokens
        return tokens

    async def everyone() -> list[list[str]]:
        api = openai.AsyncOpenAI(base_url=served.v1, api_key="none", max_retries=0)
        return await asyncio.gather(*(one(api, p, b) for p, b in zip(prompts, budgets, strict=True)))

    together = asyncio.run(everyone())  # 8 streams, 4 rows: some wait, rows join and leave
    tokenizer = tiny_tokenizer()
    for prompt, budget, streamed in zip(prompts, budgets, together, strict=True):
        expected = alone(model, tokenizer(prompt).input_ids, budget)
        assert streamed == [tokenizer.decode([t]) for t in expected]


def test_a_client_that_goes_away_frees_its_row(served: Served) -> None:
    cancelled = served.metric("t2r_cancelled_requests_total")
    body = {"model": NAME, "prompt": "Call me", "max_tokens": 500, "stream": True, "ignore_eos": True}
    with httpx2.stream("POST", f"{served.v1}/completions", json=body, timeout=30) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        assert served.metric("t2r_active_rows") == 1
    # Closed mid-stream: the row leaves at the next step, and the engine counts the cancellation
    # just after (the row count is read live from another thread: it can be 0 a moment before
    # the counter moves, on a busy machine), so wait for both.
    for _ in range(200):
        if served.metric("t2r_active_rows") == 0 and served.metric("t2r_cancelled_requests_total") > cancelled:
            break
        time.sleep(0.05)
    assert served.metric("t2r_active_rows") == 0
    assert served.metric("t2r_cancelled_requests_total") == cancelled + 1


def test_a_session_over_three_turns_equals_the_whole_conversation_at_once(served: Served) -> None:
    turns = [[5, 17, 33, 80, 81], [90, 91, 12], [44, 45, 46, 47]]
    history: list[int] = []
    api = client(served)
    for turn in turns:
        reply = api.completions.create(model=NAME, prompt=turn, max_tokens=7, extra_body={
            "ignore_eos": True, "return_token_ids": True, "session": "three-turns"}, temperature=0)  # fmt: skip
        assert reply.usage.prompt_tokens == len(turn)  # only the new turn is prefilled
        history += turn
        last = reply.choices[0].token_ids
        history += last
    whole = api.completions.create(model=NAME, prompt=history[: -len(last)], max_tokens=7, **GREEDY)
    assert whole.choices[0].token_ids == last


def test_a_chat_session_continues_and_survives_a_restart(model, tmp_path) -> None:
    first = [{"role": "user", "content": "Call me Ishmael."}]
    second = [{"role": "user", "content": "Some years ago."}]
    options = {"max_tokens": 6, "temperature": 0}
    with serving(model, sessions_dir=tmp_path) as server:
        api = client(server)
        api.chat.completions.create(model=NAME, messages=first, extra_body={"session": "s"}, **options)
        kept = api.chat.completions.create(model=NAME, messages=second, extra_body={"session": "s"}, **options)
        files = list(tmp_path.glob("*.safetensors"))
        assert len(files) == 1
        assert files[0].stat().st_mode & 0o777 == 0o600  # a conversation is its owner's to read
        size = files[0].stat().st_size
    tokenizer = tiny_tokenizer()
    continuation = tokenizer.apply_chat_template(
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}, *second],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert kept.usage.prompt_tokens < len(tokenizer(continuation).input_ids)  # the new turn, not the history
    with serving(model, sessions_dir=tmp_path) as server:  # a restart: the session is read from disk
        api = client(server)
        for _ in range(3):
            api.chat.completions.create(model=NAME, messages=second, extra_body={"session": "s"}, **options)
        again = api.chat.completions.create(model=NAME, messages=second, extra_body={"session": "s"}, **options)
        assert again.usage.prompt_tokens == kept.usage.prompt_tokens
    assert files[0].stat().st_size == size  # five turns later: the same bytes
    with serving(model, sessions_dir=tmp_path) as server:
        with pytest.raises(openai.BadRequestError, match="chat"):
            client(server).completions.create(model=NAME, prompt="x", max_tokens=2, extra_body={"session": "s"})


def test_a_prefix_cache_hit_decodes_what_a_miss_decodes(model) -> None:
    header = "It is a truth universally acknowledged, that a single man"
    with serving(model, prefix_block=8) as server:
        api = client(server)
        miss = api.completions.create(model=NAME, prompt=header + " in want", max_tokens=10, **GREEDY)
        assert miss.usage.prompt_tokens_details.cached_tokens == 0
        hit = api.completions.create(model=NAME, prompt=header + " in want", max_tokens=10, **GREEDY)
        other = api.completions.create(model=NAME, prompt=header + " of a wife", max_tokens=10, **GREEDY)
    assert hit.usage.prompt_tokens_details.cached_tokens >= 8
    assert other.usage.prompt_tokens_details.cached_tokens >= 8
    assert hit.choices[0].token_ids == miss.choices[0].token_ids
    with serving(model, prefix_block=8) as server:  # the other prompt, cold
        cold = client(server).completions.create(model=NAME, prompt=header + " of a wife", max_tokens=10, **GREEDY)
    assert cold.usage.prompt_tokens_details.cached_tokens == 0
    assert cold.choices[0].token_ids == other.choices[0].token_ids


def test_echo_and_logprobs_score_the_prompt_as_the_model_does(served: Served, model) -> None:
    ids = tiny_tokenizer()("Call me Ishmael. Some years ago").input_ids
    reply = client(served).completions.create(model=NAME, prompt=ids, max_tokens=1, echo=True, logprobs=1,
                                              temperature=0)  # fmt: skip
    scores = reply.choices[0].logprobs.token_logprobs
    assert scores[0] is None and len(scores) == len(ids) + 1
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids]), form="parallel")
    expected = torch.log_softmax(logits[0, :-1].double(), -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    # The server scores in bounded chunks through the chunked form; the reference is one parallel pass:
    # fp32 log-probs of O(1)-O(10), ~1e-6 apart; 1e-4 absolute.
    assert torch.allclose(torch.tensor(scores[1 : len(ids)], dtype=torch.double), expected, atol=1e-4)


def post(served: Served, path: str, body: object, **headers: str) -> httpx2.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx2.post(f"{served.v1}/{path}", content=content,
                       headers={"content-type": "application/json", **headers}, timeout=30)  # fmt: skip


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        (b"{not json", 400, "JSON"),
        ({"model": NAME, "prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
        ({"model": NAME, "prompt": 5}, 400, "prompt"),
        ({"model": "gpt-9", "prompt": "x"}, 404, "does not exist"),
        ({"model": NAME, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
        ({"model": NAME, "prompt": "x", "max_tokens": 100000}, 400, "max_tokens"),
        ({"model": NAME, "prompt": ""}, 400, "empty"),
        ({"model": NAME, "prompt": [[]]}, 400, "empty"),
        ({"model": NAME, "prompt": [99999]}, 400, "token ids"),
        ({"model": NAME, "prompt": "x", "temperature": 7}, 400, "temperature"),
        ({"model": NAME, "prompt": "x", "seed": 2**80}, 400, "seed"),  # was a 500 with Python's overflow text
        ({"model": NAME, "prompt": "x", "seed": -1}, 400, "seed"),
        ({"model": NAME, "prompt": "x" * 3_000_000}, 413, "larger"),
        # longer than --max-prompt-tokens (2048 here): refused before any prefill or echo scoring
        ({"model": NAME, "prompt": [5] * 3000, "echo": True, "logprobs": 5}, 400, "at most 2048"),
        ({"model": NAME, "prompt": [[5] * 10, [5] * 2049]}, 400, "at most 2048"),
    ],
)
def test_bad_completions_get_openai_errors(served: Served, body: object, status: int, words: str) -> None:
    response = post(served, "completions", body)
    assert response.status_code == status
    error = response.json()["error"]
    assert words in error["message"] and error["type"]


def test_paths_a_client_makes_up_do_not_grow_the_metrics(served: Served) -> None:
    before = httpx2.get(f"{served.url}/metrics").text.count("\n")
    for index in range(30):
        assert httpx2.get(f"{served.url}/made-up-{index}").status_code == 404
        assert post(served, f"made-up-{index}", {"model": NAME}).status_code == 404
    text = httpx2.get(f"{served.url}/metrics").text
    assert "made-up" not in text and 'endpoint="other"' in text
    assert text.count("\n") <= before + 8  # at most a few new (label, status) series, not one per path


def test_bad_chats_get_openai_errors(served: Served) -> None:
    assert post(served, "chat/completions", {"model": NAME, "messages": []}).status_code == 400
    long = post(served, "chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "a b " * 3000}]})
    assert long.status_code == 400 and long.json()["error"]["code"] == "context_length_exceeded"
    bad_role = {"model": NAME, "messages": [{"role": "wizard", "content": "x"}]}
    assert post(served, "chat/completions", bad_role).status_code == 400
    with pytest.raises(openai.NotFoundError):
        client(served).chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])


def test_an_api_key_is_required_when_set(model) -> None:
    with serving(model, api_key="sesame") as server:
        with pytest.raises(openai.AuthenticationError):
            client(server, "wrong").models.list()
        assert post(server, "completions", {"model": NAME, "prompt": "x"}).status_code == 401
        assert [m.id for m in client(server, "sesame").models.list().data] == [NAME]
        assert httpx2.get(f"{server.url}/health").status_code == 200  # probes need no key


def test_beyond_the_queue_requests_get_429(model) -> None:
    with serving(model, max_batch=1, max_queue=1, max_tokens_limit=10**6) as server:
        body = {"model": NAME, "prompt": "Call", "max_tokens": 10**6, "ignore_eos": True, "stream": True}
        with httpx2.stream("POST", f"{server.v1}/completions", json=body, timeout=30) as first:
            lines = first.iter_lines()  # kept: a dropped iterator closes the stream
            next(lines)
            queued = threading.Thread(target=post, args=(server, "completions", {**body, "max_tokens": 2}))
            queued.start()  # waits for the one row
            for _ in range(100):
                if server.metric("t2r_queue_length") == 1:
                    break
                time.sleep(0.05)
            assert server.metric("t2r_queue_length") == 1 and server.metric("t2r_active_rows") == 1
            third = post(server, "completions", {**body, "stream": False})
            assert third.status_code == 429 and third.json()["error"]["type"] == "rate_limit_error"
        queued.join(timeout=30)
        assert not queued.is_alive()


def test_a_failing_request_fails_alone(model, monkeypatch: pytest.MonkeyPatch) -> None:
    from t2r.serving import engine as engine_module

    real = engine_module.segmented_prefill_steps

    def failing(model, ids, *args, **kwargs):
        if 13 in ids.tolist():
            raise RuntimeError("injected fault")
        return (yield from real(model, ids, *args, **kwargs))

    monkeypatch.setattr(engine_module, "segmented_prefill_steps", failing)
    with serving(model) as server:
        body = {"model": NAME, "prompt": "Call", "max_tokens": 400, "ignore_eos": True, "stream": True}
        with httpx2.stream("POST", f"{server.v1}/completions", json=body, timeout=30) as running:
            lines = running.iter_lines()
            next(lines)
            broken = post(server, "completions", {"model": NAME, "prompt": [13, 14], "max_tokens": 3})
            message = broken.json()["error"]["message"]  # an id to find in the log, never the fault's own text
            assert broken.status_code == 500 and "request id" in message and "injected" not in message
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]" and json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"
        assert client(server).completions.create(model=NAME, prompt="x", max_tokens=2).choices[0].finish_reason


def test_sigterm_drains_the_active_rows_then_exits(converted_folder) -> None:
    import signal
    import socket
    import subprocess
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "t2r", "serve", str(converted_folder), "--port", str(port),
                                "--weights", "fp32", "--no-compile"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx2.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx2.HTTPError:
                time.sleep(0.1)
        name = converted_folder.name
        body = {"model": name, "prompt": "Call me", "max_tokens": 1000, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}  # fmt: skip
        with httpx2.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            process.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            try:  # while it drains: new requests are refused (503, or the socket is closed)
                late = httpx2.post(f"{url}/v1/completions", json={"model": name, "prompt": "x"}, timeout=5)
                assert late.status_code == 503
            except httpx2.TransportError:
                pass
            events = [line[6:] for line in lines if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and json.loads(events[-2])["usage"]["completion_tokens"] == 1000
        assert process.wait(timeout=60) == 0
        output = process.stdout.read()
        assert "allocated once" in output
    finally:
        process.kill()


def test_a_taken_port_ends_serve_with_an_error_not_a_hang(converted_folder) -> None:
    """The decode loop runs on t2r serve's main thread and uvicorn on another: when uvicorn cannot
    start (its port is taken), the loop must end too and the command fail with one line."""
    import socket
    import subprocess
    import sys

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "t2r", "serve", str(converted_folder), "--port", str(port),
                                 "--weights", "fp32", "--no-compile"],
                                capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 1, result.stderr[-2000:]
    assert f"t2r: error: could not serve on 127.0.0.1:{port}" in result.stderr


def test_serve_without_its_extra_says_how_to_install(monkeypatch: pytest.MonkeyPatch, converted_folder, capsys) -> None:
    import sys

    from t2r.cli import main

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if the serve extra were not installed
    assert main(["serve", str(converted_folder)]) == 2
    assert "pip install -e '.[serve]'" in capsys.readouterr().err


def test_lm_eval_local_completions_scores_loglikelihood_through_the_server(served: Served, model, tmp_path) -> None:
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    tiny_tokenizer().save_pretrained(tmp_path)
    lm = LocalCompletionsAPI(base_url=f"{served.v1}/completions", model=NAME, tokenizer_backend="huggingface",
                             tokenizer=str(tmp_path), max_retries=1)  # fmt: skip
    pairs = [("Call me", " Ishmael."), ("It is a truth universally", " acknowledged")]
    requests = [Instance("loglikelihood", {}, pair, index) for index, pair in enumerate(pairs)]
    scores = lm.loglikelihood(requests)
    tokenizer = tiny_tokenizer()
    for (context, continuation), (score, _) in zip(pairs, scores, strict=True):
        context_ids = tokenizer(context).input_ids
        ids = context_ids + tokenizer(continuation, add_special_tokens=False).input_ids
        with torch.no_grad():
            logits, _ = model(torch.tensor([ids]), form="parallel")
        logp = torch.log_softmax(logits[0, :-1].double(), -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        # a sum of a few log-probs, each ~1e-6 apart (another form, another order); JSON round-trips floats
        assert score == pytest.approx(float(logp[len(context_ids) - 1 :].sum()), abs=1e-3)


def test_stop_strings_end_the_text_before_them(served: Served) -> None:
    api = client(served)
    free = api.completions.create(model=NAME, prompt="Call me Ishmael.", max_tokens=24, **GREEDY).choices[0].text
    assert len(free) > 6, free
    stop = free[3:6]
    whole = api.completions.create(model=NAME, prompt="Call me Ishmael.", max_tokens=24, stop=[stop], **GREEDY)
    assert whole.choices[0].text == free[: free.index(stop)] and whole.choices[0].finish_reason == "stop"
    streamed = api.completions.create(model=NAME, prompt="Call me Ishmael.", max_tokens=24, stop=stop, stream=True,
                                      **GREEDY)  # fmt: skip
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_n_choices_are_seeded_draws(served: Served) -> None:
    api = client(served)
    options = {"model": NAME, "prompt": ["Call me", "It is"], "max_tokens": 8, "n": 2, "seed": 7,
               "temperature": 1.0, "extra_body": {"ignore_eos": True, "return_token_ids": True}}  # fmt: skip
    first, again = api.completions.create(**options), api.completions.create(**options)
    assert [c.index for c in first.choices] == [0, 1, 2, 3]
    assert [c.token_ids for c in first.choices] == [c.token_ids for c in again.choices]  # seeded: reproducible
    assert first.choices[0].token_ids != first.choices[1].token_ids  # each choice its own draw
    assert first.usage.completion_tokens == 32


def test_a_sessions_dir_that_cannot_be_made_is_one_line(converted_folder, tmp_path, capsys) -> None:
    from t2r.cli import main

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["serve", str(converted_folder), "--sessions-dir", str(blocker / "sessions")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1].startswith("t2r: error: --sessions-dir")


def test_a_fault_of_the_decode_loop_fails_the_rows_it_held_and_the_loop_goes_on(model, monkeypatch) -> None:
    """A fault outside any one request's guard (injected into the scheduler's step, once): the rows
    held answer 500 with a request id, and the next request is served."""
    calls: list[int] = []
    with serving(model) as server:  # this server's scheduler only (the module's server runs beside it)
        real = server.engine.scheduler.step

        def faulty() -> None:
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("injected loop fault")
            real()

        monkeypatch.setattr(server.engine.scheduler, "step", faulty)
        failed = post(server, "completions", {"model": NAME, "prompt": "Call", "max_tokens": 20, "ignore_eos": True})
        assert failed.status_code == 500 and "request id" in failed.json()["error"]["message"]
        assert "injected" not in failed.text
        assert client(server).completions.create(model=NAME, prompt="x", max_tokens=3).choices[0].finish_reason
        assert httpx2.get(f"{server.url}/health").status_code == 200


def test_a_decode_loop_that_cannot_go_on_turns_health_503_and_refuses_work(model, monkeypatch) -> None:
    def broken(block: bool) -> None:
        time.sleep(0.01)
        raise RuntimeError("injected: the loop cannot go on")

    with serving(model) as server:  # this server's engine only (the module's server runs beside it)
        monkeypatch.setattr(server.engine, "_take_inbox", broken)
        deadline = time.monotonic() + 10
        while server.engine.broken is None and time.monotonic() < deadline:
            time.sleep(0.02)
        health = httpx2.get(f"{server.url}/health")
        assert health.status_code == 503 and health.json()["status"] == "broken"
        refused = post(server, "completions", {"model": NAME, "prompt": "x", "max_tokens": 2})
        assert refused.status_code == 503


@torch.no_grad()
def test_prompt_scoring_holds_one_segment_of_logits_at_a_time(model) -> None:
    """Echo + logprobs of a long prompt: the prefill hands over logits [<= PREFILL_SEGMENT, V] per
    segment (never [T, V]), and together they are the whole prompt's, as one forward makes them.
    (The same products in other segment sizes: 1e-4 on logits of order 1-10, as in test_model.)"""
    from t2r.serving.prefix_cache import PREFILL_SEGMENT, segmented_prefill

    ids = torch.randint(3, 200, (700,), generator=torch.Generator().manual_seed(2))
    pieces: list[tuple[int, torch.Tensor]] = []
    last, _, _ = segmented_prefill(
        model, ids, 0, None, each_segment=lambda logits, start: pieces.append((start, logits))
    )
    assert max(p.shape[0] for _, p in pieces) <= PREFILL_SEGMENT and [s for s, _ in pieces] == [0, 256, 512]
    whole, _ = model(ids[None], form="chunked")
    assert (torch.cat([p for _, p in pieces]) - whole[0]).abs().max() <= 1e-4
    assert torch.equal(last[0], pieces[-1][1][-1])


def test_text_streams_decode_each_token_once_and_match_the_whole_decode() -> None:
    """Incremental detokenisation (DecodeStream) against decoding the whole answer per token: the
    same pieces, UTF-8 characters split over tokens held back, stop strings cut alike."""
    from t2r.serving.text import TextStream

    tokenizer = tiny_tokenizer()
    ids = tokenizer("Hello wörld, ünïcode ✓ text. STOP here", add_special_tokens=False).input_ids
    for stop in ([], [" STOP"]):
        incremental, whole = TextStream(tokenizer, stop), TextStream(tokenizer, stop)
        whole._decoder = None  # the fallback: the whole answer decoded each time
        assert incremental._decoder is not None
        got = [incremental.push(token) for token in ids] + [incremental.flush()]
        expected = [whole.push(token) for token in ids] + [whole.flush()]
        assert got == expected
        text = "".join(got)
        assert text == ("Hello wörld, ünïcode ✓ text." if stop else tokenizer.decode(ids, skip_special_tokens=True))


def test_a_session_ended_by_a_stop_string_keeps_the_state_after_the_tokens_returned(served: Served, model) -> None:
    """The engine decodes ahead of the stop string's discovery; the kept state must still end at
    the token that completed the stop string (what the client was given), as a prefill of the
    prompt and those tokens makes it. (Another segmentation of the same products: 1e-4.)"""
    from tests.test_model import state_tensors

    api = client(served)
    free = api.completions.create(model=NAME, prompt="Call me Ishmael.", max_tokens=24, **GREEDY).choices[0]
    assert len(free.text) > 6, free.text
    prompt = free.prompt_token_ids
    stop, tokenizer = free.text[3:6], tiny_tokenizer()
    given = next(n for n in range(1, 25) if stop in tokenizer.decode(free.token_ids[:n], skip_special_tokens=True))
    extra = {"ignore_eos": True, "session": "stopped"}
    reply = api.completions.create(
        model=NAME, prompt=prompt, max_tokens=24, stop=[stop], extra_body=extra, temperature=0
    )
    assert reply.choices[0].finish_reason == "stop"
    session = served.engine.sessions.get("stopped")
    assert session.tokens == len(prompt) + given == int(session.state.seen[0])
    with torch.no_grad():
        _, expected = model(torch.tensor([prompt + free.token_ids[:given]]), form="chunked")
    for kept, made in zip(session.state.layers, expected.layers, strict=True):
        for a, b in zip(state_tensors(kept), state_tensors(made), strict=True):
            assert (a - b).abs().max() <= 1e-4


@torch.no_grad()
def test_a_session_state_is_cut_back_to_the_tokens_returned(model) -> None:
    """The engine's rule, run directly: a job that decoded 6 tokens but whose client was given 2
    (a stop string) keeps the state after the prompt and those 2, not after all 6."""
    from t2r.inference.scheduler import Request
    from t2r.serving.engine import Engine, Job
    from t2r.serving.metrics import Metrics
    from tests.test_model import state_tensors

    prompt = torch.tensor([5, 17, 33, 80, 81])
    request = Request(prompt, 6, keep_state=True, tokens=[9, 10, 11, 12, 13, 14])
    request.final_state = model(torch.cat([prompt, torch.tensor(request.tokens)])[None], form="chunked")[1]
    job = Job(request, asyncio.new_event_loop(), asyncio.Queue(), keep_tokens=2)
    state, kept = Engine(model, 1, Metrics())._session_state(job)
    _, expected = model(torch.tensor([[5, 17, 33, 80, 81, 9, 10]]), form="chunked")
    assert kept == 2 and int(state.seen[0]) == 7
    for mine, made in zip(state.layers, expected.layers, strict=True):
        for a, b in zip(state_tensors(mine), state_tensors(made), strict=True):
            assert (a - b).abs().max() <= 1e-4  # another segmentation of the same products


def test_tenants_keep_their_sessions_and_cached_prefixes_to_themselves(model) -> None:
    """Two tenants (--api-keys): the same session name is two sessions; a prompt prefix one tenant
    cached is not the other's (no `cached_tokens` side channel), nor another `cache_salt`'s."""
    prompt = [5, 17, 33, 80, 81, 90, 91, 12, 44, 45, 46, 47, 60, 61, 62, 63, 64, 65, 66, 67]  # 2 prefix blocks
    with serving(model, api_keys={"ka": "alice", "kb": "bob"}) as server:
        alice, bob = client(server, "ka"), client(server, "kb")
        with pytest.raises(openai.AuthenticationError):
            client(server, "kc").models.list()

        def complete(api, **extra):
            extra = {"ignore_eos": True, "return_token_ids": True, **extra}
            reply = api.completions.create(model=NAME, prompt=prompt, max_tokens=4, temperature=0, extra_body=extra)
            return reply.choices[0].token_ids, reply.usage.prompt_tokens_details.cached_tokens

        first, _ = complete(alice, session="s")
        alone, cached = complete(alice)  # the same prompt again: its prefix states are alice's now
        assert cached > 0 and alone == first
        assert complete(bob)[1] == 0  # bob's prompt never reads alice's prefix states
        assert complete(alice, cache_salt="other")[1] == 0
        continued, _ = complete(bob, session="s")  # bob's "s" is a new session, not alice's
        assert continued == first
        sessions = server.engine.sessions._sessions
        assert sessions["alice\ns"].tokens == sessions["bob\ns"].tokens == len(prompt) + 4


def test_an_api_keys_file_is_read_or_refused_in_one_line(tmp_path) -> None:
    from t2r.errors import UsageError
    from t2r.serving.server import read_api_keys

    good = tmp_path / "keys"
    good.write_text("# key tenant\nk1 alice\n\nk2 bob  # the second\n")
    assert read_api_keys(good) == {"k1": "alice", "k2": "bob"}
    for text, words in (("k1\n", "expected `KEY TENANT`"), ("k1 a\nk1 b\n", "twice"), ("# none\n", "no keys")):
        good.write_text(text)
        with pytest.raises(UsageError, match=words):
            read_api_keys(good)
    with pytest.raises(UsageError, match="cannot read"):
        read_api_keys(tmp_path / "missing")


@torch.no_grad()
def test_session_files_stay_within_their_disk_bound(model, tmp_path) -> None:
    """--sessions-dir-mb: past the bound the least recently written session files go (the one just
    written stays), and the store says how many went and how many bytes are left."""
    from t2r.serving.sessions import Session, SessionStore

    _, state = model(torch.tensor([[5, 6, 7]]), form="chunked")
    one = SessionStore(2**30, tmp_path / "probe", NAME)
    one.put("probe", Session(state, "completion", 3))
    size = one.disk_bytes
    store = SessionStore(2**30, tmp_path / "bounded", NAME, max_disk_bytes=int(2.5 * size))
    for index in range(5):
        store.put(f"s{index}", Session(state, "completion", 3))
    files = sorted(path.name for path in (tmp_path / "bounded").glob("*.safetensors"))
    assert len(files) == 2 and store.evicted_files == 3 and store.disk_bytes == 2 * size
    assert store.path("s4").name in files and store.path("s3").name in files


def test_a_session_the_server_names_is_unguessable_and_continues(served: Served) -> None:
    api = client(served)
    first = api.completions.create(model=NAME, prompt=[5, 17, 33], max_tokens=4, temperature=0,
                                   extra_body={"ignore_eos": True, "new_session": True})  # fmt: skip
    name = first.model_extra["session"]
    assert len(name) >= 24 and name != "new"
    again = api.completions.create(model=NAME, prompt=[90, 91], max_tokens=4, temperature=0,
                                   extra_body={"ignore_eos": True, "session": name})  # fmt: skip
    assert again.usage.prompt_tokens == 2 and "session" not in (again.model_extra or {})
    assert served.engine.sessions.get(name).tokens == 3 + 4 + 2 + 4  # both turns, in one state
    both = post(served, "completions", {"model": NAME, "prompt": "x", "session": "s", "new_session": True})
    assert both.status_code == 400 and "not both" in both.json()["error"]["message"]


def test_serve_decodes_with_the_fastest_path_the_machine_supports(monkeypatch: pytest.MonkeyPatch) -> None:
    """No flag: int4 and the compiled step where the machine runs them, else fp32 / eager with a
    reason; a flag always wins (--weights fp32 --no-compile opts out)."""
    from t2r.serving import server

    monkeypatch.setattr(server, "machine_lacks_kernel", lambda: None)
    monkeypatch.setattr(server, "cpp_compiler_missing", lambda: None)
    assert server.fastest_decode(None, None) == ("int4", True, "")
    assert server.fastest_decode("fp32", False) == ("fp32", False, "")
    monkeypatch.setattr(server, "machine_lacks_kernel", lambda: "no AVX2")
    monkeypatch.setattr(server, "cpp_compiler_missing", lambda: "no C++ compiler")
    assert server.fastest_decode(None, None) == ("fp32", False, "weights fp32: no AVX2; not compiled: no C++ compiler")
    assert server.fastest_decode("int8", True) == ("int8", True, "")


def test_only_prompts_of_one_segment_are_prefilled_together(model) -> None:
    """Prompts prefilled together go in one left-padded forward of [n, longest]: without a prefix
    cache a prompt of any length used to qualify, so up to max_batch long prompts made one
    unbounded forward. Now a prompt longer than a segment (or than a prefix block) goes alone."""
    import asyncio as aio

    from t2r.inference.prefill_budget import PREFILL_SEGMENT
    from t2r.inference.scheduler import Request
    from t2r.serving.engine import Engine, Job
    from t2r.serving.metrics import Metrics

    engine = Engine(model, 4, Metrics(), prefix_cache=None)
    loop = aio.new_event_loop()
    try:
        for length, together in ((PREFILL_SEGMENT, True), (PREFILL_SEGMENT + 1, False)):
            request = Request(torch.ones(length, dtype=torch.long), 1)
            engine._jobs[request] = Job(request, loop, aio.Queue())
            assert engine._batchable(request) is together
    finally:
        loop.close()
