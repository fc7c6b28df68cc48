"""Pass-key retrieval: prompts of exact length with the key where asked, a copying model that finds
every key, a random model that finds none, converted models on the same path, skipped lengths past a
context, and the JSON and heat map of a result."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from tokenizers import processors

from t2r.errors import UsageError
from t2r.evaluation.passkey import (
    DISTRACTORS,
    KEY_DIGITS,
    KEY_SENTENCE,
    QUESTION,
    SNAP_TOKENS,
    Filler,
    PasskeyResult,
    build_prompt,
    context_limit,
    default_filler,
    draw_keys,
    plot_passkey,
    run_passkey,
    score_prompt,
)
from t2r.modeling.config import T2RConfig
from t2r.modeling.convert import convert
from tests.conftest import VOCAB, tiny_model, tiny_tokenizer

DEPTHS = (0.1, 0.5, 0.9)


class HistoryCache:
    """The copying model's "KV cache": the tokens it has read, [1, T]."""

    def __init__(self) -> None:
        self.tokens = torch.zeros(1, 0, dtype=torch.long)

    def get_seq_length(self) -> int:
        return self.tokens.shape[1]

    def crop(self, max_length: int) -> None:
        """As transformers' DynamicCache.crop: a negative length drops that many tokens from the end."""
        keep = max_length if max_length >= 0 else self.get_seq_length() + max_length
        self.tokens = self.tokens[:, :keep]


class CopyLM(nn.Module):
    """An induction head as a causal LM with the Hugging Face call convention.

    At each position it finds the earlier position whose preceding tokens match the current last
    tokens for longest (up to `longest`; the most recent on a tie) and puts a large logit on the
    token that followed there: it continues "The pass key is" as the text did before.
    """

    def __init__(self, vocab: int = VOCAB, longest: int = 16) -> None:
        super().__init__()
        self.vocab, self.longest = vocab, longest
        self.anchor = nn.Parameter(torch.zeros(()))  # continuations.py reads the device off a parameter
        self.longest_history = 0

    def recall(self, history: list[int], t: int) -> int | None:
        """The token to follow history[: t + 1]: the successor of the best earlier match, if any."""
        best, best_length = None, 0
        for end in range(t - 1, -1, -1):  # an earlier match ends at `end`; the most recent wins a tie
            length = 0
            while length < self.longest and length <= end and history[end - length] == history[t - length]:
                length += 1
            if length > best_length:
                best, best_length = end, length
        return None if best is None else history[best + 1]

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: HistoryCache | None = None,
        use_cache: bool = True,
        logits_to_keep: int = 0,
    ) -> SimpleNamespace:
        """input_ids [1, n] -> logits [1, n or logits_to_keep, V] and the cache with them appended."""
        cache = cache if cache is not None else HistoryCache()
        cache.tokens = torch.cat([cache.tokens, input_ids.cpu()], dim=1)
        history = cache.tokens[0].tolist()
        self.longest_history = max(self.longest_history, len(history))
        count = logits_to_keep or input_ids.shape[1]
        logits = torch.zeros(1, count, self.vocab) + self.anchor
        for row, t in enumerate(range(len(history) - count, len(history))):
            token = self.recall(history, t)
            if token is not None:
                logits[0, row, token] = 20.0
        return SimpleNamespace(logits=logits, cache=cache)


class FlatLM(CopyLM):
    """Equal logits everywhere: every candidate ties with the key."""

    def recall(self, history: list[int], t: int) -> int | None:
        return None


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models gain nothing from threads, and lose much when another job holds the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def filler() -> str:
    return default_filler()


@pytest.fixture(scope="module")
def copy_result(filler: str) -> PasskeyResult:
    """The copying model twice, one of them with a 200-position context."""
    models = {"copy": CopyLM(), "short": CopyLM()}
    result = run_passkey(
        models, tiny_tokenizer(), filler, lengths=(128, 256), depths=DEPTHS, trials=2, context_limits={"short": 200}
    )
    result.settings["longest_history_short"] = models["short"].longest_history
    return result


def test_copying_model_finds_every_key(copy_result: PasskeyResult) -> None:
    for length in (128, 256):
        for depth in DEPTHS:
            summary = copy_result.case("copy", length, depth).summary()
            assert summary == {"trials": 2, "exact": 1.0, "rank1": 1.0, "mean_rank": 1.0}


def test_ties_count_against_the_key(filler: str) -> None:
    tokenizer = tiny_tokenizer()
    prompt = build_prompt(Filler(filler, tokenizer), tokenizer, 128, 0.5, draw_keys(0, 128, 0.5, 0))
    trial = score_prompt(FlatLM(), tokenizer, prompt)
    assert trial.rank == DISTRACTORS + 1 and not trial.exact


def test_random_model_finds_no_key(filler: str) -> None:
    result = run_passkey(
        {"random": tiny_model("llama", seed=5)}, tiny_tokenizer(), filler, lengths=(128,), depths=DEPTHS, trials=4
    )
    trials = [trial for case in result.cases for trial in case.trials]
    assert len(trials) == 12
    assert not any(trial.exact for trial in trials)
    assert sum(trial.rank == 1 for trial in trials) / len(trials) <= 0.2
    assert all(1 <= trial.rank <= DISTRACTORS + 1 for trial in trials)
    assert len({trial.rank for trial in trials}) > 3  # ranks spread: the key is no better than a distractor


def test_converted_models_take_the_same_path(filler: str) -> None:
    teacher = tiny_model("llama", seed=6)
    models = {
        "teacher": teacher,
        "exact": convert(copy.deepcopy(teacher), T2RConfig(softmax_layers=(0, 1))),  # the teacher's own maths
        "hedgehog": convert(copy.deepcopy(teacher), T2RConfig(feature_map="hedgehog", window=8, sinks=2)),
    }
    assert context_limit(teacher) == 8192 and context_limit(models["hedgehog"]) is None
    result = run_passkey(models, tiny_tokenizer(), filler, lengths=(128,), depths=(0.5,), trials=2, progress=False)
    by_teacher = result.case("teacher", 128, 0.5).trials
    by_exact = result.case("exact", 128, 0.5).trials
    assert [(t.key, t.rank, t.answer) for t in by_teacher] == [(t.key, t.rank, t.answer) for t in by_exact]
    hybrid = result.case("hedgehog", 128, 0.5)
    assert hybrid.summary()["trials"] == 2 and all(1 <= t.rank <= DISTRACTORS + 1 for t in hybrid.trials)
    assert [t.key for t in hybrid.trials] == [t.key for t in by_teacher]  # every model gets the same prompts


def bos_tokenizer():
    """The tiny tokenizer, made to put <s> before every text as Llama's does."""
    tokenizer = tiny_tokenizer()
    bos = tokenizer.bos_token_id
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bos)]
    )
    return tokenizer


@pytest.mark.parametrize("make_tokenizer", [tiny_tokenizer, bos_tokenizer])
def test_prompt_has_exact_length_and_the_key_at_its_depth(filler: str, make_tokenizer) -> None:
    tokenizer = make_tokenizer()
    text = Filler(filler, tokenizer)
    question = tokenizer(QUESTION, add_special_tokens=False).input_ids
    lead = 1 if make_tokenizer is bos_tokenizer else 0
    for length in (128, 300, 1000):
        for depth in (0.0, *DEPTHS, 1.0):
            prompt = build_prompt(text, tokenizer, length, depth, draw_keys(0, length, depth, 0))
            ids = prompt.ids.tolist()
            assert len(ids) == length and ids[-len(question) :] == question
            assert (ids[0] == tokenizer.bos_token_id) == bool(lead)
            sentence = tokenizer(KEY_SENTENCE.format(key=prompt.key), add_special_tokens=False).input_ids
            assert ids[prompt.insert_at : prompt.insert_at + len(sentence)] == sentence
            assert tokenizer.decode(ids[prompt.key_position :]).startswith(prompt.key)
            assert prompt.key not in tokenizer.decode(ids[: prompt.key_position])
            # The key's answer tokens are exactly the tokens that follow "is" in the key sentence.
            answer = prompt.candidates[0]
            starts = [i for i in range(prompt.insert_at, prompt.key_position + 1) if ids[i : i + len(answer)] == answer]
            assert starts and tokenizer.decode(ids[starts[0] : starts[0] + len(answer)]) == " " + prompt.key
            room = length - lead - len(sentence) - len(question)  # filler tokens
            insert = prompt.insert_at - lead
            assert abs(insert - depth * room) <= min(SNAP_TOKENS, max(8, room // 10))
            assert prompt.depth == insert / room


def test_filler_insertion_snaps_to_a_sentence_boundary(filler: str) -> None:
    tokenizer = tiny_tokenizer()
    prose = ". ".join(f"Sentence {word} is here" for word in ["one", "two", "three", "four", "five", "six"] * 4)
    text = Filler(prose, tokenizer)
    prompt = build_prompt(text, tokenizer, 300, 0.5, draw_keys(1, 300, 0.5, 0))
    before = tokenizer.decode(prompt.ids[: prompt.insert_at])
    assert before.endswith("here.")  # after a sentence, before the next one's space
    assert abs(prompt.depth - 0.5) < 0.1


def test_short_filler_repeats_and_short_length_fails(filler: str) -> None:
    tokenizer = tiny_tokenizer()
    text = Filler("Short text. Two sentences.", tokenizer)
    prompt = build_prompt(text, tokenizer, 300, 0.5, draw_keys(0, 300, 0.5, 0))
    assert len(prompt.ids) == 300 and tokenizer.decode(prompt.ids).count("Short text.") >= 3
    assert "sentences.\nShort text." in tokenizer.decode(prompt.ids)  # a repeat starts on a new line
    with pytest.raises(UsageError, match="cannot hold the key sentence"):
        build_prompt(text, tokenizer, 60, 0.5, draw_keys(0, 60, 0.5, 0))
    with pytest.raises(UsageError, match="empty"):
        Filler(" \n ", tokenizer)


def test_keys_are_seeded_and_distractors_distinct() -> None:
    keys = draw_keys(0, 1000, 0.5, 3)
    assert keys == draw_keys(0, 1000, 0.5, 3)
    assert len(set(keys)) == DISTRACTORS + 1
    assert all(len(key) == KEY_DIGITS and key.isdigit() and key[0] != "0" for key in keys)
    others = [
        draw_keys(1, 1000, 0.5, 3),
        draw_keys(0, 2000, 0.5, 3),
        draw_keys(0, 1000, 0.9, 3),
        draw_keys(0, 1000, 0.5, 4),
    ]
    assert all(other[0] != keys[0] or other[1:] != keys[1:] for other in others)
    assert len({other[0] for other in [keys, *others]}) >= 4


def test_lengths_beyond_a_context_are_skipped(copy_result: PasskeyResult) -> None:
    assert copy_result.settings["longest_history_short"] <= 200  # never run past its context
    for depth in DEPTHS:
        skipped = copy_result.case("short", 256, depth)
        assert skipped.trials == [] and "beyond its context" in (skipped.skipped or "")
        assert skipped.summary()["exact"] is None
        assert copy_result.case("short", 128, depth).summary()["exact"] == 1.0
        assert copy_result.case("copy", 256, depth).skipped is None
    positions = {(p["length"], p["depth"], p["trial"]): p["key_position"] for p in copy_result.prompts}
    assert len(positions) == 2 * len(DEPTHS) * 2


def test_json_round_trip_and_heat_map(copy_result: PasskeyResult, tmp_path: Path) -> None:
    record = json.loads(json.dumps(copy_result.to_dict()))
    assert PasskeyResult.from_dict(record).to_dict() == record
    case = next(c for c in record["cases"] if c["model"] == "copy")
    assert case["outcomes"][0]["key"] == record["prompts"][0]["key"] and case["exact"] == 1.0
    pytest.importorskip("matplotlib")
    path = plot_passkey(record, tmp_path / "plots" / "passkey.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
