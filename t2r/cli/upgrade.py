"""`t2r upgrade DIR`: rewrite a folder saved by an older t2r in today's format, in place.

Folders of format 1 (before t2r's models were transformers models) load in t2r as they are; after
the upgrade they load through transformers' Auto classes too. The weights are not touched.
"""

from __future__ import annotations

import argparse
from typing import Any

from t2r.cli.common import Formatter


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "upgrade",
        help="rewrite an older converted folder's config for transformers' Auto classes (weights untouched)",
        formatter_class=Formatter,
    )
    parser.add_argument("model", help="a converted model folder")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from t2r.hub import upgrade_folder

    before, after = upgrade_folder(args.model)
    if before == after:
        print(f"{args.model}: already format {after}; card and loader files rewritten")
    else:
        print(f"{args.model}: format {before} -> {after}; loads with AutoModelForCausalLM.from_pretrained")
