"""transformers' `generate()` against `t2r generate`'s own loop, on the same converted model.

    python scripts/generate_speed.py [--model t2r-smollm2-135m]

Batch 1, greedy, the same prompt (the first --prompt-tokens tokens of Pride and Prejudice, from
../shared/data) and the same weights for both. The
two engines alternate for --rounds rounds (A B A B ...: the machine's drift hits both alike); a
round's speed is the steady decode rate, from the second new token to the last one (each token's
time taken by a callback: generate()'s streamer, t2r's on_token), so prefill and the first step are
left out of both alike. Both must emit the same tokens. Then generate() runs once for 64 and once
for --long-tokens new tokens and the sizes of the caches it returns are compared (constant state).
Writes benchmarks/generate_speed.{json,png} and a BENCHMARKS.md section.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM
from transformers.generation.streamers import BaseStreamer

from t2r.evaluation.markdown import replace_section
from t2r.inference.generate import generate
from t2r.inference.sampling import Sampling

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
OUT = ROOT / "benchmarks"


class Clock(BaseStreamer):
    """Times every token generate() emits (the first put() is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.calls = 0

    def put(self, value: torch.Tensor | int) -> None:
        self.calls += 1
        if self.calls > 1:
            self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def steady_rate(times: list[float]) -> float:
    """Tokens per second from the second emitted token to the last."""
    return (len(times) - 2) / (times[-1] - times[1])


def prompt_ids(tokenizer, tokens: int) -> torch.Tensor:
    book = SHARED / "books" / "pg1342.txt"
    if not book.is_file():
        sys.exit(f"{book} is missing (the prompt's text)")
    text = book.read_text()
    return torch.tensor(tokenizer(text, add_special_tokens=False).input_ids[:tokens])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="t2r-smollm2-135m", help="a converted model folder or a ready model")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--long-tokens", type=int, default=4096, help="new tokens of the cache-size check")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    from t2r.hub import READY, ready_model_folder

    folder = ready_model_folder(args.model) if args.model in READY else args.model
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = prompt_ids(tokenizer, args.prompt_tokens)
    greedy = Sampling(greedy=True)
    rounds = []
    for round_index in range(args.rounds):
        clock = Clock()
        with torch.no_grad():
            out = model.generate(
                ids[None], max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=None, streamer=clock
            )
        hf_tokens = out[0, len(ids) :].tolist()
        ticks = Clock()
        ticks.calls = 1  # t2r's callback sees new tokens only
        result = generate(model.t2r, ids, args.new_tokens, greedy, ticks.put)
        if result.new_tokens != hf_tokens:
            sys.exit("generate() and t2r's loop emitted different tokens")
        row = {"round": round_index, "generate": steady_rate(clock.times), "t2r": steady_rate(ticks.times)}
        rounds.append(row)
        print(f"round {round_index}: generate() {row['generate']:.1f} tok/s, t2r {row['t2r']:.1f} tok/s", flush=True)
    ratios = [row["generate"] / row["t2r"] for row in rounds]
    sizes = {}
    for new_tokens in (64, args.long_tokens):
        with torch.no_grad():
            out = model.generate(
                ids[None], max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                return_dict_in_generate=True,
            )  # fmt: skip
        sizes[new_tokens] = out.cache.nbytes()
        print(f"cache after {new_tokens} new tokens: {sizes[new_tokens]:,} bytes", flush=True)
    command = " ".join(["python scripts/generate_speed.py", *sys.argv[1:]])
    summary = {
        "model": args.model,
        "prompt_tokens": len(ids),
        "new_tokens": args.new_tokens,
        "threads": torch.get_num_threads(),
        "rounds": rounds,
        "median_generate": statistics.median(r["generate"] for r in rounds),
        "median_t2r": statistics.median(r["t2r"] for r in rounds),
        "median_ratio": statistics.median(ratios),
        "min_ratio": min(ratios),
        "cache_bytes": {str(k): v for k, v in sizes.items()},
        "command": command,
    }
    OUT.mkdir(exist_ok=True)
    (OUT / "generate_speed.json").write_text(json.dumps(summary, indent=2))
    plot(rounds, OUT / "generate_speed.png")
    body = "\n".join(
        [
            "| engine | decode tok/s (median) | min-max over rounds |",
            "|---|---:|---:|",
            *(
                f"| {name} | {summary[f'median_{key}']:.1f} | "
                f"{min(r[key] for r in rounds):.1f}-{max(r[key] for r in rounds):.1f} |"
                for name, key in (
                    ("transformers `model.generate()`", "generate"),
                    ("t2r's loop (`t2r generate`)", "t2r"),
                )
            ),
            "",
            f"generate() / t2r per round: median {summary['median_ratio']:.3f}, lowest {summary['min_ratio']:.3f} "
            f"({len(rounds)} interleaved rounds; batch 1, greedy, fp32, eager, {len(ids)}-token prompt, "
            f"{args.new_tokens} new tokens, {summary['threads']} threads; both emitted the same tokens). "
            f"Cache returned by generate(): {sizes[64]:,} bytes after 64 new tokens, "
            f"{sizes[args.long_tokens]:,} after {args.long_tokens:,}.",
            f"Command: `{command}`.",
            "![generate() vs t2r](benchmarks/generate_speed.png)",
        ]
    )
    replace_section(ROOT / "BENCHMARKS.md", "generate-speed", body, "transformers `generate()` against t2r's own loop")


def plot(rounds: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5))
    x = [r["round"] for r in rounds]
    axis.plot(x, [r["generate"] for r in rounds], "o-", label="transformers generate()")
    axis.plot(x, [r["t2r"] for r in rounds], "s-", label="t2r generate")
    axis.set_xlabel("round (engines interleaved)")
    axis.set_ylabel("decode tokens / s (batch 1)")
    axis.set_ylim(bottom=0)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
