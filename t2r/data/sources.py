"""Where text comes from: `--data` values resolved to files, hub datasets or the built-in corpus,
and read as documents.

A `--data` value (repeatable; sources are read in the order given) is one of:
    builtin               the built-in corpus (`t2r.data.corpus`), also what no `--data` means (a file of
                          that name: ./builtin)
    notes.txt, essay.md   a text file, one document (any suffix but .jsonl and .parquet)
    rows.jsonl            one JSON object per line; its "text" field is a document
    rows.parquet          its "text" column, one document per row
    corpus/               every .txt, .jsonl and .parquet file below it (recursive, sorted, hidden skipped)
    'books/*.txt'         a glob (`**` recurses); a folder it matches is read as a folder
    name[:config]         a Hugging Face hub dataset (`datasets` package), split train, its "text" column

Bytes that are not UTF-8 become U+FFFD.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from t2r.data.corpus import BUILTIN, Texts, builtin_texts
from t2r.data.textfile import read_text
from t2r.errors import T2RError, UsageError, one_line

FOLDER_SUFFIXES = (".txt", ".jsonl", ".parquet")
GLOB_CHARACTERS = frozenset("*?[")
HUB_DATASET = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(:[\w.-]+)?$")
LOCAL_LOOKING = (".", "/", "~")


@dataclass(frozen=True)
class Source:
    """A resolved `--data` value. kind: 'file' (name = path), 'hub' (name = id[:config]) or 'builtin'."""

    kind: str
    name: str


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
        raise UsageError(f"{path}: not a readable parquet file ({one_line(error)})") from None
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


def read_hub_dataset(spec: str) -> Texts:
    """Split train of a hub dataset `name[:config]`; offline, only the local cache is tried, at once."""
    from t2r.hub import enter_offline_mode, hub_reachable  # loads transformers: only for hub datasets

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
        raise T2RError(f"{spec}: no such file or folder, nor a readable hub dataset ({one_line(error)})") from None
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
