"""The record beside a compiled step of which vector instruction sets inductor's probes found: a
later process whose CPU flags name the same sets takes that answer instead of probing again."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from torch._inductor import config
from torch._inductor.cpu_vec_isa import VecISA, valid_vec_isa_list

from t2r.modeling.step_artifacts import claimed_vector_isas, record_vector_isas, vector_isas_as_probed


@pytest.fixture
def fresh_answer() -> Iterator[None]:
    """inductor's cached answer cleared before and after (what a new process starts with)."""
    valid_vec_isa_list.cache_clear()
    yield
    valid_vec_isa_list.cache_clear()


def test_a_matching_record_spares_the_probes(tmp_path: Path, fresh_answer: None, monkeypatch) -> None:
    record = tmp_path / "step.json"
    record.write_text(json.dumps({"vector_isas": claimed_vector_isas()}))

    def no_probe(self: VecISA, code: str) -> bool:
        raise AssertionError("probed")

    monkeypatch.setattr(VecISA, "check_build", no_probe)
    with vector_isas_as_probed(record):
        assert config.cpp.vec_isa_ok is True
        assert [str(isa) for isa in valid_vec_isa_list()] == claimed_vector_isas()
    assert config.cpp.vec_isa_ok is not True  # inductor's own setting again outside


@pytest.mark.parametrize("recorded", [["a set this CPU does not name"], None])
def test_another_record_or_none_leaves_inductor_to_probe(recorded, tmp_path: Path, fresh_answer: None) -> None:
    record = tmp_path / "step.json"
    if recorded is not None:
        record.write_text(json.dumps({"vector_isas": recorded}))
    with vector_isas_as_probed(record):
        assert config.cpp.vec_isa_ok is not True
        assert valid_vec_isa_list.cache_info().currsize == 0  # nothing answered in its place


def test_the_record_is_what_the_probes_found(tmp_path: Path) -> None:
    record_vector_isas(tmp_path / "step.json")
    recorded = json.loads((tmp_path / "step.json").read_text())["vector_isas"]
    assert recorded == [str(isa) for isa in valid_vec_isa_list()]
