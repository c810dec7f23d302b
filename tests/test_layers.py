"""The package's layers point one way (README "Architecture"), and nothing patches transformers.

Read from the source with `ast`, so a violation fails here whether or not a test imports it.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "sparsetorch"

# Each layer may import the layers before it, never those after it.
LAYERS: list[set[str]] = [
    {"cache", "checks", "malloc"},
    {"patterns", "scores", "targets", "families", "data", "allocate", "quantize"},
    {"formats"},
    {"kernels"},
    {"nn", "precision"},
    {"models"},
    {"oneshot", "training"},
    {"runtime"},
    {"evaluate"},
    {"cli"},
]
LAYER_OF = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE)


def _part(path: Path) -> str:
    """The top-level piece of the package a file belongs to: 'oneshot' for oneshot/pipeline.py."""
    return path.relative_to(PACKAGE).with_suffix("").parts[0]


def _imported_parts(tree: ast.AST) -> list[tuple[int, str, bool]]:
    """(line, top-level piece, inside a function) of every `sparsetorch.*` import."""
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            names = []
            if isinstance(child, ast.ImportFrom) and child.module and child.module.startswith("sparsetorch."):
                names = [child.module]
            elif isinstance(child, ast.Import):
                names = [a.name for a in child.names if a.name.startswith("sparsetorch.")]
            found.extend((child.lineno, name.split(".")[1], in_function) for name in names)
            visit(child, inner)

    visit(tree, False)
    return found


def test_every_module_belongs_to_a_layer():
    assert {_part(p) for p in _modules()} <= set(LAYER_OF)


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down_the_layers(path):
    own = _part(path)
    for line, other, _ in _imported_parts(ast.parse(path.read_text())):
        if other != own:
            assert LAYER_OF[other] < LAYER_OF[own], f"{path.name}:{line}: {own} imports {other}, a later layer"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_only_the_cli_imports_lazily_or_takes_argparse(path):
    """Function-local sparsetorch imports would hide import loops; the CLI defers its imports so
    `--help` answers fast, and the bench worker so its process never loads what it does not run."""
    text = path.read_text()
    lazy_allowed = path.relative_to(PACKAGE).as_posix() in ("cli.py", "evaluate/bench_worker.py")
    if not lazy_allowed:
        lazy = [line for line, _, in_function in _imported_parts(ast.parse(text)) if in_function]
        assert not lazy, f"{path.name}: function-local sparsetorch imports at lines {lazy}"
    if path.name != "cli.py":
        assert not re.search(r"^\s*import argparse|Namespace", text, re.MULTILINE), path.name


def test_nothing_patches_transformers():
    text = "\n".join(p.read_text() for p in _modules())
    assert not re.search(r"AttentionInterface|_attn_implementation", text)
    assert not re.search(r"sys\.modules(\.get|\[)", text)  # no reaching into someone's modeling module


def test_family_names_are_keys_of_one_table():
    families = ast.parse((PACKAGE / "families.py").read_text())
    table = next(n for n in ast.walk(families) if isinstance(n, ast.AnnAssign) and n.target.id == "FAMILIES")
    names = {key.value for key in table.value.keys}
    assert {"llama", "qwen2", "gpt2"} <= names
    for path in _modules():
        if path.name == "families.py":
            continue
        strings = {n.value for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Constant)}
        assert not names & strings, f"{path.name} names families {sorted(names & strings)}: use families.FAMILIES"


def test_storage_imports_no_pruning_method():
    code = "import sys, sparsetorch.formats; print(sorted(m for m in sys.modules if m.startswith('sparsetorch.')))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "sparsetorch.formats" in loaded and "sparsetorch.oneshot" not in loaded
