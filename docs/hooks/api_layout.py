"""mkdocs hook: lay the package out as installed, for the API reference.

``integrations/`` is installed as ``gradwatch.integrations`` (setuptools' package-dir),
so a static reading of the source tree cannot find it. Before the build this hook makes
``build/api-src/gradwatch``, a copy of ``gradwatch/`` with ``integrations/`` copied in
as ``gradwatch/integrations`` (griffe follows a linked file back to its real folder, so
links would not do); mkdocstrings reads from there (``paths`` in mkdocs.yml). Nothing is
imported.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from mkdocs.plugins import event_priority

ROOT = Path(__file__).resolve().parents[2]
LAYOUT = ROOT / "build" / "api-src"


# Before mkdocstrings reads its `paths`, which it drops when they do not exist yet.
@event_priority(100)
def on_config(config: Any) -> Any:
    """Rebuild the installed layout of the package under build/api-src."""
    package = LAYOUT / "gradwatch"
    shutil.rmtree(LAYOUT, ignore_errors=True)
    skip = shutil.ignore_patterns("__pycache__")
    shutil.copytree(ROOT / "gradwatch", package, ignore=skip)
    shutil.copytree(ROOT / "integrations", package / "integrations", ignore=skip)
    return config
