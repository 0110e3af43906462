"""DDP started by torch.multiprocessing.spawn (no RANK variable): rank 0 of the group writes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from gradwatch import load_report
from tests.integrations.distributed.launch import SCRIPTS, run_job

pytestmark = [pytest.mark.torch, pytest.mark.slow]


def test_mp_spawn_ddp_writes_one_report_from_rank_0(tmp_path: Path) -> None:
    """Both ranks check and agree; the one report holds rank 0's checks only, nothing crashes."""
    report = tmp_path / "report"
    launch = run_job(
        [sys.executable, str(SCRIPTS / "mp_spawn_loop.py"), "--report", str(report)],
        clean_env=True,
    )
    assert launch.returncode == 0, launch.output[-3000:]
    assert "ReportInUseError" not in launch.output
    first, second = launch.results[0], launch.results[1]
    assert first["statuses"] == second["statuses"] == ["ok", "ok"]
    assert first["ratios"] == second["ratios"]
    assert (first["writer"], second["writer"]) == (True, False)
    loaded = load_report(report)
    assert loaded.steps == [0, 2]
    assert [run.pid for run in loaded.runs] == [first["pid"]]
