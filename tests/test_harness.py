"""lm-evaluation-harness runs converted folders through its own `hf` model type."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from t2r.evaluation.harness import (
    LOCAL_CLOZE,
    LOCAL_TEXT,
    SUITE_GROUP,
    ZERO_SHOT,
    cloze_items,
    evaluate_tasks,
    tasks_folder,
    text_documents,
    write_local_tasks,
)
from t2r.evaluation.perplexity import evaluate

from .conftest import SHARED_DATA, TRAINING_TEXT
from .test_transformers_model import saved_model


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return saved_model(tmp_path_factory.mktemp("harness") / "model")


def prose() -> str:
    book = SHARED_DATA / "books" / "pg345.txt"
    return book.read_text()[20_000:40_000] if book.is_file() else "\n".join(TRAINING_TEXT * 40)


def test_lm_eval_loglikelihood_equals_t2r_eval(folder: Path) -> None:
    """The same tokens (lm-eval's prefix token, then the text) scored by both: one sum of log-probs."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    harness = HFLM(pretrained=str(folder), device="cpu", batch_size=2)
    text = " ".join(TRAINING_TEXT)
    (harness_sum,) = harness.loglikelihood_rolling(
        [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)], disable_tqdm=True
    )
    ids = torch.tensor([harness.prefix_token_id, *harness.tok_encode(text)])
    assert len(ids) < harness.max_length  # one window for both
    result = evaluate(harness.model.t2r, ids, len(ids), len(ids), "chunked")
    t2r_sum = -result.nll * result.tokens
    assert result.tokens == len(ids) - 1
    # lm-eval pads a batch of 2 and scores through transformers' forward; t2r runs the chunked form
    # alone: the same sums in another order, ~1e-6 per log-prob, over a sum of hundreds of nats.
    assert harness_sum == pytest.approx(t2r_sum, rel=1e-4)


def test_local_tasks_run_through_lm_eval(folder: Path, tmp_path: Path) -> None:
    text = prose()
    cloze, documents = cloze_items(text, 12), text_documents(text, 300)[:3]
    assert len(cloze) == 12 and all(item["choices"][item["answer"]] for item in cloze)
    tasks = write_local_tasks(tmp_path / "tasks", cloze, documents)
    results = evaluate_tasks(f"pretrained={folder},device=cpu", tasks, tmp_path / "tasks", batch_size=4)
    assert 0.0 <= results[LOCAL_CLOZE]["acc"] <= 1.0
    assert results[LOCAL_TEXT]["word_perplexity"] > 1.0 and results[LOCAL_TEXT]["bits_per_byte"] > 0


def test_the_shipped_suite_names_the_papers_tasks() -> None:
    from lm_eval.tasks import TaskManager

    config = yaml.safe_load((tasks_folder() / f"{SUITE_GROUP}.yaml").read_text())
    assert tuple(config["task"]) == ZERO_SHOT
    assert SUITE_GROUP in TaskManager(include_path=str(tasks_folder())).all_groups
