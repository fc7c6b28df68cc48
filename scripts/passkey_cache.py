"""Pass-key retrieval with a sparse global cache, beside the teacher and the window of equal bytes.

    python scripts/passkey_cache.py                          # every (cache, length) not yet measured
    python scripts/passkey_cache.py --caches 64 --lengths 4000
    python scripts/passkey_cache.py --caches 64 --lengths 2000,4000 --select prompt   # SnapKV's choice
    python scripts/passkey_cache.py --report                 # only rewrite BENCHMARKS.md from the JSON

For each global cache size N and prompt length: `t2r eval MODEL --passkey --global-cache N --baseline`
on a novel no recipe trains on (The Picture of Dorian Gray, pg174): 3 depths x 3 keys, each key ranked
among 100 candidates by the teacher, the converted model with its cache, and the training-free window
of the same state bytes (cache included). Each run is written to benchmarks/passkey_cache/ as it
completes (a cut-off run resumes where it stopped); BENCHMARKS.md's section is made from those files.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from t2r.evaluation.markdown import replace_section

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
OUT = ROOT / "benchmarks" / "passkey_cache"
MODEL = ROOT / "runs" / "recipe-window-heavy" / "train" / "model"  # the shipped t2r-smollm2-135m
FILLER = SHARED / "books" / "pg174.txt"  # held out: no recipe trains on it
MODELS = ("teacher", "model", "baseline")


def result_path(slots: int, length: int, select: str) -> Path:
    return OUT / f"cache{slots}-{length}{'' if select == 'recall' else '-' + select}.json"


def measure(model: str, slots: int, length: int, select: str) -> None:
    path = result_path(slots, length, select)
    if path.exists():
        return
    argv = [sys.executable, "-m", "t2r", "eval", model, "--passkey", "--data", str(FILLER), "--lengths", str(length)]
    argv += ["--global-cache", str(slots), "--global-select", select, "--baseline", "--json"]
    print("$ " + " ".join(argv[1:]), file=sys.stderr, flush=True)
    out = subprocess.run(argv, check=True, stdout=subprocess.PIPE, text=True).stdout
    OUT.mkdir(parents=True, exist_ok=True)
    path.write_text(out)


def table() -> str:
    lines = [
        "Made by `python scripts/passkey_cache.py` (benchmarks/passkey_cache/). The shipped model "
        "(`t2r-smollm2-135m`) given a global cache of N slots per layer and key/value head at load time "
        "(`t2r eval --passkey --global-cache N --baseline`), the teacher, and the training-free window of the "
        "model's state bytes with the cache (4 sinks + W slots). Filler: The Picture of Dorian Gray (held "
        "out); 3 depths (0.1, 0.5, 0.9) x 3 keys per length; rank-1 = the key ranked first among 100 candidates.",
        "",
        "Select: how the prompt's prefill fills the cache (`--global-select`): recall, token by token by "
        "self-recall error (LoLA); prompt, the keys the prompt's last 32 queries attend to most (SnapKV).",
        "",
        "| cache N | select | length | state MB | window slots | teacher rank-1 | model rank-1 | window rank-1 | "
        "mean rank (teacher / model / window) | greedy exact (teacher / model / window) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def row_key(path: Path) -> tuple[int, int, str]:
        slots, length, *select = path.stem[5:].split("-")
        return int(slots), int(length), select[0] if select else "recall"

    for path in sorted(OUT.glob("cache*.json"), key=row_key):
        record = json.loads(path.read_text())
        slots, length, select = row_key(path)
        baseline = record.get("baseline", {})
        counts, ranks, exact = {}, {}, {}
        for name in MODELS:
            trials = [t for c in record["cases"] if c["model"] == name for t in c["outcomes"]]
            counts[name] = f"{sum(t['rank'] == 1 for t in trials)}/{len(trials)}"
            ranks[name] = f"{sum(t['rank'] for t in trials) / len(trials):.1f}" if trials else "-"
            exact[name] = f"{sum(t['exact'] for t in trials)}"
        state = record.get("model_state_bytes")
        lines.append(
            f"| {slots} | {select} | {length} | {'-' if state is None else f'{state / 1e6:.2f}'} | "
            f"{baseline.get('window', '-')} | {counts['teacher']} | {counts['model']} | {counts['baseline']} | "
            f"{' / '.join(ranks[n] for n in MODELS)} | {' / '.join(exact[n] for n in MODELS)} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(MODEL))
    parser.add_argument("--caches", default="64", help="comma-separated global cache sizes")
    parser.add_argument("--lengths", default="1000,2000,4000", help="comma-separated prompt lengths")
    parser.add_argument("--select", default="recall", choices=("recall", "prompt"), help="--global-select")
    parser.add_argument("--report", action="store_true", help="only rewrite the BENCHMARKS.md section")
    args = parser.parse_args()
    if not args.report:
        for slots in (int(x) for x in args.caches.split(",")):
            for length in (int(x) for x in args.lengths.split(",")):
                measure(args.model, slots, length, args.select)
    replace_section(ROOT / "BENCHMARKS.md", "passkey-cache", table(), "Pass-key with a global cache")


if __name__ == "__main__":
    main()
