"""The package as users install it: light import, wheel layout, gradwatch.integrations mapping."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "lightning", "pytorch_lightning", "jax", "matplotlib")


def run_python(code: str, cwd: Path, env_path: str | None = None) -> str:
    env = {"PYTHONPATH": env_path} if env_path else {}
    completed = subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
        env={**_base_env(), **env},
    )
    return completed.stdout.strip()


def _base_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def test_import_gradwatch_loads_no_framework(tmp_path: Path) -> None:
    """`import gradwatch` leaves torch, transformers, lightning, jax and matplotlib unloaded."""
    loaded = run_python(
        f"import sys, gradwatch; print(' '.join(m for m in {HEAVY!r} if m in sys.modules))",
        cwd=tmp_path,
    )
    assert loaded == ""


def test_installed_package_maps_integrations_under_gradwatch(tmp_path: Path) -> None:
    """gradwatch.integrations is importable and no top-level `integrations` module exists."""
    out = run_python(
        "import importlib.util, gradwatch.integrations as i; "
        "print(i.__name__, importlib.util.find_spec('integrations') is None)",
        cwd=tmp_path,
    )
    assert out == "gradwatch.integrations True"


@pytest.mark.slow
def test_wheel_contains_the_package_typed_and_mapped(tmp_path: Path) -> None:
    """A built wheel holds gradwatch/, gradwatch/integrations/, py.typed and the console script."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    wheel = next(tmp_path.glob("gradwatch-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "gradwatch/__init__.py" in names
    assert "gradwatch/py.typed" in names
    assert "gradwatch/integrations/__init__.py" in names
    assert not any(n.startswith("integrations/") for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "gradwatch = gradwatch.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()

    site = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(site),
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    out = run_python(
        "import gradwatch, gradwatch.integrations, numpy as np; "
        "w = np.ones(3); r = gradwatch.check(lambda: float((w**2).sum()), w, 2*w); "
        f"print(gradwatch.__file__.startswith({str(site)!r}), r.status)",
        cwd=tmp_path,
        env_path=str(site),
    )
    assert out == "True ok"
