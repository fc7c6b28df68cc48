"""The README says what the code does: its commands are CI's, its flags are the parser's, its map of
the package is the package, and its Python example runs."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from t2r.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
# Flags in the README that belong to other tools (pip, accelerate launch).
OTHER_TOOLS = {"--multi_gpu", "--num_processes", "--config_file", "--mixed_precision", "--no-binary"}
LM_EVAL = {"--model", "--model_args", "--tasks", "--include_path", "--batch_size", "--num_fewshot"}


def section(title: str) -> str:
    start = README.index(f"## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end != -1 else None]


def code_blocks(text: str, language: str = "") -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def command_flags() -> dict[str, set[str]]:
    """Each t2r command's long flags, from the parser itself."""
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {
        name: {o for a in sub._actions for o in a.option_strings if o.startswith("--") and o != "--help"}
        for name, sub in commands.choices.items()
    }


def test_ci_runs_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    command = next(line for line in README.splitlines() if "pip install -e '.[test]'" in line)
    assert command in ci and "python -m pytest" in command


def test_the_quick_start_trains_and_generates_with_the_default_model() -> None:
    main_job = next(line for line in code_blocks(section("Quick start"), "bash")[0].splitlines() if "t2r train" in line)
    assert "pip install -e ." in main_job and "t2r generate" in main_job and "--model" not in main_job


def test_readme_pins_torch_like_the_project() -> None:
    assert '"torch==2.13.0"' in (ROOT / "pyproject.toml").read_text()
    assert "torch` is pinned to exactly 2.13.0" in README


def test_every_flag_of_the_command_summary_is_the_parsers() -> None:
    """Each `t2r <command> ...` entry of the Commands block names only that command's flags, and
    names all of them."""
    flags = command_flags()
    entries = re.split(r"\n(?=t2r )", code_blocks(section("Commands"), "bash")[0].strip())
    named: dict[str, set[str]] = {name: set() for name in flags}
    for entry in entries:
        command = entry.split()[1]
        named[command] |= set(re.findall(r"--[a-z][\w-]*", entry))
    for command, documented in named.items():
        assert documented <= flags[command], (command, documented - flags[command])
        assert documented == flags[command], (command, "undocumented:", flags[command] - documented)


def test_every_flag_the_readme_mentions_exists() -> None:
    known = set().union(*command_flags().values()) | OTHER_TOOLS | LM_EVAL | {"--version", "--help", "--recipe"}
    mentioned = set(re.findall(r"--[a-z][\w-]*", README))
    assert mentioned <= known, mentioned - known


def test_the_package_map_is_the_package() -> None:
    """Every module of t2r appears in "How it is built", and everything listed there exists."""
    block = code_blocks(section("How it is built"))[0]
    listed: set[str] = set()
    folder = ""
    for line in block.splitlines():
        words = line.split()
        if not words:
            continue
        if line.startswith("t2r/"):
            folder = words[0] if words[0].endswith("/") else ""
            listed.add(words[0].rstrip("/"))
        elif line.startswith("    ") and folder:
            names = [w for w in words if w.endswith(".py") or w.endswith("/")]
            names = names if len(names) > 1 else names[:1]  # one name and its description, or a row of names
            listed |= {folder + name.rstrip("/") for name in names}
    assert all((ROOT / path).exists() for path in listed), [p for p in listed if not (ROOT / p).exists()]
    modules = {
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "t2r").rglob("*.py")
        if path.name not in ("__init__.py", "__main__.py")
    }
    covered = {m for m in modules if any(m == p or m.startswith(p + "/") for p in listed)}
    assert covered == modules, modules - covered


def test_the_python_example_runs(teacher_folder: Path, tmp_path: Path) -> None:
    """The README's Python example, on the tiny teacher instead of the default model."""
    example = next(block for block in code_blocks(README, "python") if "load_teacher" in block)
    example = example.replace('"smollm2-135m"', repr(str(teacher_folder)))
    example = example.replace('"runs/python-api"', repr(str(tmp_path / "python-api")))
    scope: dict = {}
    exec(compile(example, "README.md", "exec"), scope)
    logits, state = scope["logits"], scope["state"]
    assert logits.shape[:2] == scope["tokenizer"]("The history of", return_tensors="pt").input_ids.shape
    assert state.nbytes() == scope["model"].init_state(1).nbytes()  # constant size


def test_the_transformers_example_runs(tmp_path: Path) -> None:
    """The README's transformers example, on a tiny converted folder instead of the trained model."""
    from .test_transformers_model import saved_model

    folder = saved_model(tmp_path / "model")
    example = next(block for block in code_blocks(README, "python") if "AutoModelForCausalLM" in block)
    example = example.replace('"runs/smollm2/model"', repr(str(folder)))
    scope: dict = {}
    exec(compile(example, "README.md", "exec"), scope)
    assert scope["out"].shape == (2, scope["inputs"].input_ids.shape[1] + 64)
