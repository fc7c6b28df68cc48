"""Decode speed and state size of converted models of the new teachers, against their teachers.

    python scripts/teacher_speed.py --run gemma3-local=runs/recipe-gemma3-local/train/model \\
        --run qwen-coder=runs/recipe-qwen-coder/train/model [--contexts 256,2048]

Each model runs `t2r bench` (batch 1, fp32 weights: the converted model's fast step and the
teacher, eager and compiled or with --no-compile eager only, and llama.cpp on the teacher's GGUF,
in the interleaved rounds of `t2r bench`) into
benchmarks/teacher_speed/NAME/bench.json. A table of every model measured so far (one entry per
name in benchmarks/teacher_speed.json, replaced when measured again) goes into BENCHMARKS.md,
section "teacher-speed".
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from t2r.evaluation.markdown import replace_section  # noqa: E402

OUT = ROOT / "benchmarks" / "teacher_speed"
SUMMARY = ROOT / "benchmarks" / "teacher_speed.json"


def bench(name: str, folder: Path, options: argparse.Namespace) -> dict:
    """Run `t2r bench` on one converted model; its bench.json."""
    out = OUT / name
    args = ["bench", str(folder), "--contexts", options.contexts, "--batches", "1", "--weights", "fp32",
            "--repeats", str(options.repeats), "--no-reference-step", "--out", str(out), "--no-report",
            *(["--no-compile"] if options.no_compile else [])]  # fmt: skip
    print("$ t2r " + " ".join(args), file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "t2r", *args], check=True, cwd=ROOT)
    return json.loads((out / "bench.json").read_text())


def rows(name: str, result: dict) -> list[str]:
    """Table rows of one model: per context, each engine's decode speed and state bytes."""
    lines = []
    cases = [case for case in result["bench"]["cases"] if case["batch"] == 1]
    for context in sorted({case["context"] for case in cases}):
        by_engine = {case["engine"]: case for case in cases if case["context"] == context}
        teacher_speed = by_engine["teacher"]["decode_tokens_per_s"]
        for engine, case in by_engine.items():
            state = case["state_bytes_per_sequence"]
            # llama.cpp's cache lives inside the library: not measured, so not claimed.
            state_text = f"{state / 2**20:.2f}" if state else "-"
            speed = case["decode_tokens_per_s"]
            low, high = case.get("decode_tokens_per_s_min"), case.get("decode_tokens_per_s_max")
            spread = f" ({low:.1f}-{high:.1f})" if low is not None else ""
            ratio = speed / teacher_speed
            lines.append(f"| {name} | {context:,} | {engine} | {speed:.1f}{spread} | {ratio:.2f} | {state_text} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", required=True, help="NAME=FOLDER of a converted model")
    parser.add_argument("--contexts", default="256,2048")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--no-compile", action="store_true", help="eager rows only (both sides)")
    args = parser.parse_args()
    summary = json.loads(SUMMARY.read_text()) if SUMMARY.exists() else {}
    for item in args.run:
        name, _, folder = item.partition("=")
        if not folder or not (Path(folder) / "config.json").exists():
            parser.error(f"--run {item}: expected NAME=FOLDER of a converted model")
        summary[name] = {"folder": folder, "bench": bench(name, Path(folder), args)}
        SUMMARY.write_text(json.dumps(summary, indent=2) + "\n")
    commands = [f"`{entry['bench']['command']}`" for entry in summary.values()]
    body = "\n".join([
        "`python scripts/teacher_speed.py --run NAME=FOLDER ...`: `t2r bench` at batch 1, fp32 weights, the "
        "converted model's fast step against the teacher (transformers, its KV cache; compiled rows beside "
        "compiled rows where measured) and llama.cpp on the teacher's GGUF, in interleaved rounds of one run "
        "(medians). x teacher = decode tokens/s over the eager teacher's at the same context. State = bytes "
        "kept per sequence at that context.",
        "",
        "| model | context | engine | decode tokens/s, median (min-max) | x teacher | state MiB |",
        "|---|---:|---|---:|---:|---:|",
        *(line for name, entry in summary.items() for line in rows(name, entry)),
        "",
        "Commands (run by the script): " + "; ".join(commands) + ".",
    ])  # fmt: skip
    replace_section(ROOT / "BENCHMARKS.md", "teacher-speed", body, "New teachers: decode speed and state size")


if __name__ == "__main__":
    main()
