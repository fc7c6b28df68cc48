"""Chat fidelity: the agreement metric on hand-made answers, then tiny models through the chat
template (a model against itself, the exact conversion, a differently seeded model), the committed
instruction set, the JSON round trip and the side-by-side Markdown."""

from __future__ import annotations

import copy
import json
import re
import tomllib
from pathlib import Path

import pytest

from t2r.errors import UsageError
from t2r.evaluation.chat import (
    INSTRUCTIONS_FILE,
    ChatResult,
    Instruction,
    agreement,
    chat_fidelity,
    load_instructions,
    scores_markdown,
    side_by_side_markdown,
    stop_ids,
)
from t2r.modeling.config import T2RConfig
from t2r.modeling.convert import convert
from tests.conftest import tiny_model, tiny_tokenizer

LONG = list(range(10, 50))  # a 40-token reference answer


def test_agreement_of_equal_answers_is_their_length() -> None:
    result = agreement(LONG, list(LONG))
    assert (result.agreed, result.identical_prefix, result.identical) == (40, True, True)


@pytest.mark.parametrize(("k", "same_prefix"), [(0, False), (5, False), (31, False), (32, True), (39, True)])
def test_agreement_counts_the_tokens_before_the_first_divergence(k: int, same_prefix: bool) -> None:
    answer = [*LONG[:k], 999, *LONG[k + 1 :]]
    result = agreement(LONG, answer)
    assert (result.agreed, result.identical_prefix, result.identical) == (k, same_prefix, False)
    assert agreement(answer, LONG) == result  # the metric is symmetric


def test_an_early_stop_is_a_divergence() -> None:
    stopped = LONG[:10]
    for reference, answer in ((LONG, stopped), (stopped, LONG)):
        result = agreement(reference, answer)
        assert (result.agreed, result.identical_prefix, result.identical) == (10, False, False)


def test_a_reference_shorter_than_the_prefix_must_be_matched_whole() -> None:
    short = [5, 6, 7]
    assert agreement(short, [5, 6, 7]).identical_prefix
    assert not agreement(short, [5, 6, 7, 8]).identical_prefix  # went on where the reference stopped
    assert not agreement(short, [5, 6]).identical_prefix
    assert agreement([], []).identical and agreement([], []).agreed == 0
    assert agreement(LONG, [*LONG[:32], 1], prefix=32).identical_prefix  # past the prefix, only `identical` sees it


def test_the_instruction_set_is_large_varied_and_shipped() -> None:
    instructions = load_instructions()  # through importlib.resources, as installed
    assert len(instructions) >= 50
    assert len({i.id for i in instructions}) == len(instructions)
    assert len({i.text.strip().lower() for i in instructions}) == len(instructions)
    assert all(i.text.strip() and i.category.strip() for i in instructions)
    assert len({i.category for i in instructions}) >= 12
    assert len({i.category for i in instructions[:12]}) == 12  # any first few already cover many kinds
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert INSTRUCTIONS_FILE in pyproject["tool"]["setuptools"]["package-data"]["t2r.evaluation"]


@pytest.fixture(scope="module")
def result() -> ChatResult:
    # Mistral's tiny model has untied embeddings: a random model with tied ones echoes the prompt's
    # last token forever, and two differently seeded ones would then agree.
    teacher = tiny_model("mistral", seed=3)
    models = {
        "teacher": teacher,
        "same": teacher,
        "exact": convert(copy.deepcopy(teacher), T2RConfig(softmax_layers=(0, 1))),
        "other": tiny_model("mistral", seed=11),
    }
    return chat_fidelity(models, tiny_tokenizer(), max_new_tokens=10, limit=4, prefix=4)


def test_a_model_agrees_with_itself_and_the_exact_conversion_with_the_teacher(result: ChatResult) -> None:
    assert len(result.instructions) == 4 and all(len(a) == 4 for a in result.tokens.values())
    assert result.mean_length("teacher") > 0
    scores = result.scores()
    assert set(scores) == {"same", "exact", "other"}
    for name in ("same", "exact"):
        assert result.tokens[name] == result.tokens["teacher"]
        assert scores[name].mean_agreed == result.mean_length("teacher")
        assert scores[name].identical_prefix == scores[name].identical == 1.0
    assert scores["other"].mean_agreed < scores["same"].mean_agreed
    assert scores["other"].identical_prefix < 1.0 and scores["other"].identical < 1.0


def test_answers_are_decoded_and_stop_before_the_end_of_turn(result: ChatResult) -> None:
    tokenizer = tiny_tokenizer()
    assert stop_ids(tokenizer) == {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
    for name, answers in result.tokens.items():
        assert all(not stop_ids(tokenizer) & set(answer) for answer in answers)
        assert result.texts[name] == [tokenizer.decode(answer, skip_special_tokens=True) for answer in answers]


def test_the_result_survives_a_json_round_trip(result: ChatResult) -> None:
    record = json.loads(json.dumps(result.to_dict()))
    assert record["scores"]["exact"]["identical"] == 1.0
    again = ChatResult.from_dict(record)
    assert again == result
    assert again.scores() == result.scores()


def test_the_side_by_side_markdown_shows_every_model(result: ChatResult) -> None:
    text = side_by_side_markdown(result, count=2)
    assert text.count("| teacher (reference) |") == 2
    for name in ("same", "exact", "other"):
        assert text.count(f"{name} (agrees ") == 2
    assert result.instructions[0].id in text and result.instructions[1].id in text
    assert "| model |" in scores_markdown(result) and "| other |" in scores_markdown(result)


def test_code_and_pipes_stay_inside_their_cells() -> None:
    answers = {
        "teacher": "Use `a | b`:\n```python\nif x:\n    y = [1] * 2\n```",
        "converted": "Use `a | b`:\n```python\nif x:\n    y = $2 <script>\n```",
        "baseline": "plain words",
    }
    tokens = {"teacher": [[1, 2, 3]], "converted": [[1, 2, 4]], "baseline": [[7]]}
    result = ChatResult(
        "teacher",
        128,
        32,
        [Instruction("code-01", "code", "Pipe | this\nand `that`")],
        tokens,
        {name: [text] for name, text in answers.items()},
    )
    text = side_by_side_markdown(result, ids=["code-01"])
    head, table = text.split("\n\n")
    assert "\n" not in head and len(re.findall(r"(?<!\\)\|", head)) == 0
    rows = table.split("\n")
    assert len(rows) == 3  # header, rule, one row of answers: no answer's newline leaked out
    assert all(len(re.findall(r"(?<!\\)\|", row)) == 4 for row in rows)  # three cells each
    assert "```" not in text and "<script>" not in text and "$2" not in text.replace("\\$2", "")
    assert "&nbsp;" * 4 + "y" in rows[2]  # indentation kept
    assert "plain words" in rows[2] and "y = <b>⟂</b>\\$2" in rows[2]  # the divergence is marked where it is
    with pytest.raises(UsageError, match="no instruction"):
        side_by_side_markdown(result, ids=["missing"])


def test_usage_errors_are_one_clear_line() -> None:
    tokenizer = tiny_tokenizer()
    model = tiny_model("llama", seed=3)
    with pytest.raises(UsageError, match="no model named 'teacher'"):
        chat_fidelity({"student": model}, tokenizer, limit=1, max_new_tokens=1)
    tokenizer.chat_template = None
    with pytest.raises(UsageError, match="no chat template"):
        chat_fidelity({"teacher": model}, tokenizer, limit=1, max_new_tokens=1)
