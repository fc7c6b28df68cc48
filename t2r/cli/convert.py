"""`t2r convert`: swap a teacher's softmax attention for linear (or hybrid) attention and save it.

The attention flags are shared with `t2r train`, which converts too.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from t2r.cli.common import Formatter, layer_indices, non_negative_int, positive_int
from t2r.modeling.config import DEFAULT_HALF_LIFE, DEFAULT_SINKS, DEFAULT_WINDOW, FEATURE_MAPS, LINEAR_HEADS
from t2r.ops import GLOBAL_SELECTS

DEFAULT_MODEL = "smollm2-135m"
MODEL_HELP = "alias (smollm2-135m), .gguf file, local Hugging Face folder or hub id"


def add_attention_flags(parser: argparse.ArgumentParser) -> None:
    """The flags that shape the new attention, shared by convert and train."""
    parser.add_argument(
        "--window",
        type=non_negative_int,
        default=None,
        metavar="W",
        help=f"exact softmax over the last W tokens + linear attention before them; 0: pure linear "
        f"(default: {DEFAULT_WINDOW})",
    )
    parser.add_argument(
        "--rotary-features",
        action="store_true",
        help="feature maps see q/k after rotary positions (default: before, position-free, with a window; "
        "after, without one)",
    )
    parser.add_argument(
        "--linear-heads",
        choices=LINEAR_HEADS,
        default=None,
        help="a feature map and linear state per query head, or per key/value head shared by its query "
        "group (GQA: fewer state bytes; with a window) (default: query)",
    )
    parser.add_argument(
        "--softmax-layers",
        type=layer_indices,
        metavar="I,J,...",
        default=None,
        help="layer indices kept as exact softmax attention, their KV cache grows (default: none)",
    )
    parser.add_argument(
        "--keep-local",
        action="store_true",
        default=None,
        help="the teacher's own sliding-window layers (Gemma 2/3 local layers, Mistral) stay exact softmax "
        "over their window in a ring buffer (constant memory); only its global layers are converted",
    )
    parser.add_argument(
        "--half-life",
        type=non_negative_int,
        default=None,
        metavar="N",
        help=f"with a window, a key's linear weight halves every N tokens after it leaves the window; "
        f"0: never forget (default: {DEFAULT_HALF_LIFE} with a window)",
    )
    parser.add_argument(
        "--sinks",
        type=non_negative_int,
        default=None,
        metavar="N",
        help=f"with a window, the first N tokens stay exact softmax slots for good (default: {DEFAULT_SINKS} "
        "with a window)",
    )
    add_global_cache_flag(parser, "training-free: `t2r train` trains without it and saves the model with it")


def add_global_cache_flag(parser: argparse.ArgumentParser, note: str, select: bool = True) -> None:
    """--global-cache N (LoLA's sparse cache, `t2r.ops.global_cache`) and, where prompts are
    prefilled (select), --global-select: convert, train, eval, generate, serve; bench (decoding) N only."""
    parser.add_argument(
        "--global-cache",
        type=non_negative_int,
        default=None,
        metavar="N",
        help="with a window and a linear part, keep per layer and key/value head the N keys that left the "
        f"window and that the linear state recalls worst as exact softmax slots (constant memory); {note} "
        "(default: 0, none)",
    )
    if select:
        parser.add_argument(
            "--global-select",
            choices=GLOBAL_SELECTS,
            default=None,
            help="how a prompt's prefill fills the global cache: recall (token by token, the keys the linear "
            "state recalls worst, as decoding does) or prompt (the keys the prompt's last 32 queries attend to "
            "most, SnapKV's choice; a parallel prefill). Decoding always goes by recall (default: the model's, "
            "recall for a new one)",
        )


def attention_settings(args: argparse.Namespace) -> dict[str, Any]:
    """T2RConfig fields from the attention flags (the config's defaults where a flag is absent)."""
    window = DEFAULT_WINDOW if args.window is None else args.window
    return {
        "half_life": args.half_life,  # None: the config's default for the window
        "sinks": args.sinks,  # the same
        "window": window,
        # Without a window the linear part is the only attention and needs the positions.
        "rotary_features": args.rotary_features or window == 0,
        "softmax_layers": args.softmax_layers or (),
        "linear_heads": args.linear_heads or "query",
        "keep_local": bool(args.keep_local),
        "global_cache": args.global_cache or 0,
        "global_select": args.global_select or "recall",
    }


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "convert", help="swap softmax attention for linear attention and save", formatter_class=Formatter
    )
    parser.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    parser.add_argument(
        "--feature-map",
        choices=FEATURE_MAPS,
        default="t2r",
        help="the feature map phi; none: no linear part, the teacher's softmax over the sinks and the window "
        "only (the training-free sliding-window baseline)",
    )
    parser.add_argument(
        "--feature-dim",
        type=positive_int,
        default=None,
        help="feature size (default: 32 for t2r, 64 for rfa, head_dim for hedgehog and elu)",
    )
    parser.add_argument("--untie-qk", action="store_true", help="separate feature maps for queries and keys")
    add_attention_flags(parser)
    parser.add_argument("--chunk-size", type=positive_int, default=64, help="block length of the chunked form")
    parser.add_argument("--seed", type=int, default=0, help="seeds the new feature maps")
    parser.add_argument("--out", type=Path, required=True, help="folder to write the converted model to")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from t2r.hub import check_output_folder, load_teacher, save_converted
    from t2r.modeling.config import T2RConfig
    from t2r.modeling.convert import convert

    config = T2RConfig(
        feature_map=args.feature_map,
        feature_dim=args.feature_dim,
        tie_qk=not args.untie_qk,
        chunk_size=args.chunk_size,
        seed=args.seed,
        base_model=args.model,
        **attention_settings(args),
    )
    check_output_folder(args.out, args.overwrite)
    teacher, tokenizer = load_teacher(args.model)
    model = convert(teacher, config)
    save_converted(model, tokenizer, args.out, overwrite=args.overwrite)
    print(summary(args, model, teacher.config.model_type), file=sys.stderr)


def summary(args: argparse.Namespace, model: Any, model_type: str) -> str:
    """One line: what was converted to what, the new parameters and the state per sequence."""
    config = model.config
    trained = sum(
        p.numel()
        for a in model.attentions
        for n, p in a.named_parameters()
        if "feature_map" in n or "window_logit" in n
    )
    window = f"window {config.window} + " if config.window else ""
    state = model.init_state(1)
    if config.feature_map == "none":
        return (
            f"converted {args.model} ({model_type}, {len(model.attentions)} layers) to softmax over {config.sinks} "
            f"sinks + a sliding window of {config.window} tokens, no linear part (no training needed) -> "
            f"{args.out}; state {state.nbytes() / 2**20:.2f} MiB per sequence"
        )
    kept = ""
    if config.softmax_layers:
        kept = (
            f", {len(config.softmax_layers)} kept softmax: their KV cache grows by "
            f"{state.bytes_per_token():,} bytes per token"
        )
    local = [a.window for a in model.attentions if getattr(a, "feature_dim", None) == 0]
    if local:
        kept += f", {len(local)} local kept exact over their window of {max(local)} (ring buffer)"
    return (
        f"converted {args.model} ({model_type}, {len(model.attentions)} layers{kept}) "
        f"to {window}linear attention with {args.feature_map} feature maps ({trained:,} new parameters) "
        f"-> {args.out}; state {state.nbytes() / 2**20:.2f} MiB per sequence"
    )
