"""Which tokens does a global cache hold after a pass-key prompt? A probe, not a benchmark.

    python scripts/passkey_cache_probe.py [SLOTS [LENGTH [DEPTH [relative]]]]   # defaults: 64 4000 0.5

`relative` tries another rule for one run: the self-recall error divided by ||v||^2 (a probe of the
criterion, not an option of t2r).

Prefills one pass-key prompt (The Picture of Dorian Gray, the key of trial 0) through the shipped
model with a global cache of SLOTS, and prints per layer and key/value head how many of the key
sentence's tokens (its first 30 positions) the cache holds at the end: each cached key is matched
to the token whose key it is. BENCHMARKS.md's notes on the global cache quote its counts.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import t2r.ops.dispatch as dispatch
import t2r.ops.global_cache as global_cache
from t2r.data.textfile import read_text
from t2r.evaluation.passkey import Filler, build_prompt, draw_keys
from t2r.hub import load_model

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "runs" / "recipe-window-heavy" / "train" / "model"
FILLER = ROOT.parent / "shared" / "data" / "books" / "pg174.txt"


def main() -> None:
    slots, length, depth = (int(sys.argv[1]) if len(sys.argv) > 1 else 64,
                            int(sys.argv[2]) if len(sys.argv) > 2 else 4000,
                            float(sys.argv[3]) if len(sys.argv) > 3 else 0.5)  # fmt: skip
    if len(sys.argv) > 4 and sys.argv[4] == "relative":
        absolute = global_cache.self_recall_error
        global_cache.self_recall_error = lambda linear, phi, values, eps: (
            absolute(linear, phi, values, eps) / (values.square().sum(-1) + 1e-6)
        )
    model, tokenizer = load_model(str(MODEL))
    model.with_global_cache(slots)
    prompt = build_prompt(
        Filler(read_text(FILLER), tokenizer), tokenizer, length, depth, draw_keys(0, length, depth, 0)
    )
    sentence = set(range(prompt.insert_at, prompt.insert_at + 30))
    layers: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer: every key [G, T, D], the cache's [G, N, D]
    scan = dispatch.scanned_windowed_attention

    def recorded(q, k, v, *args, **kwargs):  # the prefill scan of a cached state, watched
        out, final = scan(q, k, v, *args, **kwargs)
        layers.append((k[0].clone(), final.global_keys[0].clone()))
        return out, final

    dispatch.scanned_windowed_attention = recorded
    with torch.no_grad():
        model(prompt.ids[None], form="chunked", logits_to_keep=1)
    total = 0
    for index, (keys, cached) in enumerate(layers):
        per_head = []
        for head in range(keys.shape[0]):
            distance = torch.cdist(cached[head], keys[head])  # [N, T]
            tokens = {int(t) for t, d in zip(distance.argmin(-1), distance.min(-1).values, strict=True) if d < 1e-4}
            per_head.append(len(tokens & sentence))
        total += sum(per_head)
        print(f"layer {index:2d}: key-sentence tokens cached per key/value head {per_head}")
    heads = sum(keys.shape[0] for keys, _ in layers)
    print(f"{total} cached (token, head) pairs of {len(sentence)} tokens x {heads} heads; {slots} slots, "
          f"{length} tokens, key at {prompt.key_position}")  # fmt: skip


if __name__ == "__main__":
    main()
