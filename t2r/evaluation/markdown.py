"""Regenerated sections of a Markdown report (BENCHMARKS.md): scripts own the text between markers."""

from __future__ import annotations

from pathlib import Path


def replace_section(path: Path, name: str, body: str, title: str) -> None:
    """Rewrite the text between `<!-- name:start -->` and `<!-- name:end -->` in `path`.

    A missing section is appended under a `## title` heading; everything else is left alone.
    """
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body}\n{end}"
    if start in text and end in text:
        before, rest = text.split(start, 1)
        text = before + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + f"\n\n## {title}\n\n{block}\n"
    path.write_text(text)
