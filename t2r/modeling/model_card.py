"""The model card of a converted folder (its README.md, as the hub shows it).

Rendered from what the folder holds: config.json (the teacher and the conversion settings),
training.json (written by `t2r train`: the command, the data, tokens and minutes) and
eval_results.json (appended to by `t2r eval`: the figures measured for this folder). Nothing in a
card is typed by hand: re-rendering the same folder gives the same card.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TRAINING_FILE = "training.json"
EVAL_FILE = "eval_results.json"


def read_optional(path: Path) -> Any:
    """A JSON file's content, or None when it is absent or unreadable (a card never fails a save)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def describe_attention(settings: dict[str, Any]) -> str:
    feature_map, window = settings.get("feature_map"), settings.get("window", 0)
    if feature_map == "none":
        return f"softmax over {settings.get('sinks', 0)} sinks + a sliding window of {window} tokens (no training)"
    linear = f"linear attention with the {feature_map} feature map"
    if settings.get("linear_heads") == "kv":
        linear += " (one state per key/value head)"
    if not window:
        return linear
    return (
        f"softmax over {settings.get('sinks', 0)} sinks + the last {window} tokens, {linear} for older ones "
        f"(half-life {settings.get('half_life')} tokens)"
    )


def render(config: dict[str, Any], training: dict[str, Any] | None, evaluations: list[dict[str, Any]] | None) -> str:
    """The card's markdown, with the hub's YAML header."""
    settings = config.get("t2r", {})
    base = config.get("base_config", {})
    teacher = settings.get("base_model") or base.get("_name_or_path") or "an unnamed teacher"
    header = ["---", "library_name: t2r", "pipeline_tag: text-generation", "tags:", "- t2r", "- linear-attention"]
    header += ["- rnn", "---", ""]
    lines = [
        f"# {teacher}, converted to a recurrent network by t2r",
        "",
        f"The teacher `{teacher}` ({base.get('model_type', '?')}) with its attention replaced: "
        f"{describe_attention(settings)}. Memory is constant while generating: a state of fixed size per "
        "sequence instead of a KV cache that grows with every token.",
        "",
        "```python",
        "import t2r  # registers the model type with transformers",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'model = AutoModelForCausalLM.from_pretrained("FOLDER_OR_HUB_ID")  # or trust_remote_code=True without import',
        'tokenizer = AutoTokenizer.from_pretrained("FOLDER_OR_HUB_ID")',
        "```",
        "",
        "## Conversion settings",
        "",
        "| setting | value |",
        "|---|---|",
        *(f"| {key} | {json.dumps(value)} |" for key, value in sorted(settings.items())),
    ]
    if training:
        settings_used = training.get("settings") or {}
        lines += ["", "## Training", ""]
        if training.get("tokens") is not None:
            lines.append(f"{training['tokens']:,} training tokens, {training.get('minutes', 0):.1f} minutes.")
        for key in ("data", "distill_data"):
            if settings_used.get(key):
                lines.append(f"- {key.replace('_', ' ')}: {', '.join(map(str, settings_used[key]))}")
        flags = [
            f"--{key.replace('_', '-')} {value}" if value is not True else f"--{key.replace('_', '-')}"
            for key, value in sorted(settings_used.items())
            if key not in ("command", "data", "distill_data", "out", "resume") and value not in (None, False)
        ]
        lines += ["", "`t2r train` settings:", "", "```", "t2r train " + " ".join(flags), "```"]
    if evaluations:
        lines += ["", "## Evaluation (measured by `t2r eval` on this folder)", ""]
        lines += ["| data | tokens | perplexity | KL to the teacher | top-1 agreement |", "|---|---:|---:|---:|---:|"]
        for record in evaluations:
            kl, agreement = record.get("kl"), record.get("top1_agreement")
            lines.append(
                f"| {record.get('data', '?')} | {record.get('tokens', 0):,} | {record.get('perplexity', 0):.3f} | "
                f"{'-' if kl is None else f'{kl:.4f}'} | {'-' if agreement is None else f'{agreement:.4f}'} |"
            )
    return "\n".join(header + lines) + "\n"


def render_folder(folder: Path, config: dict[str, Any]) -> str:
    """The card of `folder` whose config.json is (or will be) `config`."""
    return render(config, read_optional(folder / TRAINING_FILE), read_optional(folder / EVAL_FILE))
