"""Chat fidelity: do a converted model and a baseline answer instructions as the teacher does?

Each instruction of a committed set (`chat_instructions.json`, written for this project) goes
through the tokenizer's chat template as one user message; every model answers it greedily, up to
`max_new_tokens` tokens, stopping before the tokenizer's end-of-text token or the template's
end-of-turn token (such as `<|im_end|>`). Each answer is compared token by token with the
reference model's answer (the teacher's, by default):

- agreed: the tokens the two answers share before their first divergence, that is the length of
  their common prefix. An answer that stops where the reference stops, every token equal, counts
  its full length. Stopping is a token like any other: when one answer stops while the other goes
  on, they diverge there, and only the tokens before the stop count (the shorter answer's length).
- identical first 32: the answers' first 32 tokens are equal. Where the reference answer has fewer
  than 32 tokens (it stopped), the answer must equal it whole and stop at the same place; where the
  answer stops before 32 tokens, the reference must too.
- identical: the whole answers are equal, stop included.

Greedy decoding of the same model gives the same tokens, so a model scored against itself (or a
conversion that keeps every layer exact) agrees over whole answers and scores 1.0 on both shares.
"""

from __future__ import annotations

import json
import re
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from t2r.errors import UsageError
from t2r.inference.continuations import greedy_tokens

PREFIX = 32  # the answer opening compared whole: about a sentence or two
INSTRUCTIONS_FILE = "chat_instructions.json"
_ANSWER_MARK = "T2R_ANSWER_ENDS_HERE"  # rendered as an assistant turn to find the end-of-turn token


@dataclass(frozen=True)
class Instruction:
    id: str
    category: str
    text: str

    def to_dict(self) -> dict[str, str]:
        return {"id": self.id, "category": self.category, "instruction": self.text}

    @classmethod
    def from_dict(cls, record: dict[str, str]) -> Instruction:
        return cls(record["id"], record["category"], record["instruction"])


def load_instructions() -> list[Instruction]:
    """The committed instruction set, read from the installed package."""
    text = resources.files("t2r.evaluation").joinpath(INSTRUCTIONS_FILE).read_text(encoding="utf-8")
    return [Instruction.from_dict(record) for record in json.loads(text)["instructions"]]


@dataclass(frozen=True)
class Agreement:
    """One answer against the reference answer (definitions in the module docstring)."""

    agreed: int
    identical_prefix: bool
    identical: bool


def agreement(reference: Sequence[int], answer: Sequence[int], prefix: int = PREFIX) -> Agreement:
    """Compare two greedy answers, each a list of token ids ending where its model stopped."""
    agreed = _common_length(reference, answer)
    # Slices compare lengths too: a reference shorter than `prefix` must be matched whole, stop included.
    same_prefix = list(reference[:prefix]) == list(answer[:prefix])
    return Agreement(agreed, same_prefix, list(reference) == list(answer))


@dataclass(frozen=True)
class ModelScore:
    """One model's answers against the reference's, over every instruction."""

    answers: int
    mean_agreed: float
    median_agreed: float
    identical_prefix: float  # share of answers identical over their first `prefix` tokens
    identical: float  # share of answers identical whole
    mean_length: float  # the model's answers, in tokens (the reference's own: ChatResult.mean_length)


def score(references: Sequence[Sequence[int]], answers: Sequence[Sequence[int]], prefix: int = PREFIX) -> ModelScore:
    """Aggregate `agreement` over paired answers (same instructions, same order)."""
    if len(references) != len(answers) or not answers:
        raise ValueError(f"need the same nonzero number of answers, got {len(references)} and {len(answers)}")
    each = [agreement(ref, ans, prefix) for ref, ans in zip(references, answers, strict=True)]
    return ModelScore(
        answers=len(each),
        mean_agreed=statistics.fmean(a.agreed for a in each),
        median_agreed=float(statistics.median(a.agreed for a in each)),
        identical_prefix=statistics.fmean(a.identical_prefix for a in each),
        identical=statistics.fmean(a.identical for a in each),
        mean_length=statistics.fmean(len(ans) for ans in answers),
    )


@dataclass
class ChatResult:
    """Every model's greedy answer to every instruction; scores are computed from the tokens."""

    reference: str
    max_new_tokens: int
    prefix: int
    instructions: list[Instruction]
    tokens: dict[str, list[list[int]]]  # model name -> answer token ids, one list per instruction
    texts: dict[str, list[str]]  # model name -> decoded answers (special tokens skipped)

    def scores(self) -> dict[str, ModelScore]:
        """Each model but the reference, against the reference."""
        reference = self.tokens[self.reference]
        return {
            name: score(reference, answers, self.prefix)
            for name, answers in self.tokens.items()
            if name != self.reference
        }

    def mean_length(self, name: str) -> float:
        return statistics.fmean(len(answer) for answer in self.tokens[name])

    def to_dict(self) -> dict[str, Any]:
        return {
            "reference": self.reference,
            "max_new_tokens": self.max_new_tokens,
            "prefix": self.prefix,
            "reference_mean_length": self.mean_length(self.reference),
            "scores": {name: asdict(model_score) for name, model_score in self.scores().items()},
            "instructions": [instruction.to_dict() for instruction in self.instructions],
            "tokens": self.tokens,
            "texts": self.texts,
        }

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> ChatResult:
        """The inverse of `to_dict`; the stored scores are derived, so they are recomputed, not read."""
        return cls(
            reference=record["reference"],
            max_new_tokens=record["max_new_tokens"],
            prefix=record["prefix"],
            instructions=[Instruction.from_dict(item) for item in record["instructions"]],
            tokens={name: [list(answer) for answer in answers] for name, answers in record["tokens"].items()},
            texts={name: list(answers) for name, answers in record["texts"].items()},
        )


def require_chat_template(tokenizer: Any) -> None:
    """Raise one clear line where the tokenizer cannot format a conversation."""
    if not getattr(tokenizer, "chat_template", None):
        raise UsageError("the tokenizer has no chat template; chat fidelity needs an instruction-tuned model's")


def chat_prompt_ids(tokenizer: Any, text: str) -> torch.Tensor:
    """One user message through the chat template, ready for the assistant's answer: ids [T]."""
    require_chat_template(tokenizer)
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )
    # The template writes its own special tokens (BOS included where it wants one): add none.
    return torch.tensor(tokenizer(rendered, add_special_tokens=False).input_ids, dtype=torch.long)


def end_of_turn_id(tokenizer: Any) -> int | None:
    """The special token the chat template writes right after an assistant's answer, if any.

    Found by rendering a user turn and an assistant turn and reading what follows the answer, so
    any template's marker (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`, `</s>`) is found by name.
    """
    require_chat_template(tokenizer)
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": _ANSWER_MARK}], tokenize=False
    )
    after = rendered.split(_ANSWER_MARK, 1)[-1].lstrip()
    names = {token.content: token_id for token_id, token in tokenizer.added_tokens_decoder.items()}
    matches = [name for name in names if name and after.startswith(name)]
    return names[max(matches, key=len)] if matches else None


def stop_ids(tokenizer: Any) -> frozenset[int]:
    """The tokenizer's end-of-text token and the template's end-of-turn token (one stop set for all models)."""
    ids = {tokenizer.eos_token_id, end_of_turn_id(tokenizer)}
    return frozenset(token for token in ids if token is not None)


def chat_fidelity(
    models: dict[str, nn.Module],
    tokenizer: Any,
    reference: str = "teacher",
    instructions: Sequence[Instruction] | None = None,
    max_new_tokens: int = 128,
    limit: int | None = None,
    prefix: int = PREFIX,
) -> ChatResult:
    """Greedy answers of every model to the instructions (the committed set by default; its first
    `limit` with `limit`), each scored against `models[reference]`.

    A model is a converted `T2RForCausalLM` (decoded through its recurrent state) or any Hugging
    Face causal LM (through its KV cache); all share the tokenizer and one set of stop tokens.
    """
    require_chat_template(tokenizer)
    if reference not in models:
        raise UsageError(f"no model named {reference!r} to compare with; the models are {', '.join(models)}")
    if limit is not None and limit < 1:
        raise UsageError(f"limit must be at least 1, got {limit}")
    chosen = list(load_instructions() if instructions is None else instructions)[:limit]
    if not chosen:
        raise UsageError("no instructions to answer: the set is empty")
    stops = stop_ids(tokenizer)
    prompts = [chat_prompt_ids(tokenizer, instruction.text) for instruction in chosen]
    tokens: dict[str, list[list[int]]] = {name: [] for name in models}
    with tqdm(total=len(chosen) * len(models), desc="chat fidelity", unit="answer") as bar:
        for prompt in prompts:
            for name, model in models.items():
                tokens[name].append(greedy_tokens(model, prompt, max_new_tokens, stops))
                bar.update()
    texts = {
        name: [tokenizer.decode(answer, skip_special_tokens=True) for answer in answers]
        for name, answers in tokens.items()
    }
    return ChatResult(reference, max_new_tokens, prefix, chosen, tokens, texts)


def scores_markdown(result: ChatResult) -> str:
    """A Markdown table: one row per model against the reference."""
    lines = [
        f"Greedy answers to {len(result.instructions)} instructions (up to {result.max_new_tokens} tokens), "
        f"against `{result.reference}` (its answers: {result.mean_length(result.reference):.1f} tokens on average).",
        "",
        f"| model | tokens agreed, mean | median | identical first {result.prefix} | identical whole | mean length |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, model_score in result.scores().items():
        lines.append(
            f"| {_escape(name)} | {model_score.mean_agreed:.1f} | {model_score.median_agreed:.1f} "
            f"| {model_score.identical_prefix:.0%} | {model_score.identical:.0%} | {model_score.mean_length:.1f} |"
        )
    return "\n".join(lines)


def side_by_side_markdown(result: ChatResult, count: int = 4, ids: Sequence[str] | None = None) -> str:
    """A few instructions, each with every model's answer in a column (the reference first).

    Without `ids`, the first instruction of each category in turn, up to `count`. A bold ⟂ marks the
    first character where an answer's text leaves the reference's.
    """
    index = {instruction.id: i for i, instruction in enumerate(result.instructions)}
    if ids is None:
        first_of_category: dict[str, int] = {}
        for i, instruction in enumerate(result.instructions):
            first_of_category.setdefault(instruction.category, i)
        rows = list(first_of_category.values())[:count]
    else:
        unknown = [name for name in ids if name not in index]
        if unknown:
            raise UsageError(f"no instruction with id {', '.join(unknown)} in this result")
        rows = [index[name] for name in ids]
    names = [result.reference, *(name for name in result.tokens if name != result.reference)]
    blocks = []
    for row in rows:
        instruction = result.instructions[row]
        reference_tokens, reference_text = result.tokens[result.reference][row], result.texts[result.reference][row]
        header, cells = [], []
        for name in names:
            answer, text = result.tokens[name][row], result.texts[name][row]
            if name == result.reference:
                header.append(f"{_escape(name)} (reference)")
                cells.append(_cell(text))
                continue
            agreed = agreement(reference_tokens, answer, result.prefix).agreed
            header.append(f"{_escape(name)} (agrees {agreed} tokens)")
            cells.append(_cell(text, None if answer == reference_tokens else _common_length(reference_text, text)))
        blocks.append(
            f"**{_escape(instruction.id)}** ({_escape(instruction.category)}): {_cell(instruction.text)}\n\n"
            f"| {' | '.join(header)} |\n|{'---|' * len(header)}\n| {' | '.join(cells)} |"
        )
    return "\n\n".join(blocks)


def _common_length(a: Sequence[Any], b: Sequence[Any]) -> int:
    """How many leading items (tokens, characters) `a` and `b` share."""
    length = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        length += 1
    return length


def _cell(text: str, split: int | None = None) -> str:
    """Text fit for one table cell; with `split`, a bold ⟂ at that character (HTML bold: `**` fails mid-word)."""
    if not text:
        return "*(no answer)*"
    if split is None:
        return _escape(text)
    return f"{_escape(text[:split])}<b>⟂</b>{_escape(text[split:])}"


def _escape(text: str) -> str:
    """Escape what would break a table cell or turn an answer's text into markup (code, links, math).

    Pipes would split the cell and newlines end the row; backticks, asterisks, brackets, `<` and `$`
    would start code, emphasis, links, HTML or math. Line breaks become <br>, and indentation is
    kept as non-breaking spaces so that code still reads as code.
    """
    text = text.replace("&", "&amp;").replace("\r\n", "\n").replace("\t", "    ")
    text = re.sub(r"([\\`*_\[\]<>|~$])", r"\\\1", text)
    lines = [re.sub(r"^ +", lambda m: "&nbsp;" * len(m.group()), line) for line in text.split("\n")]
    return "<br>".join(lines)
