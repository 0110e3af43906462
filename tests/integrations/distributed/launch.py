"""Run a test script under torchrun on CPU (gloo) and read each rank's ``RESULT`` line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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


def torchrun(script: str, *args: str, ranks: int = 2, timeout: float = 180) -> Launch:
    """``torchrun --standalone --nproc_per_node ranks script args``; a hang fails the test.

    ``subprocess.run`` kills the job at ``timeout`` and raises ``TimeoutExpired``, so no
    test waits longer than that for a rank that never returns.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={ranks}",
        str(SCRIPTS / script),
        *args,
    ]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, env=env, check=False
    )
    output = done.stdout + done.stderr
    results: dict[int, dict[str, Any]] = {}
    for line in done.stdout.replace("RESULT ", "\nRESULT ").splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line.removeprefix("RESULT "))
            results[int(result["rank"])] = result
    return Launch(done.returncode, output, results)
