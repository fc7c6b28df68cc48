"""Teachers shipped as GGUF parts over several PyPI packages: joined in order once, checked by
SHA-256, and a missing extra said in one line."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from t2r import teachers
from t2r.errors import T2RError
from t2r.teachers import PartedGGUF, parted_gguf_path


def fake_parts(root: Path, chunks: list[bytes]) -> tuple[tuple[str, str], ...]:
    """One importable package per chunk under `root` (on sys.path), each with data/part.bin."""
    parts = []
    for index, chunk in enumerate(chunks):
        package = root / f"t2r_fake_part{index}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("")
        (package / "data" / "part.bin").write_bytes(chunk)
        parts.append((package.name, "data/part.bin"))
    return tuple(parts)


@pytest.fixture
def fake_teacher(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> bytes:
    chunks = [b"GGUF" + bytes(range(200)), bytes(1000), b"tail"]
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    parts = fake_parts(tmp_path / "site", chunks)
    whole = b"".join(chunks)
    teacher = PartedGGUF("fake.gguf", parts, hashlib.sha256(whole).hexdigest(), "fake", "a fake teacher")
    monkeypatch.setitem(teachers.PARTED, "fake-teacher", teacher)
    return whole


def test_parts_are_joined_in_order_once_and_checked(fake_teacher: bytes, tmp_path: Path) -> None:
    path = parted_gguf_path("fake-teacher", tmp_path / "cache")
    assert path.read_bytes() == fake_teacher
    modified = path.stat().st_mtime_ns
    assert parted_gguf_path("fake-teacher", tmp_path / "cache").stat().st_mtime_ns == modified  # cached
    assert [p.name for p in (tmp_path / "cache" / "teachers").iterdir()] == ["fake.gguf"]


def test_an_altered_part_is_refused_and_nothing_is_left(fake_teacher: bytes, tmp_path: Path) -> None:
    (tmp_path / "site" / "t2r_fake_part1" / "data" / "part.bin").write_bytes(bytes(999) + b"x")
    with pytest.raises(T2RError, match="SHA-256"):
        parted_gguf_path("fake-teacher", tmp_path / "cache")
    assert list((tmp_path / "cache" / "teachers").iterdir()) == []


def test_without_the_extra_one_line_says_how_to_install(tmp_path: Path, monkeypatch, capsys) -> None:
    from t2r.cli import main

    missing = PartedGGUF("x.gguf", (("t2r_no_such_package", "data/x"),), "0" * 64, "gemma3", "Gemma 3 270M")
    monkeypatch.setitem(teachers.PARTED, "gemma3-270m", missing)
    assert main(["convert", "--model", "gemma3-270m", "--out", str(tmp_path / "out")]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "pip install -e '.[gemma3]'" in error[0]
