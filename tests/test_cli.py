"""CLI: every subcommand end to end on a tiny model, and every error case as one line + exit code."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from t2r.cli import main
from tests.conftest import save_teacher


def run(argv: list[str], capfd: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:  # argparse's own exits (usage errors)
        code = int(exit_.code or 0)
    out, err = capfd.readouterr()
    return code, out, err


def only_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("t2r: error: ")
    return lines[0]


def test_convert_writes_a_loadable_folder(converted_folder: Path) -> None:
    config = json.loads((converted_folder / "config.json").read_text())
    assert config["t2r"]["feature_map"] == "t2r"
    assert config["base_config"]["model_type"] == "llama"
    assert (converted_folder / "model.safetensors").is_file()
    assert not [p for p in converted_folder.parent.iterdir() if p.name.startswith(".")]


def test_convert_attention_flags_and_their_memory_report(teacher_folder: Path, tmp_path: Path, capfd) -> None:
    """--window and --softmax-layers reach the saved config; generate reports what kept layers cost."""
    code, _, err = run(["convert", "--model", teacher_folder, "--out", tmp_path / "hybrid"], capfd)
    assert code == 0, err
    config = json.loads((tmp_path / "hybrid" / "config.json").read_text())["t2r"]
    assert config["window"] == 64 and config["rotary_features"] is False and config["softmax_layers"] == []
    assert "window 64 + linear attention" in err

    argv = ["convert", "--model", teacher_folder, "--window", "0", "--softmax-layers", "1", "--out", tmp_path / "m"]
    code, _, err = run(argv, capfd)
    assert code == 0, err
    config = json.loads((tmp_path / "m" / "config.json").read_text())["t2r"]
    assert config["window"] == 0 and config["rotary_features"] is True and config["softmax_layers"] == [1]
    assert "1 kept softmax: their KV cache grows by 257 bytes per token" in err  # 2 x 2 heads x 16 x 4 + 1
    code, _, err = run(["generate", tmp_path / "m", "--prompt", "The", "--max-new-tokens", 4, "--greedy"], capfd)
    assert code == 0, err
    assert "(+257 bytes per token: KV cache of the softmax layers)" in err


def test_convert_a_linear_state_per_kv_head_and_decode_it(teacher_folder: Path, tmp_path: Path, capfd) -> None:
    """--linear-heads kv reaches the saved config, shrinks the reported state, and decodes; without
    a window it is one line of error."""
    sizes = {}
    for heads in ("query", "kv"):
        argv = ["convert", "--model", teacher_folder, "--linear-heads", heads, "--out", tmp_path / heads]
        code, _, err = run(argv, capfd)
        assert code == 0, err
        assert json.loads((tmp_path / heads / "config.json").read_text())["t2r"]["linear_heads"] == heads
        sizes[heads] = float(err.split("state ")[-1].split(" MiB")[0])
    assert sizes["kv"] < sizes["query"]
    code, _, err = run(["generate", tmp_path / "kv", "--prompt", "The", "--max-new-tokens", 4, "--greedy"], capfd)
    assert code == 0, err
    argv = ["convert", "--model", teacher_folder, "--linear-heads", "kv", "--window", "0", "--out", tmp_path / "x"]
    code, _, err = run(argv, capfd)
    assert code != 0 and "--linear-heads kv needs a window" in only_line(err)


@pytest.mark.parametrize("feature_map", ["elu", "rfa", "hedgehog"])
def test_convert_every_feature_map(feature_map: str, teacher_folder: Path, tmp_path: Path, capfd) -> None:
    code, _, err = run(
        ["convert", "--model", teacher_folder, "--feature-map", feature_map, "--untie-qk", "--out", tmp_path / "m"],
        capfd,
    )
    assert code == 0, err
    assert json.loads((tmp_path / "m" / "config.json").read_text())["t2r"]["tie_qk"] is False


def test_generate_greedy_streams_the_requested_tokens(converted_folder: Path, capfd) -> None:
    code, out, err = run(
        [
            "generate",
            converted_folder,
            "--prompt",
            "The history of",
            "--max-new-tokens",
            12,
            "--greedy",
            "--ignore-eos",
        ],
        capfd,
    )
    assert code == 0, err
    assert out.startswith("The history of")
    assert "[12 new tokens after a" in err
    again = run(
        [
            "generate",
            converted_folder,
            "--prompt",
            "The history of",
            "--max-new-tokens",
            12,
            "--greedy",
            "--ignore-eos",
        ],
        capfd,
    )
    assert again[1] == out


def test_generate_batches_prompts_with_smaller_weights(converted_folder: Path, capfd) -> None:
    """Several --prompt decode as one batch; each completion equals that prompt decoded alone."""
    base = ["generate", converted_folder, "--max-new-tokens", 6, "--greedy", "--ignore-eos", "--weights", "int4"]
    code, out, err = run([*base, "--prompt", "The history of", "--prompt", "Once upon a time, in"], capfd)
    assert code == 0, err
    assert "[12 new tokens after a" in err and "1 more prompts, one batch" in err
    first, second = out.split("--- 'Once upon a time, in'\n")
    alone = run([*base, "--prompt", "Once upon a time, in"], capfd)
    assert alone[0] == 0 and alone[1].rstrip("\n") == second.rstrip("\n")
    assert first.startswith("--- 'The history of'\nThe history of")
    code, _, err = run([*base[:-2], "--weights", "int3", "--prompt", "x"], capfd)
    assert code == 2 and "invalid choice" in err


def test_generate_sampling_is_seeded_and_chat_works(converted_folder: Path, capfd) -> None:
    args = [
        "generate",
        converted_folder,
        "--prompt",
        "Hello",
        "--max-new-tokens",
        8,
        "--temperature",
        0.8,
        "--top-p",
        0.9,
        "--chat",
        "--ignore-eos",
    ]
    first = run([*args, "--seed", 1], capfd)
    second = run([*args, "--seed", 1], capfd)
    assert first[0] == 0 and first[1] == second[1]
    assert "[8 new tokens" in first[2]


def test_eval_three_forms_agree(converted_folder: Path, text_file: Path, capfd) -> None:
    results = {}
    for mode in ("parallel", "chunked", "recurrent"):
        code, out, err = run(
            [
                "eval",
                converted_folder,
                "--data",
                text_file,
                "--seq-len",
                64,
                "--max-tokens",
                300,
                "--mode",
                mode,
                "--json",
            ],
            capfd,
        )
        assert code == 0, err
        results[mode] = json.loads(out)
    assert results["parallel"]["tokens"] == 300 - 5  # five windows of 64 (the last partial): 1 unscored each
    for mode in ("chunked", "recurrent"):
        relative = abs(results[mode]["perplexity"] / results["parallel"]["perplexity"] - 1)
        assert relative <= 1e-4, (mode, results)


def test_eval_with_teacher_reports_fidelity(
    converted_folder: Path, teacher_folder: Path, text_file: Path, capfd
) -> None:
    # Windows of 160 tokens: past the 64-token softmax window and the 4 sinks the linear part (an
    # untrained map) answers, so the model differs from its teacher. (Within 68 tokens every form
    # is the teacher's exact softmax, and KL is 0 up to rounding, of either sign.)
    code, out, err = run(
        ["eval", converted_folder, "--data", text_file, "--seq-len", 160, "--stride", 80, "--teacher", "--json"], capfd
    )
    assert code == 0, err
    record = json.loads(out)
    assert record["teacher"] == str(teacher_folder)
    assert record["kl"] > 1e-6 and 0 <= record["top1_agreement"] <= 1
    assert {"perplexity", "tokens", "kl", "top1_agreement"} <= record.keys()


def test_eval_scores_the_unconverted_teacher(teacher_folder: Path, text_file: Path, capfd) -> None:
    code, out, err = run(
        ["eval", teacher_folder, "--data", text_file, "--seq-len", 64, "--teacher", teacher_folder, "--json"], capfd
    )
    assert code == 0, err
    record = json.loads(out)
    assert record["mode"] == "softmax"
    assert abs(record["kl"]) < 1e-6 and record["top1_agreement"] == 1.0
    code, out, _ = run(["eval", teacher_folder, "--data", text_file, "--seq-len", 64], capfd)
    assert code == 0 and out.startswith("perplexity ")


def test_cli_long_joins_files_and_reports_buckets(
    converted_folder: Path, teacher_folder: Path, text_file: Path, tmp_path: Path, capfd
) -> None:
    second = tmp_path / "second.txt"
    second.write_text(text_file.read_text())
    argv = ["eval", converted_folder, "--data", text_file, "--data", second, "--long", "--buckets", "100,400"]
    code, out, err = run([*argv, "--segment", 64, "--teacher", "--json"], capfd)
    assert code == 0, err
    record = json.loads(out)
    assert record["teacher"] == str(teacher_folder)  # the base model it resolved to, as in windowed eval
    assert [b["begin"] for b in record["buckets"]] == [1, 100, 400]
    assert record["buckets"][-1]["end"] == record["tokens"]
    assert record["state_bytes_first"] == record["state_bytes_last"]
    assert all(0 <= b["top1_agreement"] <= 1 for b in record["buckets"])
    code, out, err = run(argv, capfd)
    assert code == 0 and out.splitlines()[0].split()[:3] == ["positions", "tokens", "perplexity"]


# ---------------------------------------------------------------- error cases


@pytest.fixture(scope="module")
def broken_folders(converted_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("broken")
    folders = {}
    # A converted model whose weights file was cut short.
    truncated = root / "truncated"
    truncated.mkdir()
    for item in converted_folder.iterdir():
        (truncated / item.name).write_bytes(item.read_bytes())
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    folders["truncated"] = truncated
    # A teacher folder whose weights are garbage.
    corrupt = save_teacher(root / "corrupt-teacher")
    (corrupt / "model.safetensors").write_bytes(os.urandom(4096))
    folders["corrupt"] = corrupt
    # A teacher saved only as a pickle checkpoint.
    pickled = save_teacher(root / "pickled")
    (pickled / "model.safetensors").unlink()
    torch.save({"weight": torch.zeros(1)}, pickled / "pytorch_model.bin")
    folders["pickle"] = pickled
    # An architecture t2r has no adapter for.
    from transformers import AutoModelForCausalLM, BloomConfig

    from tests.conftest import tiny_tokenizer

    opt = AutoModelForCausalLM.from_config(  # BLOOM (ALiBi): a family no adapter knows
        BloomConfig(vocab_size=320, hidden_size=32, n_layer=1, n_head=2)
    )
    opt.save_pretrained(root / "opt")
    tiny_tokenizer().save_pretrained(root / "opt")  # loads: the refusal is the architecture's
    folders["opt"] = root / "opt"
    bad_gguf = root / "bad.gguf"
    bad_gguf.write_bytes(b"GGUF" + os.urandom(1000))
    folders["gguf"] = bad_gguf
    empty = root / "empty.txt"
    empty.write_text("  \n\n")
    folders["empty"] = empty
    return folders


ERROR_CASES = {
    # name: (argv with placeholders, exit code, words the line must contain)
    "missing model path": (["convert", "--model", "./no/such/model", "--out", "{out}"], 2, "no such file"),
    "missing eval model": (["eval", "/no/such/folder", "--data", "{text}"], 2, "no such file"),
    "missing data file": (["eval", "{converted}", "--data", "/no/such.txt"], 2, "no such file"),
    "data is a folder": (["eval", "{converted}", "--data", "{tmp}"], 2, "is a folder"),
    "empty data file": (["eval", "{converted}", "--data", "{empty}"], 2, "empty"),
    "unsupported architecture": (["convert", "--model", "{opt}", "--out", "{out}"], 2, "not supported"),
    "truncated weights": (["eval", "{truncated}", "--data", "{text}"], 1, "corrupt or truncated"),
    "truncated weights, generate": (["generate", "{truncated}", "--prompt", "x"], 1, "corrupt or truncated"),
    "corrupt teacher weights": (["convert", "--model", "{corrupt}", "--out", "{out}"], 1, "cannot load"),
    "corrupt gguf": (["convert", "--model", "{gguf}", "--out", "{out}"], 1, "cannot read GGUF"),
    "pickle-only checkpoint": (["convert", "--model", "{pickle}", "--out", "{out}"], 1, "pickle"),
    "zero new tokens": (["generate", "{converted}", "--prompt", "x", "--max-new-tokens", "0"], 2, "positive"),
    "unknown feature map": (["convert", "--feature-map", "cosine", "--out", "{out}"], 2, "invalid choice"),
    "top-p out of range": (["generate", "{converted}", "--prompt", "x", "--top-p", "1.5"], 2, "top-p"),
    "non-numeric seq len": (["eval", "{converted}", "--data", "{text}", "--seq-len", "long"], 2, "seq-len"),
    "stride above seq len": (["eval", "{converted}", "--data", "{text}", "--stride", "600"], 2, "stride"),
    "output exists": (["convert", "--model", "{teacher}", "--out", "{converted}"], 2, "already exists"),
    "generate on a teacher": (["generate", "{teacher}", "--prompt", "x"], 2, "not a converted model"),
    "softmax layer out of range": (
        ["convert", "--model", "{teacher}", "--softmax-layers", "0,7", "--out", "{out}"],
        2,
        "has 2 layers",
    ),
    "softmax layers not indices": (["convert", "--softmax-layers", "first", "--out", "{out}"], 2, "layer indices"),
    "negative window": (["convert", "--window", "-1", "--out", "{out}"], 2, "window"),
    "long eval of a teacher": (["eval", "{teacher}", "--data", "{text}", "--long"], 2, "--long scores a converted"),
    "offline hub id": (["convert", "--model", "nobody/no-such-model", "--out", "{out}"], 1, "Hub"),
}


@pytest.mark.parametrize("case", ERROR_CASES, ids=list(ERROR_CASES))
def test_errors_are_one_line(
    case: str, broken_folders, converted_folder: Path, teacher_folder: Path, text_file: Path, tmp_path: Path, capfd
) -> None:
    argv, expected_code, words = ERROR_CASES[case]
    places = {
        **{k: str(v) for k, v in broken_folders.items()},
        "converted": str(converted_folder),
        "teacher": str(teacher_folder),
        "text": str(text_file),
        "tmp": str(tmp_path),
        "out": str(tmp_path / "out"),
    }
    before = sorted(p.name for p in converted_folder.iterdir())
    code, _, err = run([arg.format(**places) for arg in argv], capfd)
    line = only_line(err)
    assert code == expected_code, line
    assert words in line, line
    assert not (tmp_path / "out").exists(), "nothing half-written"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    assert sorted(p.name for p in converted_folder.iterdir()) == before


def test_console_script_and_module_entry_points(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for command in (["t2r"], [sys.executable, "-m", "t2r"]):
        result = subprocess.run(
            [*command, "eval", "/no/such/model", "--data", "x.txt"],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
        )
        assert result.returncode == 2
        assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    help_run = subprocess.run([sys.executable, "-m", "t2r", "--help"], capture_output=True, text=True, env=env)
    assert help_run.returncode == 0 and "convert" in help_run.stdout


def test_convert_creates_missing_parent_folders(teacher_folder: Path, tmp_path: Path, capfd) -> None:
    out = tmp_path / "runs" / "deeper" / "model"
    code, _, err = run(["convert", "--model", teacher_folder, "--out", out], capfd)
    assert code == 0, err
    assert (out / "config.json").is_file()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run(["convert", "--model", teacher_folder, "--out", blocker / "model"], capfd)
    assert code == 2 and "not a folder" in only_line(err)


def subcommands() -> dict[str, argparse.ArgumentParser]:
    from t2r.cli import build_parser

    parser = build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


@pytest.mark.parametrize("command", ["convert", "train", "generate", "eval", "bench"])
def test_help_gives_every_flag_a_line_and_its_default(command: str) -> None:
    """Every flag has help; every optional one shows its default (a value, "off" for a switch, or
    what the help says it falls back to)."""
    parser = subcommands()[command]
    for action in parser._actions:
        if "--help" in action.option_strings:
            continue
        assert action.help, f"{command} {action.option_strings or action.dest}: no help"
        shown = parser._get_formatter()._get_help_string(action)
        if action.option_strings and not action.required:
            assert "default" in shown, f"{command} {action.option_strings[0]}: {shown!r}"
    text = parser.format_help()
    assert "(default: None)" not in text and "(default: [])" not in text


def test_version(capfd) -> None:
    import t2r

    code, out, _ = run(["--version"], capfd)
    assert code == 0 and out.strip() == f"t2r {t2r.__version__}"


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["bench", "m", "--contexts", "256,x"], "argument --contexts: expected comma-separated token counts"),
        (["bench", "m", "--contexts", "0,256"], "argument --contexts: expected comma-separated token counts"),
        (["bench", "m", "--batches", "0"], "argument --batches: expected comma-separated batch sizes"),
        (["bench", "m", "--weights", "int4"], "argument --weights: expected comma-separated weight formats"),
        (["eval", "m", "--data", "f", "--buckets", "a"], "argument --buckets: expected comma-separated token counts"),
        (
            ["convert", "--out", "o", "--softmax-layers", "-1"],
            "argument --softmax-layers: expected comma-separated layer",
        ),
    ],
)
def test_each_list_flag_names_itself_and_its_kind_in_errors(argv: list[str], words: str, capfd) -> None:
    code, _, err = run(argv, capfd)
    assert code == 2 and words in only_line(err), err
    assert "layer indices" not in err or "--softmax-layers" in err


def test_command_functions_read_in_one_sitting() -> None:
    """No function of the command line is over 60 lines."""
    import ast

    for path in (Path(__file__).resolve().parents[1] / "t2r" / "cli").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef):
                assert node.end_lineno - node.lineno < 60, f"{path.name}: {node.name}"


def test_the_global_cache_flag_reaches_the_model_and_its_baseline(
    teacher_folder: Path, converted_folder: Path, text_file: Path, tmp_path: Path, capfd
) -> None:
    """`convert --global-cache N` saves it; `eval --global-cache N` gives it to a converted model as
    it loads, and the baseline of equal bytes grows by the cache's bytes; a teacher takes none."""
    argv = ["convert", "--model", teacher_folder, "--window", 8, "--global-cache", 2, "--out", tmp_path / "cached"]
    code, _, err = run(argv, capfd)
    assert code == 0, err
    assert json.loads((tmp_path / "cached" / "config.json").read_text())["t2r"]["global_cache"] == 2
    records = {}
    for slots in (0, 16):
        argv = ["eval", converted_folder, "--data", text_file, "--seq-len", 100, "--max-tokens", 200]
        code, out, err = run([*argv, "--global-cache", slots, "--baseline", "--json"], capfd)
        assert code == 0, err
        records[slots] = json.loads(out)
    assert records[16]["baseline"]["window"] > records[0]["baseline"]["window"]
    assert records[16]["perplexity"] != records[0]["perplexity"]  # keys left the 64-token window: cached
    argv = ["generate", converted_folder, "--prompt", "The history of", "--max-new-tokens", 8, "--greedy"]
    plain, cached = (run([*argv, *extra], capfd) for extra in ([], ["--global-cache", 64]))
    assert plain[0] == cached[0] == 0, cached[2]
    state = [float(err.split("state ")[1].split(" MiB")[0]) for _, _, err in (plain, cached)]
    assert state[1] > state[0]  # the cache's slots are in the decode state
    code, _, err = run(["eval", teacher_folder, "--data", text_file, "--global-cache", 4], capfd)
    assert code == 2 and "softmax model" in only_line(err)
    code, _, err = run(
        ["convert", "--model", teacher_folder, "--window", 0, "--global-cache", 2, "--out", tmp_path / "x"], capfd
    )
    assert code == 2 and "--global-cache needs a window" in only_line(err)
