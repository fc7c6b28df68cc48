"""Read a user's text file, with one-line errors for the usual mistakes."""

from __future__ import annotations

from pathlib import Path

from t2r.errors import UsageError


def read_text(path: Path) -> str:
    """The file's text; bytes that are not UTF-8 become U+FFFD rather than failing the run."""
    if not path.exists():
        raise UsageError(f"{path}: no such file")
    if path.is_dir():
        raise UsageError(f"{path}: is a folder, not a text file")
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except OSError as error:
        raise UsageError(f"{path}: unreadable ({error.strerror or error})") from None
    if not text.strip():
        raise UsageError(f"{path}: empty (no text to read)")
    return text
