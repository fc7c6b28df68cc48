"""Where does the teacher look when it answers a pass-key prompt? A probe, not a benchmark.

    python scripts/passkey_attention_probe.py [LENGTH [DEPTH]]   # defaults: 2000 0.1

One pass-key prompt (The Picture of Dorian Gray, the key of trial 0) through the teacher with its
attention weights, and per layer and key/value head: the rank of the key's best digit among the
positions that left a 212-slot window (by the attention the last query gives them, and by the
sum over the last 32 queries, SnapKV's observation window), and the most of the last query's
attention any query head puts on the key's 5 digits. BENCHMARKS.md's notes on the global cache
quote it: a cache chosen by attention has to hold the digits in heads that barely look at them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from t2r.data.textfile import read_text
from t2r.evaluation.passkey import Filler, build_prompt, draw_keys
from t2r.hub import load_model

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "runs" / "recipe-window-heavy" / "train" / "model"  # the shipped model: its teacher and tokenizer
FILLER = ROOT.parent / "shared" / "data" / "books" / "pg174.txt"
WINDOW = 212  # the shipped model's 4 sinks + 208 window slots at 9.79 MB (the cache's rows)
OBSERVE = 32
SLOTS = 64  # the global cache's slots per key/value head in the pass-key rows


def main() -> None:
    length = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    depth = float(sys.argv[2]) if len(sys.argv) > 2 else 0.1
    model, tokenizer = load_model(str(MODEL))
    teacher, _ = load_model(model.config.base_model)
    teacher.config._attn_implementation = "eager"  # the weights themselves, not a fused kernel's output
    prompt = build_prompt(
        Filler(read_text(FILLER), tokenizer), tokenizer, length, depth, draw_keys(0, length, depth, 0)
    )
    digits = list(range(prompt.key_position, prompt.key_position + 5))
    with torch.no_grad():
        attentions = teacher(prompt.ids[None], output_attentions=True).attentions
    left = length - WINDOW  # positions that left the window by the prompt's end
    strongest, held, heads_seen = 0.0, 0, 0
    for index, weights in enumerate(attentions):
        heads = weights.shape[1]
        kv_heads = teacher.config.num_key_value_heads
        last = weights[0, :, -1].reshape(kv_heads, heads // kv_heads, -1).sum(1)  # [G, T]
        observed = weights[0, :, -OBSERVE:].reshape(kv_heads, heads // kv_heads, OBSERVE, -1).sum((1, 2))

        def rank(scores: torch.Tensor) -> list[int]:
            return [int((row[:left] > row[digits].max()).sum()) + 1 for row in scores]

        held += sum(r <= SLOTS for r in rank(observed))
        heads_seen += kv_heads
        mass = float(weights[0, :, -1, digits].sum(-1).max())
        strongest = max(strongest, mass)
        print(f"layer {index:2d}: digit rank by the last query {rank(last)}, by the last {OBSERVE} {rank(observed)}; "
              f"most of the last query's attention on the digits in one head {mass:.3f}")  # fmt: skip
    summary = (
        f"{length} tokens, depth {depth}, key at {prompt.key_position}: the strongest head puts {strongest:.3f} "
        f"of the last query's attention on the key's digits; {left} positions left the window; a digit "
        f"is among the {SLOTS} best by the last {OBSERVE} queries in {held} of {heads_seen} key/value heads"
    )
    print(summary)


if __name__ == "__main__":
    main()
