"""What every command shares: the parser that fails in one line, a help formatter that shows each
default, the argument types (one per kind of value or list, each naming what it expected), logging,
and the process's peak memory.

Imports nothing heavy: `t2r --help` and `t2r --version` never load torch.
"""

from __future__ import annotations

import argparse
import resource
import sys
from collections.abc import Callable
from typing import NoReturn

from t2r.modeling.config import WEIGHT_FORMATS


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (exit 2) instead of the usage block."""

    def error(self, message: str) -> NoReturn:
        print(f"t2r: error: {message}", file=sys.stderr)
        sys.exit(2)


class Formatter(argparse.HelpFormatter):
    """Help that ends every optional flag's line with its default: the value, "off" for a switch,
    or what the flag's own help says it defaults to (then the help names it and nothing is added)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or action.required or "default" in text or action.default is argparse.SUPPRESS:
            return text
        if isinstance(action, argparse._StoreTrueAction):
            return f"{text} (default: off)"
        return f"{text} (default: {show(action.default)})"


def show(value: object) -> str:
    """A default as a user would type it: tuples comma-joined, % escaped for argparse."""
    text = ",".join(str(v) for v in value) if isinstance(value, tuple | list) else str(value)
    return text.replace("%", "%%")


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= minimum."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}")
        return value

    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def bounded_float(low: float, high: float, include_low: bool = False) -> Callable[[str], float]:
    """An argparse type: a number in (low, high], or [low, high] with `include_low`."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not ((low <= value if include_low else low < value) and value <= high):
            interval = f"{'[' if include_low else '('}{low}, {high}]"
            raise argparse.ArgumentTypeError(f"expected a number in {interval}, got {text!r}")
        return value

    return parse


def int_list(what: str, minimum: int) -> Callable[[str], tuple[int, ...]]:
    """An argparse type for a comma-separated list of integers >= minimum; `what` names them in the
    error ("layer indices", "token counts", "batch sizes"), argparse adds the flag."""

    def parse(text: str) -> tuple[int, ...]:
        try:
            values = tuple(int(part) for part in text.split(",") if part.strip())
        except ValueError:
            values = ()
        if not values or min(values) < minimum:
            bound = "0 or more" if minimum == 0 else f"at least {minimum}"
            raise argparse.ArgumentTypeError(f"expected comma-separated {what} ({bound} each), got {text!r}")
        return values

    return parse


layer_indices = int_list("layer indices", 0)
token_counts = int_list("token counts", 1)
batch_sizes = int_list("batch sizes", 1)


def weight_formats(text: str) -> tuple[str, ...]:
    """'fp32,int4' -> ('fp32', 'int4'): known weight formats, fp32 among them, each once."""
    formats = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = [name for name in formats if name not in WEIGHT_FORMATS]
    if unknown or "fp32" not in formats:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated weight formats from {', '.join(WEIGHT_FORMATS)}, fp32 among them, got {text!r}"
        )
    return formats


def set_up_logging() -> None:
    """t2r's notices go to stderr as `t2r: ...`; transformers keeps to errors, without its bars."""
    import logging

    from transformers.utils import logging as transformers_logging

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("t2r: %(message)s"))
    package_logger = logging.getLogger("t2r")
    package_logger.handlers[:] = [handler]
    package_logger.setLevel(logging.INFO)
    package_logger.propagate = False
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
