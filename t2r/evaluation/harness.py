"""lm-evaluation-harness on converted models (`pip install -e '.[eval]'`).

A converted folder is a transformers model, so lm-eval's own `hf` model type runs it:

    lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True,device=cpu \
        --tasks t2r_zero_shot --include_path $(python -m t2r.evaluation.harness)

Its loglikelihoods come from the model's transformers `forward` (the chunked form, batched with
right padding, which a causal model never reads), so no t2r model type of lm-eval's is needed.

`SUITE` is what the conversion papers report (T2R, Hedgehog, LoLCATs, SUPRA): PIQA, ARC-easy,
ARC-challenge, HellaSwag, WinoGrande, LAMBADA zero-shot (the shipped group `t2r_zero_shot`) and
MMLU 5-shot (`--tasks mmlu --num_fewshot 5`); their datasets come from the hub, online only.
Offline, `write_local_tasks` builds two tasks from local files: a multiple-choice cloze (a passage,
its next word among four) and a rolling loglikelihood over a text, the paths lm-eval takes for every
task of the suite.
"""

from __future__ import annotations

import json
import random
import re
from importlib import resources
from pathlib import Path
from typing import Any

ZERO_SHOT = ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "lambada_openai")
FEW_SHOT = {"mmlu": 5}
SUITE_GROUP = "t2r_zero_shot"
LOCAL_CLOZE = "t2r_local_cloze"
LOCAL_TEXT = "t2r_local_text"


def tasks_folder() -> Path:
    """The folder of t2r's shipped task configurations (lm-eval's `--include_path`)."""
    return Path(str(resources.files("t2r.evaluation") / "lm_eval_tasks"))


def cloze_items(text: str, count: int, seed: int = 0, context_words: int = 60) -> list[dict[str, Any]]:
    """Multiple-choice cloze items from prose: `context_words` words, then the next word among it
    and three other words of the text (4 choices, seeded), like LAMBADA's last word made a choice."""
    words = re.findall(r"[A-Za-z][A-Za-z']+|[^\sA-Za-z]", text)
    vocabulary = sorted({word.lower() for word in words if word.isalpha() and len(word) > 3})
    rng = random.Random(seed)
    items: list[dict[str, Any]] = []
    starts = list(range(0, len(words) - context_words - 1, context_words + 1))
    rng.shuffle(starts)
    for start in starts:
        answer = words[start + context_words]
        if not (answer.isalpha() and len(answer) > 3):
            continue
        distractors = rng.sample([w for w in vocabulary if w != answer.lower()], 3)
        choices = [answer, *distractors]
        rng.shuffle(choices)
        context = " ".join(words[start : start + context_words])
        context = re.sub(r" ([.,;:!?'\)])", r"\1", context)
        items.append({"context": context, "choices": choices, "answer": choices.index(answer)})
        if len(items) == count:
            break
    return items


def text_documents(text: str, words_per_document: int) -> list[dict[str, str]]:
    """A text cut into documents of about `words_per_document` words, at line ends."""
    documents, current, size = [], [], 0
    for line in text.splitlines(keepends=True):
        current.append(line)
        size += len(line.split())
        if size >= words_per_document:
            documents.append({"text": "".join(current).strip()})
            current, size = [], 0
    if current and "".join(current).strip():
        documents.append({"text": "".join(current).strip()})
    return documents


def write_local_tasks(folder: Path, cloze: list[dict[str, Any]], documents: list[dict[str, str]]) -> list[str]:
    """Write the two local tasks' data and YAML into `folder` (lm-eval's `--include_path`)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("cloze.jsonl", cloze), ("text.jsonl", documents)):
        (folder / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
    common = "dataset_path: json\ntest_split: test\nmetadata:\n  version: 1.0\n"
    (folder / f"{LOCAL_CLOZE}.yaml").write_text(
        f"task: {LOCAL_CLOZE}\n{common}dataset_kwargs:\n  data_files:\n    test: {folder / 'cloze.jsonl'}\n"
        'output_type: multiple_choice\ndoc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\n'
        "doc_to_target: answer\nmetric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
    )
    (folder / f"{LOCAL_TEXT}.yaml").write_text(
        f"task: {LOCAL_TEXT}\n{common}dataset_kwargs:\n  data_files:\n    test: {folder / 'text.jsonl'}\n"
        'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n"
    )
    return [LOCAL_CLOZE, LOCAL_TEXT]


def evaluate_tasks(
    model_args: str, tasks: list[str], include_path: Path | None = None, batch_size: int = 8, limit: int | None = None
) -> dict[str, dict[str, float]]:
    """lm-eval's `simple_evaluate` with its `hf` model type; per task, its metrics (numbers only)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=None if include_path is None else str(include_path))
    output = simple_evaluate(
        model="hf", model_args=model_args, tasks=tasks, task_manager=manager, batch_size=batch_size, limit=limit
    )
    return {
        task: {key.split(",")[0]: value for key, value in metrics.items() if isinstance(value, int | float)}
        for task, metrics in output["results"].items()
    }


if __name__ == "__main__":  # print the include path, for the command line above
    print(tasks_folder())
