"""The examples in gradwatch.integrations' docstrings run and print what they say.

pytest's ``--doctest-modules`` collects from the source folders, and ``integrations/`` is
installed as ``gradwatch.integrations`` (setuptools' package-dir mapping): collected by
path it would be imported a second time under another name. These tests run the
doctests of the installed modules instead.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

pytest.importorskip("torch")

import gradwatch.integrations

pytestmark = pytest.mark.torch

FRAMEWORKS = {"transformers": "transformers", "lightning": "lightning"}
"""Modules that need a framework beyond torch, and the package each one needs."""

MODULES = sorted(
    f"gradwatch.integrations.{info.name}"
    for info in pkgutil.iter_modules(gradwatch.integrations.__path__)
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_pass(name: str) -> None:
    """Every doctest in the module passes."""
    framework = FRAMEWORKS.get(name.rsplit(".", 1)[-1])
    if framework is not None:
        pytest.importorskip(framework)
    module = importlib.import_module(name)
    outcome = doctest.testmod(module, optionflags=doctest.ELLIPSIS, report=True)
    assert outcome.failed == 0, f"{outcome.failed} of {outcome.attempted} examples failed"


def test_check_module_example_runs() -> None:
    """The check_module docstring's example is among the doctests that run."""
    from gradwatch.integrations.torch import check_module

    module = importlib.import_module(check_module.__module__)
    finder = doctest.DocTestFinder()
    (test,) = [t for t in finder.find(module) if t.name.endswith(".check_module")]
    assert test.examples and module.__name__ in MODULES
