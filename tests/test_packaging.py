"""The package as users install it: light import, wheel layout and metadata, the changelog."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
import zipfile
from dataclasses import dataclass
from email.message import Message
from email.parser import Parser
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


@dataclass(frozen=True)
class BuiltWheel:
    path: Path
    log: str  # pip's and setuptools' output, warnings included

    @property
    def names(self) -> list[str]:
        return zipfile.ZipFile(self.path).namelist()

    def read(self, suffix: str) -> str:
        name = next(n for n in self.names if n.endswith(suffix))
        return zipfile.ZipFile(self.path).read(name).decode()

    @property
    def metadata(self) -> Message:
        return Parser().parsestr(self.read(".dist-info/METADATA"))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> BuiltWheel:
    """The wheel `pip wheel` builds from this checkout, with the build's output."""
    out = tmp_path_factory.mktemp("wheel")
    built = pip("wheel", "--no-deps", "--no-build-isolation", "-v", "-w", str(out), str(ROOT))
    return BuiltWheel(next(out.glob("gradwatch-*.whl")), built)


def pip(*args: str) -> str:
    """Run this interpreter's pip; its output, stderr included."""
    done = subprocess.run(
        [sys.executable, "-m", "pip", *args], check=True, capture_output=True, text=True
    )
    return done.stdout + done.stderr


def install(wheel: BuiltWheel, site: Path) -> None:
    """Install the wheel alone into the folder `site`."""
    pip("install", "--no-deps", "-q", "--target", str(site), str(wheel.path))


def test_wheel_builds_without_deprecation_warnings(wheel: BuiltWheel) -> None:
    """setuptools builds the wheel without a deprecation warning (the license table was one)."""
    assert "DeprecationWarning" not in wheel.log
    assert "deprecated" not in wheel.log.lower()


def test_wheel_declares_and_ships_the_mit_license(wheel: BuiltWheel) -> None:
    """The metadata names the license by SPDX expression and the wheel holds its text."""
    metadata = wheel.metadata
    assert metadata["License-Expression"] == "MIT"
    assert metadata.get_all("License-File") == ["LICENSE"]
    assert "Permission is hereby granted" in wheel.read(".dist-info/licenses/LICENSE")
    # PEP 639: a license expression replaces the license classifiers.
    assert not [c for c in metadata.get_all("Classifier", []) if c.startswith("License ::")]


def test_no_extra_pins_an_exact_torch_release(wheel: BuiltWheel) -> None:
    """Every extra asks for torch by lower bound, so installing one keeps the user's torch."""
    torch_requirements = [
        r for r in wheel.metadata.get_all("Requires-Dist", []) if re.match(r"torch\b", r)
    ]
    assert {r.split(";")[1].strip() for r in torch_requirements} == {
        'extra == "torch"',
        'extra == "transformers"',
        'extra == "lightning"',
    }
    for requirement in torch_requirements:
        specifier = requirement.split(";")[0]
        assert "==" not in specifier and "<" not in specifier, requirement
        assert ">=" in specifier, requirement


def test_wheel_metadata_describes_the_project(wheel: BuiltWheel) -> None:
    """Authors, keywords, Python and topic classifiers and the typed marker are declared."""
    metadata = wheel.metadata
    classifiers = metadata.get_all("Classifier", [])
    assert "Typing :: Typed" in classifiers
    assert "Programming Language :: Python :: 3" in classifiers
    assert any(c.startswith("Topic :: ") for c in classifiers)
    assert metadata["Author"] == "gradwatch developers"
    assert "gradient checking" in metadata["Keywords"]


def test_long_description_links_nothing_the_wheel_lacks(wheel: BuiltWheel) -> None:
    """The README shown on the package index has no relative link (nothing beside it ships)."""
    description = wheel.metadata.get_payload()
    assert isinstance(description, str) and "gradwatch" in description
    targets = re.findall(r"\]\(([^)\s]+)\)", description)
    relative = [t for t in targets if not t.startswith(("https://", "http://", "#"))]
    assert relative == []


def test_installed_version_matches_the_metadata_and_the_changelog(
    wheel: BuiltWheel, tmp_path: Path
) -> None:
    """`gradwatch.__version__` of the installed wheel is its metadata's, and CHANGELOG names it."""
    site = tmp_path / "site"
    install(wheel, site)
    installed = run_python("import gradwatch; print(gradwatch.__version__)", tmp_path, str(site))
    version = wheel.metadata["Version"]
    assert installed == version
    assert version == tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    changelog = (ROOT / "CHANGELOG.md").read_text()
    first_release = re.search(r"^## \[(\d[^\]]*)\]", changelog, re.MULTILINE)
    assert first_release is not None and first_release.group(1) == version


@pytest.mark.slow
def test_wheel_contains_the_package_typed_and_mapped(wheel: BuiltWheel, tmp_path: Path) -> None:
    """A built wheel holds gradwatch/, gradwatch/integrations/, py.typed and the console script."""
    names = wheel.names
    assert "gradwatch/__init__.py" in names
    assert "gradwatch/py.typed" in names
    assert "gradwatch/integrations/__init__.py" in names
    assert not any(n.startswith("integrations/") for n in names)
    assert "gradwatch = gradwatch.cli:main" in wheel.read("entry_points.txt")

    site = tmp_path / "site"
    install(wheel, site)
    out = run_python(
        "import gradwatch, gradwatch.integrations, numpy as np; "
        "w = np.ones(3); r = gradwatch.check(lambda: float((w**2).sum()), w, 2*w); "
        f"print(gradwatch.__file__.startswith({str(site)!r}), r.status)",
        cwd=tmp_path,
        env_path=str(site),
    )
    assert out == "True ok"


DOCS_PAGES = (
    "index",
    "check",
    "verdict",
    "torch",
    "distributed",
    "reports",
    "runs",
    "cli",
    "benchmarks",
    "design",
    "architecture",
    "api",
)
"""The docs pages the README's front door names (the site's nav, less the figures page)."""


def test_readme_is_a_front_door_naming_the_docs() -> None:
    """README.md has at most 200 lines, names the docs pages, and each page it names exists."""
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    assert [page for page in DOCS_PAGES if f"`docs/{page}.md`" not in readme] == []
    named = re.findall(r"docs/([\w-]+)\.md", readme)
    assert [page for page in named if not (ROOT / "docs" / f"{page}.md").is_file()] == []
