"""The sample outputs in README.md come from real runs, and this test keeps them true.

How it works (keep it when you rewrite the README): a sample is a fenced block right
after a marker line ``<!-- sample: NAME -->``. `GENERATORS` maps each NAME to a function
that runs the real thing and returns the text to show (paths as the README types them;
a leading ``...`` line where it leaves earlier output out). The block must equal it.
Every marker needs a generator and every generator a marker. To refresh the blocks after
an intended change of the output:

    GRADWATCH_UPDATE_SAMPLES=1 pytest tests/test_readme_samples.py
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from gradwatch.cli import main

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SAMPLE = re.compile(
    r"^<!-- sample: (?P<name>[\w-]+) -->\n```(?P<lang>\w*)\n(?P<body>.*?)^```$",
    re.MULTILINE | re.DOTALL,
)
ELIDED = "..."


def numpy_demo_show(directory: Path) -> str:
    """The README's first command: the numpy demo with its bug, then ``gradwatch show``."""
    demo = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "numpy_mlp.py"), "--bug"],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert demo.returncode == 0, demo.stderr
    last_two = demo.stdout.splitlines()[-2:]  # the demo's alert summary and its hint
    shown = io.StringIO()
    cwd = Path.cwd()
    os.chdir(directory)  # the report path as the README types it: runs/numpy_mlp/gradwatch
    try:
        with contextlib.redirect_stdout(shown):
            assert main(["show", "runs/numpy_mlp/gradwatch"]) == 1
    finally:
        os.chdir(cwd)
    return "\n".join([ELIDED, *last_two]) + "\n" + shown.getvalue()


def accumulation_bug_alert(directory: Path) -> str:
    """The step link's alert on the HF Trainer's old accumulation bug, wrapped at 90 columns."""
    pytest.importorskip("transformers")
    demo = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "accumulation_bug.py"), "--bug"],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert demo.returncode == 1, demo.stderr[-2000:]
    (alert,) = [line for line in demo.stdout.splitlines() if line.startswith(ALERT_AT_0)]
    return textwrap.fill(alert, 90) + "\n"


ALERT_AT_0 = "training step check failed at step 0:"

GENERATORS: dict[str, Callable[[Path], str]] = {
    "numpy-demo-show": numpy_demo_show,
    "accumulation-bug-alert": accumulation_bug_alert,
}
MARKS = {
    "numpy-demo-show": [pytest.mark.slow],
    "accumulation-bug-alert": [pytest.mark.torch, pytest.mark.slow],
}
"""Samples over ~5 s are ``slow``; those that train with torch are ``torch`` too."""


def samples() -> dict[str, str]:
    """README's samples: name -> the text of the block after its marker."""
    found: dict[str, str] = {}
    for match in SAMPLE.finditer(README.read_text(encoding="utf-8")):
        assert match["name"] not in found, f"sample {match['name']!r} is marked twice"
        found[match["name"]] = match["body"]
    return found


def test_every_marker_has_a_generator_and_every_generator_a_marker() -> None:
    """README.md marks exactly the samples this test regenerates."""
    assert sorted(samples()) == sorted(GENERATORS)


@pytest.mark.parametrize(
    "name",
    [pytest.param(name, marks=MARKS.get(name, [])) for name in sorted(GENERATORS)],
)
def test_readme_sample_is_real_output(name: str, tmp_path: Path) -> None:
    """The README block equals what the real run prints now."""
    output = GENERATORS[name](tmp_path)
    block = samples()[name]
    if os.environ.get("GRADWATCH_UPDATE_SAMPLES") and block != output:
        text = README.read_text(encoding="utf-8")
        opening = text.index("```", text.index(f"<!-- sample: {name} -->"))
        body = text.index("\n", opening) + 1
        README.write_text(text[:body] + output + text[body + len(block) :], encoding="utf-8")
        block = samples()[name]
    assert block == output, (
        f"README.md sample {name!r} differs from the real output; if the change is "
        f"intended: GRADWATCH_UPDATE_SAMPLES=1 pytest tests/{Path(__file__).name}\n"
        f"--- README\n{block}--- real\n{output}"
    )
