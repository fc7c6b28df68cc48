"""Builds the whole server from `t2r serve`'s flags: the model, the engine, the app, and a uvicorn
server that drains on SIGTERM (finishes the active rows, refuses new requests, then exits); runs
it with uvicorn on a thread of its own and the decode loop on the main thread (`serve_forever`)."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from pathlib import Path
from typing import Any

import uvicorn

from t2r.caches import compiled_steps_folder, decode_weights_folder
from t2r.errors import T2RError, UsageError
from t2r.hub import load_model, model_weights_identity
from t2r.inference.stopping import eos_ids
from t2r.modeling.decode_weights import decoding_model
from t2r.modeling.fast_decode import Decoder
from t2r.modeling.model import T2RForCausalLM
from t2r.modeling.quantize import with_dense_copies
from t2r.ops.int4_matmul import machine_lacks_kernel
from t2r.ops.toolchain import cpp_compiler_missing
from t2r.serving.app import Settings, create_app
from t2r.serving.engine import Engine
from t2r.serving.metrics import Metrics
from t2r.serving.prefix_cache import PrefixCache
from t2r.serving.sessions import SessionStore

log = logging.getLogger("t2r.serve")


class DrainingServer(uvicorn.Server):
    """On SIGTERM / SIGINT: new requests get 503 while uvicorn lets the open ones finish."""

    def __init__(self, config: uvicorn.Config, app: Any) -> None:
        super().__init__(config)
        self.t2r_app = app
        self.signals: list[int] = []  # the signals that stopped it

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.t2r_app.state.draining = True
        self.signals.append(sig)
        super().handle_exit(sig, frame)


def serve_forever(server: DrainingServer) -> None:
    """Serve until SIGTERM / SIGINT (drained) or until the decode loop breaks: uvicorn on a thread
    of its own, the decode loop on this one, the main thread. Why: the compiled step's many small
    parallel regions are fast while their OpenMP workers spin between them, and libgomp spins only
    while it manages no more threads than there are cores; a second thread's team (a decode thread
    beside the main thread's) made each step ~3x slower on 2 cores (scripts/decode_thread_probe.py:
    22 ms on the main thread, 58 ms on a new one). Raises KeyboardInterrupt after a drained Ctrl-C,
    T2RError when it could not serve (the port taken: uvicorn's log says why)."""
    engine = server.t2r_app.state.engine

    def http() -> None:
        try:
            server.run()
        finally:  # however uvicorn ended (drained, or never started), the decode loop ends too
            engine.stop()

    for sig in (signal.SIGTERM, signal.SIGINT):  # only the main thread may take signals
        signal.signal(sig, server.handle_exit)
    web = threading.Thread(target=http, name="t2r-http")
    web.start()
    engine.run_here()  # until the app's end stops it, or it breaks (which stops uvicorn)
    web.join()
    if not server.started and engine.broken is None:
        raise T2RError(f"could not serve on {server.config.host}:{server.config.port} (the log above says why)")
    if signal.SIGINT in server.signals:
        raise KeyboardInterrupt


def read_api_keys(path: Path) -> dict[str, str]:
    """--api-keys FILE: `KEY TENANT` a line (blank lines and # comments skipped) -> {key: tenant}."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"--api-keys {path}: cannot read it ({getattr(error, 'strerror', None) or error})") from None
    keys: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if len(words) != 2:
            raise UsageError(f"--api-keys {path}:{number}: expected `KEY TENANT`, got {len(words)} words")
        key, tenant = words
        if key in keys:
            raise UsageError(f"--api-keys {path}:{number}: a key is listed twice")
        keys[key] = tenant
    if not keys:
        raise UsageError(f"--api-keys {path}: no keys in it")
    return keys


def build_engine(model: T2RForCausalLM, args: argparse.Namespace, metrics: Metrics, name: str) -> tuple[Engine, Any]:
    prefix = PrefixCache(args.prefix_cache_mb * 2**20) if args.prefix_cache_mb and args.prefix_block else None
    try:
        sessions = (
            SessionStore(args.session_cache_mb * 2**20, args.sessions_dir, name, args.sessions_dir_mb * 2**20)
            if args.session_cache_mb
            else None
        )
    except OSError as error:  # a --sessions-dir that cannot be made or written
        raise UsageError(f"--sessions-dir {args.sessions_dir}: {error.strerror or error}") from None
    decoder = Decoder(compile=args.compile, artifacts=compiled_steps_folder())
    decoder.warm_up(model, args.max_batch)  # no request waits for a compilation (logged when it runs)
    engine = Engine(model, args.max_batch, metrics, decoder, prefix, args.prefix_block, sessions, own_thread=False)
    return engine, sessions


def fastest_decode(weights: str | None, compile: bool | None) -> tuple[str, bool, str]:
    """The decode path a server takes: what the flags name, else the fastest this machine
    supports (int4 through t2r's kernel, the compiled step; BENCHMARKS.md, serve). Returns the
    weight format, whether to compile, and a line saying why where a default was not the fastest."""
    why = []
    if weights is None:
        lacking = machine_lacks_kernel()
        weights = "fp32" if lacking else "int4"
        if lacking:
            why.append(f"weights fp32: {lacking}")
    if compile is None:
        missing = cpp_compiler_missing()
        compile = missing is None
        if missing:
            why.append(f"not compiled: {missing}")
    return weights, compile, "; ".join(why)


def build_server(args: argparse.Namespace) -> tuple[DrainingServer, str]:
    args.weights, args.compile, slower = fastest_decode(args.weights, args.compile)
    if slower:
        log.warning("serve decodes on a slower path (%s)", slower)
    model, tokenizer = load_model(args.model)
    if isinstance(model, T2RForCausalLM):
        model.with_global_cache(args.global_cache, args.global_select)
    if not isinstance(model, T2RForCausalLM):
        raise UsageError(f"{args.model} is not a converted model; run `t2r convert` first")
    # Stacked q/k/v and gate/up (fewer kernels) in the chosen format, kept on disk for the next start.
    model = decoding_model(model, args.weights, decode_weights_folder(), model_weights_identity(args.model))
    dense = with_dense_copies(model) if args.dense_copies else None
    if dense:
        log.info("many rows take %s", dense)
    name = args.served_model_name or Path(args.model).name
    metrics = Metrics()
    engine, sessions = build_engine(model, args, metrics, name)
    settings = Settings(name, args.max_batch, args.max_queue, args.max_tokens_limit, args.api_key,
                        args.max_body_kb * 1024, args.max_prompt_tokens,
                        read_api_keys(args.api_keys) if args.api_keys else {})  # fmt: skip
    app = create_app(engine, tokenizer, settings, eos_ids(tokenizer, model), metrics, sessions)

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=None)
    allocated = engine.scheduler.state_bytes()
    state = (
        f"decode state for {args.max_batch} rows allocated once: {allocated / 2**20:.1f} MiB "
        f"({allocated / args.max_batch / 2**20:.2f} MiB per row)"
        if engine.scheduler.slots is not None
        else "decode state grows with each token (layers kept as softmax)"
    )
    summary = (
        f"t2r serve: '{name}' on http://{args.host}:{args.port}/v1; {state}; "
        f"weights {args.weights}{', compiled' if args.compile else ''}{', dense copies' if dense else ''}; "
        f"{'API key required' if args.api_key or args.api_keys else 'no API key'}"
    )
    server = DrainingServer(config, app)

    def broken() -> None:  # the decode loop stopped for good: stop serving (t2r serve then exits 1)
        app.state.draining = True
        server.should_exit = True

    engine.on_broken = broken
    return server, summary
