"""The README's commands are the ones CI runs."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = next(line for line in readme.splitlines() if "pip install -e '.[test]'" in line)
    assert command in ci


def test_readme_pins_torch_like_the_project() -> None:
    assert '"torch==2.13.0"' in (ROOT / "pyproject.toml").read_text()
