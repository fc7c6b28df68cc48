"""`--baseline` in `t2r eval` and `t2r convert --feature-map none`: the training-free sliding window
beside a converted model, at equal state bytes unless a window is named."""

from __future__ import annotations

import json
from pathlib import Path

from t2r.hub import load_converted
from t2r.modeling.baseline import equal_memory_window
from tests.test_cli import only_line, run


def test_eval_scores_the_equal_memory_baseline(converted_folder: Path, text_file: Path, capfd) -> None:
    args = ["eval", converted_folder, "--data", text_file, "--max-tokens", 400, "--seq-len", 160, "--stride", 80]
    args += ["--teacher", "--json"]
    code, out, err = run([*args, "--baseline"], capfd)
    assert code == 0, err
    record = json.loads(out)
    model, _ = load_converted(converted_folder)
    baseline = record["baseline"]
    assert baseline["window"] == equal_memory_window(model, baseline["sinks"])
    assert baseline["state_bytes"] <= model.init_state(1).nbytes()
    assert baseline["tokens"] == record["tokens"] and baseline["kl"] > 1e-6
    # A window longer than every scoring window is the teacher itself.
    code, out, err = run([*args, "--baseline", 1000], capfd)
    assert code == 0, err
    wide = json.loads(out)["baseline"]
    assert wide["window"] == 1000 and abs(wide["kl"]) < 1e-5 and wide["top1_agreement"] == 1.0
    code, out, err = run([*args[:-1], "--baseline"], capfd)  # text output, both rows named
    assert code == 0 and "baseline (sinks 4 + window" in out and out.count("perplexity") == 2


def test_long_eval_scores_the_baseline_stream(converted_folder: Path, text_file: Path, capfd) -> None:
    code, out, err = run(
        ["eval", converted_folder, "--data", text_file, "--long", "--buckets", 100, "--segment", 64, "--baseline", 20],
        capfd,
    )
    assert code == 0, err
    assert "baseline (sinks 4 + window 20):" in out and out.count("positions") == 2


def test_baseline_needs_a_converted_model(teacher_folder: Path, text_file: Path, capfd) -> None:
    code, _, err = run(["eval", teacher_folder, "--data", text_file, "--baseline"], capfd)
    assert code == 2 and "--baseline" in only_line(err)


def test_convert_feature_map_none_is_the_baseline(teacher_folder: Path, tmp_path: Path, capfd) -> None:
    out = tmp_path / "window-only"
    convert = ["convert", "--model", teacher_folder, "--feature-map", "none", "--out", out]
    code, _, err = run([*convert, "--window", 12], capfd)
    assert code == 0, err
    assert "sliding window of 12 tokens, no linear part" in err
    model, _ = load_converted(out)
    assert model.config.feature_map == "none" and model.config.sinks == 4 and model.config.half_life == 0
    code, _, err = run([*convert, "--window", 0, "--overwrite"], capfd)
    assert code == 2 and "needs a window" in only_line(err)


def test_eval_passkey_runs_teacher_model_and_baseline(converted_folder: Path, tmp_path: Path, capfd) -> None:
    plot = tmp_path / "passkey.png"
    argv = ["eval", converted_folder, "--passkey", "--lengths", "120,200", "--depths", "0.5", "--trials", 1]
    code, out, err = run([*argv, "--baseline", "--json", "--plot", plot], capfd)
    assert code == 0, err
    record = json.loads(out)
    assert {c["model"] for c in record["cases"]} == {"teacher", "model", "baseline"}
    assert {c["length"] for c in record["cases"]} == {120, 200} and all(c["trials"] == 1 for c in record["cases"])
    assert record["baseline"]["window"] > 0 and plot.stat().st_size > 0
    code, out, err = run(argv, capfd)  # the text table
    assert code == 0 and out.splitlines()[0].split() == ["model", "length", "depth", "exact", "rank-1", "mean", "rank"]


def test_eval_chat_compares_with_the_teacher(converted_folder: Path, capfd) -> None:
    argv = ["eval", converted_folder, "--chat", "--limit", 2, "--max-new-tokens", 6, "--baseline", 1000, "--json"]
    code, out, err = run(argv, capfd)
    assert code == 0, err
    record = json.loads(out)
    assert record["reference"] == "teacher" and set(record["scores"]) == {"model", "baseline"}
    # A window longer than every answer is the teacher: whole answers agree.
    assert record["scores"]["baseline"]["identical"] == 1.0 and len(record["instructions"]) == 2


def test_eval_tasks_one_at_a_time_and_perplexity_needs_data(converted_folder: Path, capfd) -> None:
    code, _, err = run(["eval", converted_folder, "--chat", "--passkey"], capfd)
    assert code == 2 and "choose one task" in only_line(err)
    code, _, err = run(["eval", converted_folder], capfd)
    assert code == 2 and "--data is required" in only_line(err)
