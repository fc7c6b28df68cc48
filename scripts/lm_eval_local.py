"""lm-evaluation-harness, offline, on the teacher and a converted model: one table.

    python scripts/lm_eval_local.py [--model t2r-smollm2-135m]

No benchmark dataset of the suite (`t2r.evaluation.harness.SUITE`) is reachable here, so the two
local tasks of `t2r.evaluation.harness` run instead, through the same lm-eval path (`--model hf`):
- t2r_local_cloze: 200 passages of Dracula (no recipe trains on it), 60 words each, then the next
  word among four (the others drawn from the book; seeded), scored by loglikelihood (acc, acc_norm);
- t2r_local_text: rolling loglikelihood over the first 20,000 words of WikiText-2 test, in documents
  of about 300 words (word and byte perplexity, bits per byte).
The teacher runs from t2r's fp32 cache of its GGUF file. Writes benchmarks/lm_eval_local.json and a
BENCHMARKS.md section.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from t2r.evaluation.harness import (
    LOCAL_CLOZE,
    LOCAL_TEXT,
    cloze_items,
    evaluate_tasks,
    text_documents,
    write_local_tasks,
)
from t2r.evaluation.markdown import replace_section
from t2r.hub import READY, ready_model_folder, teacher_location

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
OUT = ROOT / "benchmarks"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="t2r-smollm2-135m", help="a converted model folder or a ready model")
    parser.add_argument("--teacher", default="smollm2-135m")
    parser.add_argument("--cloze", type=int, default=200)
    parser.add_argument("--words", type=int, default=20_000)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    book = (SHARED / "books" / "pg345.txt").read_text()
    wikitext = " ".join((SHARED / "wikitext2" / "test.txt").read_text().split(" ")[: args.words])
    tasks_dir = ROOT / "runs" / "lm_eval_tasks"
    tasks = write_local_tasks(tasks_dir, cloze_items(book, args.cloze), text_documents(wikitext, 300))
    rows = {}
    model = str(ready_model_folder(args.model)) if args.model in READY else args.model
    for name, location in (("teacher", teacher_location(args.teacher)), ("converted", model)):
        start = time.perf_counter()
        model_args = f"pretrained={location},device=cpu" + (",trust_remote_code=True" if name == "converted" else "")
        rows[name] = evaluate_tasks(model_args, tasks, tasks_dir, args.batch_size)
        rows[name]["seconds"] = time.perf_counter() - start
        print(name, json.dumps(rows[name]), flush=True)
    command = " ".join(["python scripts/lm_eval_local.py", *sys.argv[1:]])
    OUT.mkdir(exist_ok=True)
    (OUT / "lm_eval_local.json").write_text(json.dumps({"command": command, "model": args.model, **rows}, indent=2))
    lines = [
        "| model | cloze acc | cloze acc_norm | text word perplexity | byte perplexity | bits per byte |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, results in rows.items():
        cloze, text = results[LOCAL_CLOZE], results[LOCAL_TEXT]
        lines.append(
            f"| {name} | {cloze['acc']:.3f} | {cloze['acc_norm']:.3f} | {text['word_perplexity']:.2f} | "
            f"{text['byte_perplexity']:.4f} | {text['bits_per_byte']:.4f} |"
        )
    lines += [
        "",
        f"Cloze: {args.cloze} passages of Dracula (60 words, then the next word among 4). Text: the first "
        f"{args.words:,} words of wikitext2/test.txt in documents of ~300 words. Both through lm-eval "
        "0.4.13's `hf` model type (the converted model with `trust_remote_code=True`).",
        f"Command: `{command}`.",
    ]
    replace_section(ROOT / "BENCHMARKS.md", "lm-eval-local", "\n".join(lines), "lm-evaluation-harness, offline")


if __name__ == "__main__":
    main()
