"""Prefill speed of a converted model by chunk size of the chunked form, beside the teacher's.

    python scripts/prefill_chunks.py runs/recipe-hybrid-kv/train/model [--contexts 256,2048,8192]
        [--chunks 32,64,128,256] [--rounds 3]

The chunked form is exact at any chunk size (tests/test_ops.py): the chunk size only trades the
local block's quadratic work (C + W slots per query) against the number of chunks and the
per-chunk overhead, so the best size depends on the context and the machine. One process, fp32,
eager, batch 1, a prompt of WikiText-2 validation tokens; every (context, engine) pair runs once
per round, in the same order each round (teacher, then each chunk size: interleaved, so drift hits
all alike), after one untimed warm-up each; medians with min-max. Writes
benchmarks/prefill_chunks.json and the BENCHMARKS.md section "prefill-chunks".
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from t2r.evaluation.markdown import replace_section  # noqa: E402
from t2r.hub import load_converted, load_model  # noqa: E402
from t2r.modeling.attention import LinearAttention  # noqa: E402

PROMPT_TEXT = ROOT.parent / "shared" / "data" / "wikitext2" / "valid.txt"


@torch.no_grad()
def prefill_seconds(model: torch.nn.Module, ids: torch.Tensor, converted: bool) -> float:
    start = time.perf_counter()
    if converted:
        model(ids, form="chunked", logits_to_keep=1)
    else:
        model(ids, logits_to_keep=1)
    return time.perf_counter() - start


def set_chunk_size(model: torch.nn.Module, size: int) -> None:
    for module in model.modules():
        if isinstance(module, LinearAttention):
            module.chunk_size = size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="a converted model folder")
    parser.add_argument("--contexts", default="256,2048,8192")
    parser.add_argument("--chunks", default="32,64,128,256")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    contexts = [int(x) for x in args.contexts.split(",")]
    chunks = [int(x) for x in args.chunks.split(",")]
    converted, tokenizer = load_converted(args.model)
    teacher, _ = load_model(converted.config.base_model)
    text = PROMPT_TEXT.read_text(encoding="utf-8")[: 60 * max(contexts)]
    tokens = torch.tensor(tokenizer(text).input_ids[: max(contexts)])[None]
    engines = ["teacher", *(f"chunk {size}" for size in chunks)]
    times: dict[str, dict[int, list[float]]] = {name: {n: [] for n in contexts} for name in engines}
    for round_index in range(args.rounds + 1):  # round 0: the untimed warm-up
        for context in contexts:
            ids = tokens[:, :context]
            for name in engines:
                if name == "teacher":
                    seconds = prefill_seconds(teacher, ids, converted=False)
                else:
                    set_chunk_size(converted, int(name.split()[1]))
                    seconds = prefill_seconds(converted, ids, converted=True)
                if round_index:
                    times[name][context].append(seconds)
        print(f"round {round_index} done", file=sys.stderr, flush=True)
    rates = {name: {n: [n / s for s in runs] for n, runs in per.items()} for name, per in times.items()}
    record = {"model": str(args.model), "contexts": contexts, "chunks": chunks, "rounds": args.rounds,
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "default_chunk_size": converted.config.chunk_size,
              "prefill_tokens_per_s": rates}  # fmt: skip
    out = ROOT / "benchmarks" / "prefill_chunks.json"
    out.write_text(json.dumps(record, indent=2) + "\n")

    def cell(name: str, context: int) -> str:
        runs = rates[name][context]
        ratio = statistics.median(runs) / statistics.median(rates["teacher"][context])
        return f"{statistics.median(runs):,.0f} ({min(runs):,.0f}-{max(runs):,.0f}); {ratio:.2f}x"

    body = "\n".join([
        f"`python scripts/prefill_chunks.py {args.model} --contexts {args.contexts} --chunks {args.chunks} "
        f"--rounds {args.rounds}` — prefill tokens/s, median (min-max) of {args.rounds} interleaved rounds, and "
        f"x the teacher (transformers, fp32, eager) in the same rounds; {torch.get_num_threads()} threads, batch 1.",
        "",
        "| engine | " + " | ".join(f"{n:,} tokens" for n in contexts) + " |",
        "|---|" + "---:|" * len(contexts),
        *(f"| {name} | " + " | ".join(cell(name, n) for n in contexts) + " |" for name in engines),
    ])  # fmt: skip
    replace_section(ROOT / "BENCHMARKS.md", "prefill-chunks", body, "Prefill by chunk size")
    print(body)


if __name__ == "__main__":
    main()
