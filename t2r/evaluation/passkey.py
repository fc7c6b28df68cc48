"""Pass-key retrieval: a seeded 5-digit key hidden at a depth of natural prose, asked for at the end.

Each prompt is exactly `length` tokens: the tokenizer's leading special tokens, filler prose cut to
fit (repeated if too short), the key sentence inserted at the sentence or line boundary nearest to
`depth` of the filler, and the question, which ends in "The pass key is". Every model sees the same
prompts, and each is scored two ways:

- greedy exact: the first number in its greedy continuation starts with the key's 5 digits;
- rank: 1 + the number of the 99 distractor keys whose continuation log-likelihood is at least the
  key's (ties count against the key), so a model that knows nothing ranks the key ~50th.

The key and distractors of a prompt are drawn from (seed, length, depth, trial), so a rerun, or a
run of another model, asks for the same keys. A length whose prompt and answer do not fit in a
model's context is recorded as skipped for that model. That is why DEFAULT_LENGTHS counts "1k" as
1000 tokens: the 8k prompt and its answer fit in an 8192-position teacher.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from t2r.data.corpus import state_of_the_union
from t2r.errors import T2RError, UsageError
from t2r.evaluation.long_context import teacher_context
from t2r.inference.continuations import continuation_logprobs, greedy_tokens, prefill
from t2r.modeling.model import T2RForCausalLM

DEFAULT_LENGTHS = (256, 1000, 2000, 4000, 8000, 16000, 32000)
DEFAULT_DEPTHS = (0.1, 0.5, 0.9)
KEY_DIGITS = 5
DISTRACTORS = 99
KEY_SENTENCE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "\nWhat is the pass key? The pass key is"
MAX_NEW_TOKENS = 10
SNAP_TOKENS = 64  # a boundary farther than this (or 10 % of the filler) is not near: insert at the depth itself
FILLER_CHARS = 200_000  # ~45k tokens of 19th-century prose: the 32k prompt without repeating
# A boundary is where whitespace follows a sentence's end, or where a line ends; the whitespace goes
# with the next piece, so that a byte-level BPE tokenises the pieces as it tokenises the whole text.
BOUNDARY = re.compile(r"(?<=[.!?:;\"')\]])(?=\s)|(?<=\S)(?=\n)")


def default_filler(min_chars: int = FILLER_CHARS) -> str:
    """The first State of the Union addresses (1790 on) joined until `min_chars`: formal prose, no code."""
    documents, total = [], 0
    for document in state_of_the_union().documents:
        documents.append(document.strip())
        total += len(documents[-1])
        if total >= min_chars:
            break
    return "\n\n".join(documents)


class Filler:
    """Filler prose as token ids in sentence-sized pieces, tokenised as far as prompts reach."""

    def __init__(self, text: str, tokenizer: PreTrainedTokenizerBase) -> None:
        self.pieces = [piece for piece in BOUNDARY.split(text) if piece]
        if not "".join(self.pieces).strip():
            raise UsageError("the pass-key filler text is empty; name a file of prose")
        self.tokenizer = tokenizer
        self.encoded: list[list[int]] = []
        self.repeat_first = self._encode(["\n" + self.pieces[0]])[0]  # where the text starts again

    def _encode(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]

    def _piece_ids(self) -> Iterator[list[int]]:
        """The pieces' ids, the text repeated without end."""
        index = 0
        while True:
            at = index % len(self.pieces)
            while at >= len(self.encoded):  # tokenise in batches, as far as asked
                self.encoded += self._encode(self.pieces[len(self.encoded) : len(self.encoded) + 256])
            yield self.repeat_first if index >= len(self.pieces) and at == 0 else self.encoded[at]
            index += 1

    def take(self, count: int) -> tuple[list[int], list[int]]:
        """The first `count` filler ids and the boundaries among them (sorted, the last is `count`).

        The text's start is no boundary (unless `count` is 0): the key sentence would run into it.
        """
        ids: list[int] = []
        boundaries = [count]
        for piece in self._piece_ids():
            if len(ids) >= count:
                break
            ids += piece
            boundaries.append(min(len(ids), count))  # the end of a piece: the next one starts with whitespace
        return ids[:count], sorted(set(boundaries))


@dataclass(frozen=True)
class Prompt:
    """One pass-key prompt: ids [length] and where its key is."""

    ids: torch.Tensor  # [length] int64
    key: str
    candidates: list[list[int]]  # the key's answer tokens first, then the 99 distractors'
    insert_at: int  # position of the key sentence's first token
    key_position: int  # position of the first token of the key's digits
    depth: float  # where the key sentence landed, as a share of the filler


def draw_keys(seed: int, length: int, depth: float, trial: int) -> list[str]:
    """The key and its 99 distractors: 100 distinct 5-digit numbers, seeded by the case and trial."""
    name = f"passkey:{seed}:{length}:{depth:.6f}:{trial}".encode()
    rng = random.Random(int.from_bytes(hashlib.sha256(name).digest()[:8], "big"))
    low = 10 ** (KEY_DIGITS - 1)
    return [str(number) for number in rng.sample(range(low, 10 * low), DISTRACTORS + 1)]


def leading_special_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The special tokens the tokenizer puts before a text (a BOS for Llama-style tokenizers)."""
    plain = tokenizer("a", add_special_tokens=False).input_ids
    full = tokenizer("a", add_special_tokens=True).input_ids
    return full[: len(full) - len(plain)] if full[len(full) - len(plain) :] == plain else []


def answer_ids(tokenizer: PreTrainedTokenizerBase, keys: Sequence[str]) -> list[list[int]]:
    """Each key's tokens as they follow the question in one tokenisation of question + " " + key."""
    question = tokenizer(QUESTION, add_special_tokens=False).input_ids
    answers = []
    for key in keys:
        full = tokenizer(QUESTION + " " + key, add_special_tokens=False).input_ids
        if full[: len(question)] != question or len(full) == len(question):
            raise T2RError(f"this tokenizer merges the pass key {key!r} into the question's last token")
        answers.append(full[len(question) :])
    return answers


def key_span(tokenizer: PreTrainedTokenizerBase, ids: list[int], key: str) -> int:
    """Index in `ids` of the first token of the first occurrence of `key` in their decoded text."""
    end = next((i for i in range(1, len(ids) + 1) if key in tokenizer.decode(ids[:i])), None)
    if end is None:
        raise T2RError(f"the key {key!r} does not survive this tokenizer's encode and decode")
    return max(start for start in range(end) if key in tokenizer.decode(ids[start:end]))


def build_prompt(
    filler: Filler, tokenizer: PreTrainedTokenizerBase, length: int, depth: float, keys: Sequence[str]
) -> Prompt:
    """A prompt of exactly `length` tokens asking for keys[0] (keys[1:] are its distractors)."""
    if not 0.0 <= depth <= 1.0:
        raise UsageError(f"a pass-key depth is a share of the text in [0, 1], not {depth}")
    key = keys[0]
    lead = leading_special_ids(tokenizer)
    sentence = tokenizer(KEY_SENTENCE.format(key=key), add_special_tokens=False).input_ids
    question = tokenizer(QUESTION, add_special_tokens=False).input_ids
    room = length - len(lead) - len(sentence) - len(question)
    if room < 0:
        raise UsageError(
            f"a pass-key prompt of {length} tokens cannot hold the key sentence and the question "
            f"({length - room} tokens); ask for a longer length"
        )
    ids, boundaries = filler.take(room)
    target = depth * room
    insert = min(boundaries, key=lambda boundary: (abs(boundary - target), boundary))
    if abs(insert - target) > min(SNAP_TOKENS, max(8, room // 10)):
        insert = round(target)
    prompt = lead + ids[:insert] + sentence + ids[insert:] + question
    return Prompt(
        ids=torch.tensor(prompt, dtype=torch.long),
        key=key,
        candidates=answer_ids(tokenizer, keys),
        insert_at=len(lead) + insert,
        key_position=len(lead) + insert + key_span(tokenizer, sentence, key),
        depth=insert / room if room else 0.0,
    )


@dataclass(frozen=True)
class Trial:
    """One prompt put to one model."""

    trial: int
    key: str
    exact: bool  # the first number of the greedy answer starts with the key
    rank: int  # 1 + distractors at least as likely as the key (1 .. 100)
    answer: str  # the greedy continuation, decoded


def score_prompt(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompt: Prompt,
    trial: int = 0,
    max_new_tokens: int = MAX_NEW_TOKENS,
    batch_size: int = 25,
) -> Trial:
    """Greedy exact match and the key's log-likelihood rank among the candidates, for one model."""
    stop = frozenset() if tokenizer.eos_token_id is None else frozenset({tokenizer.eos_token_id})
    prefilled = prefill(model, prompt.ids)  # a converted model's prompt, prefilled once for both
    answer = tokenizer.decode(
        greedy_tokens(model, prompt.ids, max_new_tokens, stop, prefilled), skip_special_tokens=True
    )
    number = re.search(r"\d+", answer)
    scores = continuation_logprobs(model, prompt.ids, prompt.candidates, batch_size, prefilled)  # [100]
    if torch.isnan(scores).any():  # be strict: a NaN never wins
        rank = len(scores)
    else:
        rank = 1 + int((scores[1:] >= scores[0]).sum())
    exact = number is not None and number.group()[:KEY_DIGITS] == prompt.key
    return Trial(trial, prompt.key, exact, rank, answer)


@dataclass
class Case:
    """One model at one (length, depth): its trials, or why it was skipped."""

    model: str
    length: int
    depth: float
    trials: list[Trial] = field(default_factory=list)
    skipped: str | None = None

    def summary(self) -> dict[str, Any]:
        """Trials, exact share, rank-1 share and mean rank (None where nothing ran)."""
        count = len(self.trials)
        if not count:
            return {"trials": 0, "exact": None, "rank1": None, "mean_rank": None}
        return {
            "trials": count,
            "exact": sum(trial.exact for trial in self.trials) / count,
            "rank1": sum(trial.rank == 1 for trial in self.trials) / count,
            "mean_rank": sum(trial.rank for trial in self.trials) / count,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "length": self.length,
            "depth": self.depth,
            "skipped": self.skipped,
            **self.summary(),
            "outcomes": [asdict(trial) for trial in self.trials],
        }


@dataclass
class PasskeyResult:
    """Every case of every model, the prompts' key positions and the settings that made them."""

    settings: dict[str, Any]
    prompts: list[dict[str, Any]]  # length, depth, trial, key, insert_at, key_position, depth_actual
    cases: list[Case]

    def case(self, model: str, length: int, depth: float) -> Case:
        return next(c for c in self.cases if (c.model, c.length, c.depth) == (model, length, depth))

    def to_dict(self) -> dict[str, Any]:
        return {"settings": self.settings, "prompts": self.prompts, "cases": [c.to_dict() for c in self.cases]}

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> PasskeyResult:
        cases = [
            Case(
                model=c["model"],
                length=c["length"],
                depth=c["depth"],
                trials=[Trial(**trial) for trial in c["outcomes"]],
                skipped=c["skipped"],
            )
            for c in record["cases"]
        ]
        return cls(dict(record["settings"]), [dict(p) for p in record["prompts"]], cases)


def context_limit(model: nn.Module) -> int | None:
    """Longest prompt + answer a model takes: a converted model has none, a teacher its config's."""
    return None if isinstance(model, T2RForCausalLM) else teacher_context(model)


def run_passkey(
    models: Mapping[str, nn.Module],
    tokenizer: PreTrainedTokenizerBase,
    filler: str,
    lengths: Sequence[int] = DEFAULT_LENGTHS,
    depths: Sequence[float] = DEFAULT_DEPTHS,
    trials: int = 5,
    seed: int = 0,
    context_limits: Mapping[str, int | None] | None = None,
    max_new_tokens: int = MAX_NEW_TOKENS,
    progress: bool = True,
) -> PasskeyResult:
    """Every model on the same prompts at each (length, depth), `trials` keys each.

    `context_limits` maps a model's name to the most positions it takes (a missing name or None: no
    limit; see `context_limit`); a length whose prompt and greedy answer exceed it is skipped.
    """
    limits = dict(context_limits or {})
    text = Filler(filler, tokenizer)
    cases = {(name, n, d): Case(name, n, d) for n in lengths for d in depths for name in models}
    for (name, n, _), case in cases.items():
        limit = limits.get(name)
        if limit is not None and n + max_new_tokens > limit:
            case.skipped = f"beyond its context ({n} + {max_new_tokens} answer tokens > {limit})"
    runs = sum(trials for case in cases.values() if case.skipped is None)
    prompts = []
    with tqdm(total=runs, desc="pass key", unit="prompt", disable=not progress) as bar:
        for n in lengths:
            for d in depths:
                for trial in range(trials):
                    prompt = build_prompt(text, tokenizer, n, d, draw_keys(seed, n, d, trial))
                    prompts.append(
                        {
                            "length": n,
                            "depth": d,
                            "trial": trial,
                            "key": prompt.key,
                            "insert_at": prompt.insert_at,
                            "key_position": prompt.key_position,
                            "depth_actual": prompt.depth,
                        }
                    )
                    for name, model in models.items():
                        if cases[name, n, d].skipped is None:
                            cases[name, n, d].trials.append(
                                score_prompt(model, tokenizer, prompt, trial, max_new_tokens)
                            )
                            bar.update(1)
    settings = {
        "models": list(models),
        "lengths": list(lengths),
        "depths": list(depths),
        "trials": trials,
        "seed": seed,
        "key_digits": KEY_DIGITS,
        "distractors": DISTRACTORS,
        "max_new_tokens": max_new_tokens,
        "key_sentence": KEY_SENTENCE,
        "question": QUESTION,
        "filler_chars": len(filler),
        "filler_sha256": hashlib.sha256(filler.encode()).hexdigest(),
        "context_limits": {name: limits.get(name) for name in models},
    }
    return PasskeyResult(settings, prompts, list(cases.values()))


def _tokens_label(n: int) -> str:
    """256 -> '256', 4000 -> '4k', 4096 -> '4k' (the figures' columns; the JSON keeps exact lengths)."""
    for unit in (1000, 1024):
        if n >= unit and n % unit == 0:
            return f"{n // unit}k"
    return str(n)


def plot_passkey(result: Mapping[str, Any], path: Path) -> Path:
    """One PNG: a heat map per model, depth (rows) x length (columns), colour = exact share."""
    try:
        import matplotlib
    except ImportError:
        raise UsageError("the pass-key heat maps need matplotlib: pip install -e '.[bench]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    settings = result["settings"]
    lengths, depths, names = settings["lengths"], settings["depths"], settings["models"]
    by_key = {(c["model"], c["length"], c["depth"]): c for c in result["cases"]}
    colours = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")
    size = (0.9 * len(lengths) * len(names) + 1.8, 0.7 * len(depths) + 1.4)
    figure, axes = plt.subplots(1, len(names), figsize=size, squeeze=False, layout="constrained")
    for panel, (axis, name) in enumerate(zip(axes[0], names, strict=True)):
        exact = np.full((len(depths), len(lengths)), np.nan)
        for row, depth in enumerate(depths):
            for column, length in enumerate(lengths):
                case = by_key[name, length, depth]
                if case["skipped"] is not None or not case["trials"]:
                    axis.text(column, row, "beyond\ncontext", ha="center", va="center", fontsize=7, color="dimgrey")
                    continue
                exact[row, column] = case["exact"]
                ink = "black" if case["exact"] > 0.6 else "white"  # readable on both ends of viridis
                label = f"{case['exact']:.2f}\nr1 {case['rank1']:.2f}"
                axis.text(column, row, label, ha="center", va="center", fontsize=7, color=ink)
        image = axis.imshow(np.ma.masked_invalid(exact), cmap=colours, vmin=0.0, vmax=1.0, aspect="auto")
        axis.set_title(name, fontsize=10)
        axis.set_xticks(range(len(lengths)), [_tokens_label(n) for n in lengths], fontsize=8)
        axis.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths] if panel == 0 else [], fontsize=8)
        axis.set_xlabel("prompt length (tokens)", fontsize=8)
    axes[0, 0].set_ylabel("key depth", fontsize=8)
    figure.colorbar(image, ax=axes[0].tolist(), label="greedy exact share")
    figure.suptitle("pass-key retrieval (cells: greedy exact share, r1 = rank-1 share)", fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
