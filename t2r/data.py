"""Text → packed token blocks for training, a held-out split, and a seeded order for every step.

A `--data` value (repeatable; sources are read in the order given) is one of:
    builtin               the built-in corpus (`t2r.corpus`), also what no `--data` means (a file of
                          that name: ./builtin)
    notes.txt, essay.md   a text file, one document (any suffix but .jsonl and .parquet)
    rows.jsonl            one JSON object per line; its "text" field is a document
    rows.parquet          its "text" column, one document per row
    corpus/               every .txt, .jsonl and .parquet file below it (recursive, sorted, hidden skipped)
    'books/*.txt'         a glob (`**` recurses); a folder it matches is read as a folder
    name[:config]         a Hugging Face hub dataset (`datasets` package), split train, its "text" column

Bytes that are not UTF-8 become U+FFFD. Each document is tokenised without special tokens, the
tokenizer's eos id (if it has one) goes between documents, and the stream is cut into blocks of
`block_size` tokens, the remainder dropped. A seeded fraction of the blocks is held out for
validation. Training walks epochs, each a seeded permutation of the training blocks that depends on
(seed, epoch) only, so the batch of any step can be recomputed: that is what lets a resumed run see
exactly the batches an uninterrupted one would have.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from t2r.corpus import BUILTIN, Texts, builtin_texts
from t2r.errors import T2RError, UsageError
from t2r.textfile import read_text

log = logging.getLogger(__name__)

FOLDER_SUFFIXES = (".txt", ".jsonl", ".parquet")
# The tokenizer is handed pieces of at most this many characters (one call on a whole novel is slow),
# in batched calls of about BATCH_CHARS (a batch is encoded on all cores; smaller bounds memory).
CHUNK_CHARS = 100_000
BATCH_CHARS = 4_000_000
GLOB_CHARACTERS = frozenset("*?[")
HUB_DATASET = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(:[\w.-]+)?$")
LOCAL_LOOKING = (".", "/", "~")


@dataclass(frozen=True)
class Source:
    """A resolved `--data` value. kind: 'file' (name = path), 'hub' (name = id[:config]) or 'builtin'."""

    kind: str
    name: str


@dataclass(frozen=True)
class SourceInfo:
    """What one file, hub dataset or built-in part gave; a line of the run manifest."""

    name: str
    sha256: str  # of the file's bytes; for a hub dataset, of its text rows (UTF-8, each followed by NUL)
    documents: int
    characters: int
    tokens: int  # the documents' own tokens, not counting the eos ids between them


@dataclass(frozen=True)
class TokenBlocks:
    """train [N, block_size] and valid [M, block_size] int64 token ids; the sources they came from."""

    train: torch.Tensor
    valid: torch.Tensor
    sources: list[SourceInfo]

    @property
    def block_size(self) -> int:
        return self.train.shape[1]


# ---- sources ----------------------------------------------------------------------------------------


def _text_files(folder: Path) -> list[Path]:
    """The .txt, .jsonl and .parquet files below `folder`, sorted, skipping hidden files and folders."""
    found = []
    for path in folder.rglob("*"):
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts):
            continue  # .git, .ipynb_checkpoints, editor back-ups: not the user's data
        if path.suffix.lower() in FOLDER_SUFFIXES and path.is_file():
            found.append(path)
    return sorted(found, key=lambda path: path.relative_to(folder).as_posix())


def _expand(spec: str) -> list[Source]:
    if spec == BUILTIN:
        return [Source("builtin", BUILTIN)]
    path = Path(spec).expanduser()
    if path.is_dir():
        found = _text_files(path)
        if not found:
            raise UsageError(f"{spec}: no .txt, .jsonl or .parquet file in this folder")
        return [Source("file", str(p)) for p in found]
    if path.exists():
        if not path.is_file():
            raise UsageError(f"{spec}: not a regular file")
        return [Source("file", str(path))]
    if GLOB_CHARACTERS.intersection(spec):
        matches = sorted(glob.glob(os.path.expanduser(spec), recursive=True))
        if not matches:
            raise UsageError(f"{spec}: no file matches")
        found = []
        for match in map(Path, matches):
            if match.is_dir():  # `**` also matches folders on the way: one with no text is no mistake
                found += _text_files(match)
            elif match.is_file():
                found.append(match)
        if not found:
            raise UsageError(f"{spec}: matches no text file")
        return [Source("file", str(path)) for path in found]
    looks_local = spec.startswith(LOCAL_LOOKING) or Path(spec).suffix.lower() in (*FOLDER_SUFFIXES, ".json", ".md")
    if looks_local or not HUB_DATASET.match(spec):
        raise UsageError(f"{spec}: no such file or folder")
    return [Source("hub", spec)]


def resolve_sources(specs: Sequence[str]) -> list[Source]:
    """The files, hub datasets and built-in corpus that `specs` name; none named means the built-in one.

    Cheap (no file is read), so a command can check its `--data` before loading a model. A file named
    twice (say by a folder and a glob) is read once.
    """
    sources: list[Source] = []
    seen: set[str] = set()
    for spec in specs or [BUILTIN]:
        for source in _expand(spec):
            key = str(Path(source.name).resolve()) if source.kind == "file" else f"{source.kind}:{source.name}"
            if key not in seen:
                seen.add(key)
                sources.append(source)
    return sources


# ---- reading ----------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def _jsonl_documents(path: Path) -> list[str]:
    documents = []
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise UsageError(f"{path}:{number}: not JSON ({error.msg})") from None
        text = row.get("text") if isinstance(row, dict) else None
        if not isinstance(text, str):
            raise UsageError(f'{path}:{number}: no "text" string field')
        if text.strip():
            documents.append(text)
    return documents


def _parquet_documents(path: Path) -> list[str]:
    if path.stat().st_size == 0:
        raise UsageError(f"{path}: empty (no text to read)")
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise T2RError(f"{path}: reading parquet needs pyarrow; pip install pyarrow") from None
    try:
        names = pq.read_schema(path).names
        if "text" not in names:
            raise UsageError(f"{path}: no 'text' column (columns: {', '.join(names)})")
        column = pq.read_table(path, columns=["text"]).column("text").to_pylist()
    except (OSError, ValueError) as error:  # pyarrow's ArrowIOError and ArrowInvalid
        raise UsageError(f"{path}: not a readable parquet file ({_first_line(error)})") from None
    return [text for text in column if isinstance(text, str) and text.strip()]


def read_file(path: Path) -> Texts:
    """A local file's documents: a .txt (or any other text) file is one, a .jsonl/.parquet row is one."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        documents = _parquet_documents(path)
    elif suffix == ".jsonl":
        documents = _jsonl_documents(path)
    else:
        documents = [read_text(path).removeprefix("\ufeff")]
        with path.open("rb") as file:
            if b"\0" in file.read(8192):  # no text has NUL bytes: a model file or an image named by mistake
                raise UsageError(f"{path}: a binary file (or UTF-16), not UTF-8 text")
    if not documents:
        raise UsageError(f"{path}: empty (no text to read)")
    return Texts(str(path), _sha256(path), documents)


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def read_hub_dataset(spec: str) -> Texts:
    """Split train of a hub dataset `name[:config]`; offline, only the local cache is tried, at once."""
    from t2r.hub import enter_offline_mode, hub_reachable

    name, _, config = spec.partition(":")
    online = hub_reachable()
    if not online:
        enter_offline_mode()  # else huggingface_hub retries for about a minute before giving up
    try:
        import datasets
    except ImportError:
        raise T2RError(f"{spec}: reading a hub dataset needs the datasets package; pip install datasets") from None
    if not online:
        datasets.config.HF_HUB_OFFLINE = True  # read once at import: it may have been imported already
    try:
        dataset = datasets.load_dataset(name, config or None, split="train")
    except Exception as error:  # network, missing dataset or config, bad files: all one line
        if not online:
            raise T2RError(
                f"{spec}: no such file or folder, and the Hugging Face Hub cannot be reached to fetch "
                "a dataset of that name (offline?)"
            ) from None
        raise T2RError(f"{spec}: no such file or folder, nor a readable hub dataset ({_first_line(error)})") from None
    if "text" not in dataset.column_names:
        raise UsageError(f"{spec}: the dataset has no 'text' column (columns: {', '.join(dataset.column_names)})")
    documents = [text for text in dataset["text"] if isinstance(text, str) and text.strip()]
    if not documents:
        raise UsageError(f"{spec}: the dataset's train split has no text")
    digest = hashlib.sha256()
    for text in documents:
        digest.update(text.encode("utf-8") + b"\0")
    return Texts(spec, digest.hexdigest(), documents)


def read_source(source: Source) -> list[Texts]:
    if source.kind == "builtin":
        return builtin_texts()
    if source.kind == "hub":
        return [read_hub_dataset(source.name)]
    return [read_file(Path(source.name))]


# ---- tokens and blocks ------------------------------------------------------------------------------


def split_long(text: str, limit: int = CHUNK_CHARS) -> list[str]:
    """Pieces of at most `limit` characters that join back to `text`, cut after a blank line where
    there is one in the second half of the window (else after a newline, else a space, else anywhere)."""
    pieces = []
    start = 0
    while len(text) - start > limit:
        end = start + limit
        cut = end
        for separator in ("\n\n", "\n", " "):
            found = text.rfind(separator, start + limit // 2, end)
            if found != -1:
                cut = found + len(separator)
                break
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def token_ids(tokenizer: Any, documents: Sequence[str]) -> Iterator[list[int]]:
    """Each document's token ids (no special tokens), in order; long documents are encoded in pieces."""
    batch: list[list[str]] = []  # the pieces of each document in the batch
    size = 0
    for document in documents:
        batch.append(split_long(document))
        size += len(document)
        if size >= BATCH_CHARS:
            yield from _encode(tokenizer, batch)
            batch, size = [], 0
    if batch:
        yield from _encode(tokenizer, batch)


def _encode(tokenizer: Any, batch: list[list[str]]) -> Iterator[list[int]]:
    # verbose=False: a piece may be longer than the model's context, which matters to the model only.
    flat = [piece for pieces in batch for piece in pieces]
    encoded = iter(tokenizer(flat, add_special_tokens=False, verbose=False)["input_ids"])
    for pieces in batch:
        ids: list[int] = []
        for _ in pieces:
            ids.extend(next(encoded))
        yield ids


def _generator(*key: object) -> torch.Generator:
    """A CPU generator seeded by a hash of `key`, so (seed, epoch) pairs never share a stream."""
    digest = hashlib.sha256(repr(key).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def split_indices(count: int, valid_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train [N], valid [M]) block indices, each ascending; M = round(fraction·count), at least 1 when
    count ≥ 2 and the fraction is above 0, and always leaving one block to train on."""
    valid_count = 0
    if count >= 2 and valid_fraction > 0:
        valid_count = min(count - 1, max(1, round(valid_fraction * count)))
    order = torch.randperm(count, generator=_generator("split", seed))
    return order[valid_count:].sort().values, order[:valid_count].sort().values


def epoch_order(count: int, seed: int, epoch: int) -> torch.Tensor:
    """[count] the order in which epoch `epoch` visits the training blocks: a seeded permutation."""
    return torch.randperm(count, generator=_generator("epoch", seed, epoch))


def batch_indices(count: int, step: int, batch_size: int, seed: int) -> torch.Tensor:
    """[batch_size] training-block indices of step `step` (0-based), a pure function of its arguments.

    Sample number p = step·batch_size + i is position p mod count of epoch p // count, so every
    block appears once per epoch and a batch may straddle two epochs.
    """
    if count < 1:
        raise ValueError("no blocks to draw a batch from")
    first = step * batch_size
    picked = torch.empty(batch_size, dtype=torch.long)
    position = first
    while position < first + batch_size:
        epoch, offset = divmod(position, count)
        take = min(count - offset, first + batch_size - position)
        picked[position - first : position - first + take] = epoch_order(count, seed, epoch)[offset : offset + take]
        position += take
    return picked


def batch_for_step(blocks: torch.Tensor, step: int, batch_size: int, seed: int) -> torch.Tensor:
    """blocks [N, T] → the [batch_size, T] batch of step `step` (see `batch_indices`)."""
    return blocks[batch_indices(blocks.shape[0], step, batch_size, seed)]


def _describe(specs: Sequence[str]) -> str:
    if not specs:
        return "the built-in corpus"
    return specs[0] if len(specs) == 1 else f"the data ({', '.join(specs)})"


def load_blocks(
    specs: Sequence[str],
    tokenizer: Any,
    block_size: int = 512,
    valid_fraction: float = 0.02,
    seed: int = 0,
) -> TokenBlocks:
    """Read, tokenise and pack `specs` (none: the built-in corpus) into training and validation blocks."""
    if block_size < 1:
        raise UsageError(f"block size must be at least 1, got {block_size}")
    if not 0 <= valid_fraction < 1:
        raise UsageError(f"validation fraction must be in [0, 1), got {valid_fraction}")
    eos = tokenizer.eos_token_id
    stream = array("q")  # 8 bytes a token; a list of Python ints would take 36
    infos: list[SourceInfo] = []
    for source in resolve_sources(specs):
        for texts in read_source(source):
            tokens = 0
            for ids in token_ids(tokenizer, texts.documents):
                if stream and eos is not None:
                    stream.append(eos)
                stream.extend(ids)
                tokens += len(ids)
            characters = sum(len(document) for document in texts.documents)
            infos.append(SourceInfo(texts.name, texts.sha256, len(texts.documents), characters, tokens))
    count = len(stream) // block_size
    if count == 0:
        raise UsageError(f"{_describe(specs)} gives {len(stream)} tokens, fewer than one block of {block_size}")
    blocks = torch.frombuffer(stream, dtype=torch.long)[: count * block_size].view(count, block_size)
    train, valid = split_indices(count, valid_fraction, seed)
    log.info(
        "data: %s tokens from %d source(s) -> %d training + %d validation blocks of %d",
        f"{len(stream):,}",
        len(infos),
        len(train),
        len(valid),
        block_size,
    )
    return TokenBlocks(blocks[train], blocks[valid], infos)
