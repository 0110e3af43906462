"""What a new user meets first: a quiet clean run, and integrations that say what to install."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

CLEAN_LOOP = textwrap.dedent(
    """
    import sys
    import numpy as np
    import gradwatch
    rng = np.random.default_rng(0)
    W, x = rng.normal(size=(3, 4)), rng.normal(size=4)
    with gradwatch.GradWatch(every=1, report_dir=sys.argv[1]) as watch:
        for step in range(3):
            t = np.tanh(W @ x)
            watch.after_backward(
                step,
                loss=lambda: float(np.sum(np.tanh(W @ x) ** 2)),
                params={"W": W},
                grads={"W": np.outer(2 * t * (1 - t**2), x)},
            )
    assert watch.results[-1].status == "ok"
    """
)


def test_a_clean_plain_loop_prints_nothing(tmp_path: Path) -> None:
    """Three clean checks in a plain loop print nothing on stdout or stderr."""
    completed = subprocess.run(
        [sys.executable, "-c", CLEAN_LOOP, str(tmp_path / "report")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    assert (completed.stdout, completed.stderr) == ("", "")
    assert (tmp_path / "report" / "checks.jsonl").exists()


@pytest.mark.parametrize(
    ("integration", "blocked", "extra"),
    [
        ("torch", "torch", "torch"),
        ("transformers", "transformers", "transformers"),
        ("transformers", "torch", "transformers"),
        ("lightning", "lightning", "lightning"),
    ],
)
def test_an_integration_without_its_framework_says_what_to_install(
    integration: str, blocked: str, extra: str
) -> None:
    """Importing an integration with its framework missing names the pip extra to install."""
    code = (
        f"import sys; sys.modules[{blocked!r}] = None\n"
        f"import gradwatch.integrations.{integration}\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 1
    last = completed.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: "), last
    assert f'pip install "gradwatch[{extra}]"' in last
    assert blocked in last
