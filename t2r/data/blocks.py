"""Documents -> packed token blocks for training, a held-out split, and a seeded order for every step.

Each document is tokenised without special tokens, the tokenizer's eos id (if it has one) goes
between documents, and the stream is cut into blocks of `block_size` tokens, the remainder dropped.
A seeded fraction of the blocks is held out for validation. Training walks epochs, each a seeded
permutation of the training blocks that depends on (seed, epoch) only, so the batch of any step can
be recomputed: that is what lets a resumed run see exactly the batches an uninterrupted one would
have.
"""

from __future__ import annotations

import hashlib
import logging
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from t2r.data.sources import read_source, resolve_sources
from t2r.errors import UsageError

log = logging.getLogger(__name__)

# The tokenizer is handed pieces of at most this many characters (one call on a whole novel is slow),
# in batched calls of about BATCH_CHARS (a batch is encoded on all cores; smaller bounds memory).
CHUNK_CHARS = 100_000
BATCH_CHARS = 4_000_000


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
