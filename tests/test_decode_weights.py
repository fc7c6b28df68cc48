"""Models made ready for decoding, kept on disk (t2r.modeling.decode_weights): the kept model is the
quantised one bit for bit, in every weight format and with tied weights; a bad file is ignored."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import pytest
import torch

import t2r.modeling.decode_weights as module
from t2r.modeling.decode_weights import decoding_model, named_tensors
from t2r.modeling.fast_decode import FastState, fast_step
from t2r.modeling.fused import fuse_projections
from t2r.modeling.quantize import with_weights
from tests.test_model import converted, left_padded_batch, trained_looking_model

module_load_kept = module.load_kept


def model_of(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return trained_looking_model(converted(family, "hedgehog", tie_qk=False, window=5))


def assert_same_model(got: torch.nn.Module, expected: torch.nn.Module) -> None:
    """The same tensors (names, dtypes, values, which ones are tied) and the same decode steps."""
    ours, theirs = named_tensors(got), named_tensors(expected)
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert ours[name].device.type == "cpu" and ours[name].dtype == theirs[name].dtype, name
        assert torch.equal(ours[name], theirs[name]), name
    ties = {name: other for name in theirs for other in theirs if other < name and theirs[other] is theirs[name]}
    assert ties == {name: other for name in ours for other in ours if other < name and ours[other] is ours[name]}
    ids, mask = left_padded_batch()
    with torch.no_grad():
        _, state = expected(ids[:, :12], mask[:, :12], form="chunked")
        ours_state, theirs_state = FastState.from_model_state(state), FastState.from_model_state(state)
        for t in range(12, 16):
            assert torch.equal(fast_step(got, ids[:, t], ours_state), fast_step(expected, ids[:, t], theirs_state))


@pytest.mark.parametrize("weights", ["int4", "int8", "bf16"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])  # a Llama-shaped family (stacked) and a Conv1D one
def test_a_kept_model_is_the_quantised_model(
    family: str, weights: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = model_of(family)
    expected = with_weights(fuse_projections(copy.deepcopy(model)), weights)
    first = decoding_model(copy.deepcopy(model), weights, tmp_path, source="weights-v1")
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    assert_same_model(first, expected)
    loaded = []
    monkeypatch.setattr(module, "load_kept", lambda *args: loaded.append(module_load_kept(*args)) or loaded[-1])
    second = decoding_model(copy.deepcopy(model), weights, tmp_path, source="weights-v1")
    assert loaded and loaded[0] is second  # from the file, not quantised again
    assert_same_model(second, expected)
    # Every tensor in PyTorch's own aligned memory, as quantising makes them: torch._weight_int8pack_mm
    # (the int8 head) crashes on a misaligned weight from 4 rows on, as a tensor read from the file was.
    assert all(tensor.data_ptr() % 64 == 0 for tensor in named_tensors(second).values() if tensor.numel())
    with torch.no_grad():
        batch = torch.randint(3, 100, (5, 3), generator=torch.Generator().manual_seed(1))
        _, state = second(batch, form="chunked")
        fast_step(second, batch[:, -1].contiguous(), FastState.from_model_state(state))  # 5 rows: no crash


def test_tied_embeddings_stay_tied(tmp_path: Path) -> None:
    model = model_of("llama")
    assert model.base.get_output_embeddings().weight is model.base.get_input_embeddings().weight
    decoding_model(copy.deepcopy(model), "bf16", tmp_path, source="tied")
    kept = decoding_model(copy.deepcopy(model), "bf16", tmp_path, source="tied")
    assert kept.base.get_output_embeddings().weight is kept.base.get_input_embeddings().weight


def test_other_weights_or_a_bad_file_quantise_again(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = model_of("llama")
    decoding_model(copy.deepcopy(model), "int4", tmp_path, source="a")
    other = model_of("llama")
    with torch.no_grad():
        for parameter in other.parameters():
            parameter.add_(0.01)
    expected = with_weights(fuse_projections(copy.deepcopy(other)), "int4")
    assert_same_model(decoding_model(copy.deepcopy(other), "int4", tmp_path, source="b"), expected)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2  # another source, another file
    for kept in tmp_path.glob("*.safetensors"):
        kept.write_bytes(kept.read_bytes()[:1000])  # truncated
    assert_same_model(decoding_model(copy.deepcopy(other), "int4", tmp_path, source="b"), expected)
    assert "do not load" in caplog.text


def test_fp32_or_no_source_keeps_nothing(tmp_path: Path) -> None:
    model = model_of("llama")
    decoding_model(copy.deepcopy(model), "fp32", tmp_path, source="a")
    decoding_model(copy.deepcopy(model), "int4", tmp_path, source="")
    assert not list(tmp_path.iterdir())


def test_the_folder_keeps_the_most_recently_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(module, "KEPT_FILES", 2)
    model = model_of("gpt2")
    for source in ("a", "b"):
        decoding_model(copy.deepcopy(model), "int8", tmp_path, source=source)
    first = {path.name for path in tmp_path.glob("*.safetensors")}
    time.sleep(0.01)
    decoding_model(copy.deepcopy(model), "int8", tmp_path, source="a")  # used again: now the newest
    time.sleep(0.01)
    decoding_model(copy.deepcopy(model), "int8", tmp_path, source="c")
    left = {path.name for path in tmp_path.glob("*.safetensors")}
    assert len(left) == 2 and len(left & first) == 1  # "b", the least recently used, went
    assert module.cache_key(model, "int8", "a") + ".safetensors" in left
