"""The Lightning callback under ``strategy="ddp"``: 2 CPU processes (gloo).

Both ways a DDP run starts: under ``torchrun`` (Lightning joins its ranks) and as a
plain ``python script.py`` (Lightning re-launches the script for rank 1). Every rank
checks at every due step (a check is collective), the ranks agree on every verdict,
rank 0 alone writes, the step link holds against DDP's averaged ``.grad``, and
training is bit-identical to a run without the callback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from gradwatch import load_report
from tests.integrations.distributed.launch import SCRIPTS, Launch, agreed, run_job, torchrun

pytestmark = [pytest.mark.torch, pytest.mark.slow]

SCRIPT = "lightning_ddp.py"
CLIP = 0.05


def lightning_launch(*args: str, timeout: float = 180) -> Launch:
    """``python lightning_ddp.py args``: Lightning itself starts rank 1; a hang fails the test."""
    return run_job([sys.executable, str(SCRIPTS / SCRIPT), *args], timeout=timeout, clean_env=True)


def _agreed(launch: Launch, launched_by: str) -> dict[str, Any]:
    """`agreed` on steps, step links and both hashes too, launched by `launched_by`, the
    check run on the module inside DDP."""
    first = agreed(launch, "steps", "step_links", "hash", "plain_hash")
    assert first["launched_by"] == launch.results[1]["launched_by"] == launched_by
    assert first["wrapper"] == "DistributedDataParallel"  # the check ran on the module inside
    return first


def _written(report: Path) -> list[str]:
    return sorted(p.name for p in report.iterdir() if not p.name.startswith("."))


def test_a_correct_module_is_quiet_and_training_is_bit_identical(tmp_path: Path) -> None:
    """torchrun, accumulate_grad_batches=2 and gradient_clip_val: the step link holds."""
    report = tmp_path / "report"
    launch = torchrun(
        SCRIPT,
        *("--root", str(tmp_path), "--report", str(report), "--plain-first"),
        *("--accumulate", "2", "--clip", str(CLIP)),
    )
    watched = _agreed(launch, "torchrun")
    assert watched["hash"] == watched["plain_hash"]  # the same fit without the callback
    assert watched["steps"] == [0, 2, 4]
    assert watched["statuses"] == ["ok", "ok", "ok"]
    assert all(ratio < 1e-8 for ratio in watched["ratios"])
    assert all(link < 1e-6 for link in watched["step_links"])
    # Lightning clipped every update, after the check: .grad was compared unclipped
    assert all(norm > CLIP for norm in watched["grad_norms"])
    assert watched["clip_factors"] == [1.0, 1.0, 1.0]
    assert _written(report) == ["checks.jsonl", "report.json"]
    checks = load_report(report).checks
    assert [r.step for r in checks] == [0, 2, 4]
    assert any("mean of 2 ranks' losses" in note for note in checks[0].notes)


def test_a_planted_bug_is_caught_and_named_identically_on_both_ranks(tmp_path: Path) -> None:
    """python script.py: Lightning's "ddp" strategy launches rank 1 itself."""
    report = tmp_path / "report"
    root = tmp_path / "root"
    result = _agreed(
        lightning_launch("--root", str(root), "--report", str(report), "--bug"), "lightning"
    )
    assert result["statuses"] == ["fail", "fail", "fail"]
    assert result["alerts"] == [["head_bias"]] * 3
    assert all(ratio > 1e-2 for ratio in result["ratios"])
    assert all(link < 1e-6 for link in result["step_links"])  # .grad is what backprop gave
    assert _written(report) == ["checks.jsonl", "report.json"]
    assert [r.status for r in load_report(report).checks] == ["fail"] * 3
    assert not (root / "gradwatch").exists()  # no rank wrote to the default place
