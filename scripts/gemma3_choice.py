"""Gemma 3 270M, the two ways to convert a teacher whose layers are mostly local: keep the local
(sliding-window) layers as exact softmax over a ring buffer and convert only the global layers
(`--keep-local`), or convert every layer. Quality, state and decode speed side by side, from the
runs' own JSON (no figure typed here):

    python scripts/recipe.py --recipe gemma3-local      # -> benchmarks/recipe_gemma3_local.json
    python scripts/recipe.py --recipe gemma3-all        # -> benchmarks/recipe_gemma3_all.json
    python scripts/teacher_speed.py --run gemma3-local=... --run gemma3-all-untrained=...
    python scripts/gemma3_choice.py                     # -> BENCHMARKS.md, section "gemma3-choice"

Decode speed depends on the model's shapes, not its weights: the speed rows of "convert all" were
measured on the same conversion before training (runs/gemma3-all-untrained).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from t2r.evaluation.markdown import replace_section  # noqa: E402

CHOICES = {  # label: (recipe JSON, name in teacher_speed.json)
    "local layers kept, 3 global layers converted (`--keep-local`)": ("recipe_gemma3_local.json", "gemma3-local"),
    "every layer converted": ("recipe_gemma3_all.json", "gemma3-all-untrained"),
}


def decode_rate(bench: dict, engine: str, context: int) -> float:
    (case,) = [c for c in bench["cases"] if c["engine"] == engine and c["context"] == context and c["batch"] == 1]
    return case["decode_tokens_per_s"]


def main() -> None:
    speed = json.loads((ROOT / "benchmarks" / "teacher_speed.json").read_text())
    rows, teacher = [], None
    for label, (recipe_file, speed_name) in CHOICES.items():
        recipe = json.loads((ROOT / "benchmarks" / recipe_file).read_text())
        bench = speed[speed_name]["bench"]
        contexts = bench["settings"]["contexts"]
        teacher = recipe["teacher"]
        relative = [decode_rate(bench, "converted (fast)", n) / decode_rate(bench, "teacher", n) for n in contexts]
        rows.append(
            f"| {label} | {recipe['converted']['perplexity']:.2f} | {recipe['ratio']:.2f} | "
            f"{recipe['converted']['kl']:.3f} | {recipe['converted']['top1_agreement']:.3f} | "
            f"{recipe['state_bytes_per_sequence'] / 2**20:.2f} | "
            + " | ".join(f"{r:.2f}" for r in relative)
            + f" | {recipe['train_minutes']:.1f} |"
        )
    teacher_kv = {c["context"]: c["state_bytes_per_sequence"] for c in bench["cases"] if c["engine"] == "teacher"}
    body = "\n".join([
        f"Both trained by the same recipe (same steps, tokens and flags but `--keep-local`), scored on the first "
        f"{teacher['tokens']:,} scored tokens of WikiText-2 test (teacher: {teacher['perplexity']:.2f}). "
        "Decode: fp32, batch 1, the fast step over the eager teacher in the same `t2r bench` run "
        "(section teacher-speed).",
        "",
        "| choice | perplexity | x teacher | KL | top-1 agreement | state MiB per sequence | "
        + " | ".join(f"decode x teacher at {n:,}" for n in contexts) + " | training minutes |",
        "|---|---:|---:|---:|---:|---:|" + "---:|" * len(contexts) + "---:|",
        *rows,
        "",
        "The teacher's KV cache: " + ", ".join(f"{teacher_kv[n] / 2**20:.2f} MiB at {n:,}" for n in contexts)
        + " (and growing with the context).",
    ])  # fmt: skip
    replace_section(ROOT / "BENCHMARKS.md", "gemma3-choice", body, "Gemma 3: keep the local layers, or convert all?")
    print(body)


if __name__ == "__main__":
    main()
