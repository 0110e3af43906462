"""Run a test script as a multi-process job on CPU (gloo) and read each rank's ``RESULT`` line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCRIPTS = Path(__file__).resolve().parent


@dataclass
class Launch:
    returncode: int
    output: str
    results: dict[int, dict[str, Any]]
    """Each rank's ``RESULT`` json, by rank."""


VERDICTS = ("statuses", "ratios", "alerts", "worst")
"""What every rank of a job must agree on: each check's status, ratio, alert, worst components."""


def agreed(launch: Launch, *keys: str) -> dict[str, Any]:
    """Rank 0's result, once both ranks returned and agree on the verdicts and on `keys`, and
    rank 0 alone wrote the report."""
    assert launch.returncode == 0, launch.output[-3000:]
    assert sorted(launch.results) == [0, 1], launch.output[-3000:]
    first, second = launch.results[0], launch.results[1]
    for key in (*VERDICTS, *keys):
        assert first[key] == second[key], key
    assert (first["writer"], second["writer"]) == (True, False)
    return first


def run_job(command: Sequence[str], *, timeout: float = 180, clean_env: bool = False) -> Launch:
    """Run ``command`` (a launcher and its ranks) in its own session; a hang fails the test.

    At ``timeout`` the whole session is killed, ranks included (not only the launcher),
    and ``subprocess.TimeoutExpired`` is raised. ``clean_env`` drops the launcher
    variables, for a script that starts its own ranks (Lightning).
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if clean_env:
        for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(name, None)
    job = subprocess.Popen(
        list(command),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        stdout, stderr = job.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        job.communicate()
        raise
    results: dict[int, dict[str, Any]] = {}
    for line in stdout.replace("RESULT ", "\nRESULT ").splitlines():  # ranks may share a line
        if line.startswith("RESULT "):
            result = json.loads(line.removeprefix("RESULT "))
            results[int(result["rank"])] = result
    return Launch(job.returncode, stdout + stderr, results)


def torchrun(
    script: str,
    *args: str,
    ranks: int = 2,
    timeout: float = 180,
    launcher: Sequence[str] = (),
) -> Launch:
    """``torchrun --standalone --nproc_per_node ranks [launcher] script args`` (see `run_job`)."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={ranks}",
        *launcher,
        str(SCRIPTS / script),
        *args,
    ]
    return run_job(command, timeout=timeout)
