"""The layout rules of issue 29: a small flat core, short files and functions, folders that
say what belongs in them (docs/architecture.md draws the layout)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("gradwatch", "integrations")
"""What is shipped: the core, and integrations/ (installed as gradwatch.integrations)."""
MAX_TOP_MODULES = 12
MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 80

# Known breaches in files other sessions are changing, as {file: reason naming its owner}:
# xfail (not strict), so that the fix needs no edit here. None left at the end of issue 29.
LONG_FILES: dict[str, str] = {}
LONG_FUNCTIONS: dict[str, str] = {}


def shipped_files() -> list[str]:
    return sorted(
        str(path.relative_to(ROOT))
        for package in PACKAGES
        for path in (ROOT / package).rglob("*.py")
    )


def marked(known: dict[str, str]) -> list[object]:
    """Every shipped file as a parameter, the known breaches as xfail with their reason."""
    return [
        pytest.param(name, marks=pytest.mark.xfail(reason=known[name], strict=False))
        if name in known
        else name
        for name in shipped_files()
    ]


def long_functions(path: Path) -> list[str]:
    """`name (lines)` of every function or method in `path` longer than the limit."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno is not None
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]


def test_at_most_12_modules_directly_in_gradwatch() -> None:
    """The core's own folder stays small: its parts live in subpackages by concern."""
    modules = sorted(path.name for path in (ROOT / "gradwatch").glob("*.py"))
    assert len(modules) <= MAX_TOP_MODULES, modules


@pytest.mark.parametrize("name", marked(LONG_FILES))
def test_no_shipped_file_over_500_lines(name: str) -> None:
    """A shipped module fits in one read: at most 500 lines."""
    lines = len((ROOT / name).read_text().splitlines())
    assert lines <= MAX_FILE_LINES, f"{name}: {lines} lines"


@pytest.mark.parametrize("name", marked(LONG_FUNCTIONS))
def test_no_function_over_80_lines(name: str) -> None:
    """No function or method of a shipped module runs over 80 lines."""
    assert long_functions(ROOT / name) == []


def test_every_subpackage_says_what_belongs_there() -> None:
    """Each folder of gradwatch/ and integrations/ opens with a docstring naming its parts."""
    folders = [
        path.parent
        for package in PACKAGES
        for path in (ROOT / package).rglob("__init__.py")
        if path.parent != ROOT / package
    ]
    assert len(folders) >= 7  # engine, watch, store, views, _shadow, _local, _parallel
    undocumented = [
        str(folder.relative_to(ROOT))
        for folder in folders
        if not ast.get_docstring(ast.parse((folder / "__init__.py").read_text()))
    ]
    assert undocumented == []
