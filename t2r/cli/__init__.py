"""The command line: `t2r convert | train | generate | eval | bench | serve | upgrade`.

Only this package knows there is one.

Each command is one module here (its flags and its `run`); this file only builds the parser and
dispatches. Every failure a user can cause ends as one line on stderr: exit 2 for a usage error
(bad flag value, missing path, empty data, unsupported architecture), exit 1 for the rest.
"""

from __future__ import annotations

import sys

from t2r import __version__
from t2r.cli import bench, convert, generate, serve, train, upgrade
from t2r.cli import eval as eval_command
from t2r.cli.common import Formatter, Parser, set_up_logging
from t2r.errors import T2RError
from t2r.training.config import Interrupted

COMMANDS = (convert, train, generate, eval_command, bench, serve, upgrade)


def build_parser() -> Parser:
    parser = Parser(
        prog="t2r",
        description="Turn a pretrained transformer LM into a linear-attention RNN.",
        formatter_class=Formatter,
    )
    parser.add_argument("--version", action="version", version=f"t2r {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        set_up_logging()
        from t2r.ops.denormals import flush_denormals

        flush_denormals()  # before any parallel work, so that the intra-op threads inherit it
        args.run(args)
    except T2RError as error:
        print(f"t2r: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("t2r: interrupted", file=sys.stderr)
        return 130
    except Interrupted as stop:
        print(f"t2r: {stop}; checkpoint saved, continue with --resume", file=sys.stderr)
        return 130
    return 0
