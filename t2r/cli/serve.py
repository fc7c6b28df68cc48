"""`t2r serve`: an OpenAI-compatible HTTP server over a converted model (extra `[serve]`)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from t2r.cli.common import Formatter, int_at_least, positive_int
from t2r.cli.generate import add_decode_flags
from t2r.errors import T2RError, UsageError

log = logging.getLogger("t2r.serve")


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "serve",
        help="serve a converted model over OpenAI's HTTP API (continuous batching, sessions)",
        formatter_class=Formatter,
    )
    parser.add_argument("model", help="a converted model folder (or a ready alias)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int_at_least(0), default=8000, help="port to listen on (0: any free port)")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("T2R_API_KEY"),
        help="require `Authorization: Bearer KEY` on /v1 (default: $T2R_API_KEY; none: open)",
    )
    parser.add_argument(
        "--api-keys",
        type=Path,
        default=None,
        metavar="FILE",
        help="one `KEY TENANT` pair a line (# comments): each tenant's sessions and cached prompt prefixes "
        "are its own (with --api-key, that key is one more tenant)",
    )
    parser.add_argument("--served-model-name", help="the model id clients name (default: the folder's name)")
    parser.add_argument("--max-batch", type=positive_int, default=8, help="sequences decoded together")
    parser.add_argument("--max-queue", type=int_at_least(0), default=64, help="requests waiting; more get 429")
    parser.add_argument("--max-tokens-limit", type=positive_int, default=4096, help="largest max_tokens allowed")
    parser.add_argument("--max-body-kb", type=positive_int, default=4096, help="largest request body")
    parser.add_argument("--max-prompt-tokens", type=positive_int, default=8192,
                        help="longest prompt in tokens (a session's history included), refused before any "
                        "work with 400 context_length_exceeded")  # fmt: skip
    parser.add_argument("--prefix-block", type=int_at_least(0), default=256,
                        help="prompt-prefix states are kept at multiples of this many tokens (0: none)")  # fmt: skip
    parser.add_argument("--prefix-cache-mb", type=int_at_least(0), default=512, help="bytes of prefix states kept")
    parser.add_argument("--session-cache-mb", type=int_at_least(0), default=512,
                        help="bytes of session states kept in memory (0: no sessions)")  # fmt: skip
    parser.add_argument("--sessions-dir", type=Path, help="also keep every session here (survives a restart)")
    parser.add_argument("--sessions-dir-mb", type=positive_int, default=4096,
                        help="bytes of session files kept in --sessions-dir; past it the least recently written "
                        "go first")  # fmt: skip
    parser.add_argument("--threads", type=positive_int, help="torch threads (default: torch's choice)")
    add_decode_flags(parser, fastest_by_default=True)
    parser.add_argument("--dense-copies", action=argparse.BooleanOptionalAction, default=True,
                        help="with int4 / int8 weights, keep a dense copy of each quantised weight too (bf16 "
                        "where the CPU has AMX tiles, else fp32) for prefills and decode batches of many "
                        "rows, where a GEMM beats the kernels (t2r.ops.rows_matmul)")  # fmt: skip
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    try:
        import uvicorn

        from t2r.serving.server import build_server, serve_forever
    except ImportError as error:
        missing = f"`t2r serve` needs the serve extra: pip install -e '.[serve]' ({error.name} is missing)"
        raise UsageError(missing) from error
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    server, summary = build_server(args)
    print(summary, file=sys.stderr, flush=True)
    serve_forever(server)  # a drained SIGTERM returns (exit 0, as a supervisor expects); Ctrl-C: 130
    if server.t2r_app.state.engine.broken is not None:  # a supervisor should restart it
        raise T2RError("the decode loop failed repeatedly (the log has each traceback); the server stopped")
    print("t2r serve: drained, stopped", file=sys.stderr)
    del uvicorn
