"""Distributed checks: 2 ranks under torchrun on CPU (gloo), a plain DDP loop.

A check is collective: every rank checks J = the mean of the ranks' losses on the same
components, reaches the same verdict and names the same tensor; only rank 0 writes;
a rank whose part of a check raises, or dies, never leaves its peers hanging; and
training ends bit-identical to a run without gradwatch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from gradwatch import load_report
from tests.integrations.distributed.launch import Launch, agreed, torchrun

pytestmark = [pytest.mark.torch, pytest.mark.slow]


def _agreed(launch: Launch, *, keys: tuple[str, ...] = ("step_links", "hash")) -> dict[str, Any]:
    """`agreed` on the step links and the trained weights' hash too."""
    return agreed(launch, *keys)


def test_a_correct_ddp_loop_is_quiet_and_training_is_unchanged(tmp_path: Path) -> None:
    report = tmp_path / "report"
    watched = _agreed(torchrun("ddp_loop.py", "--report", str(report)))
    plain = torchrun("ddp_loop.py", "--no-watch")
    assert plain.returncode == 0, plain.output[-3000:]
    assert watched["statuses"] == ["ok", "ok", "ok"]
    assert all(ratio < 1e-8 for ratio in watched["ratios"])
    assert all(link < 1e-6 for link in watched["step_links"])
    assert watched["hash"] == plain.results[0]["hash"] == plain.results[1]["hash"]
    loaded = load_report(report)
    assert [r.step for r in loaded.checks] == [0, 2, 4]
    assert any("mean of 2 ranks' losses" in note for note in loaded.checks[0].notes)
    assert sorted(p.name for p in report.iterdir() if not p.name.startswith(".")) == [
        "checks.jsonl",
        "report.json",
    ]


def test_a_planted_bug_is_caught_and_named_identically_on_every_rank(tmp_path: Path) -> None:
    result = _agreed(torchrun("ddp_loop.py", "--bug", "--report", str(tmp_path / "r")))
    assert result["statuses"] == ["fail", "fail", "fail"]
    assert result["alerts"] == [["head_bias"]] * 3


def test_a_collective_in_the_forward_never_hangs_and_is_checked(tmp_path: Path) -> None:
    clean = _agreed(torchrun("ddp_loop.py", "--collective"))
    plain = torchrun("ddp_loop.py", "--collective", "--no-watch")
    assert clean["statuses"] == ["ok", "ok", "ok"]
    assert clean["hash"] == plain.results[0]["hash"]
    buggy = _agreed(torchrun("ddp_loop.py", "--collective", "--bug"))
    assert buggy["statuses"] == ["fail", "fail", "fail"]
    assert buggy["alerts"] == [["head_bias"]] * 3


def test_a_rank_whose_check_raises_is_an_error_on_rank_0_and_training_goes_on(
    tmp_path: Path,
) -> None:
    report = tmp_path / "report"
    launch = torchrun("ddp_loop.py", "--fail-rank", "1", "--report", str(report))
    result = _agreed(launch)
    assert result["statuses"] == ["error", "error", "error"]
    assert "rank 1" in str(result["errors"])
    assert "planted failure on rank 1" in str(result["errors"])
    plain = torchrun("ddp_loop.py", "--no-watch")
    assert result["hash"] == plain.results[0]["hash"]
    on_disk = load_report(report).checks
    assert [r.status for r in on_disk] == ["error"] * 3
    assert "planted failure on rank 1" in (on_disk[0].error or "")


def test_a_parameter_only_one_rank_uses_is_checked_without_hanging() -> None:
    """An MoE expert no token of rank 1's batch reached: its gradient is rank 0's / 2."""
    result = _agreed(torchrun("ddp_loop.py", "--expert-rank", "0"))
    assert result["statuses"] == ["ok", "ok", "ok"]
    assert all(ratio < 1e-8 for ratio in result["ratios"])
    assert all(link < 1e-6 for link in result["step_links"])


def test_a_rank_that_dies_in_a_check_fails_the_job_instead_of_hanging() -> None:
    """Rank 1 exits inside a check: rank 0 raises ProcessGroupError itself (no hang)."""
    # torchrun's agent SIGTERMs the surviving rank within its monitor interval (0.1 s)
    # of a rank's exit, racing rank 0's own error (seen flaky before this change too): a
    # longer interval lets the test see what rank 0 does when no launcher kills it.
    launch = torchrun(
        "ddp_loop.py", "--die-rank", "1", timeout=120, launcher=("--monitor-interval=5",)
    )
    assert launch.returncode != 0
    assert "ProcessGroupError" in launch.output
    assert 0 not in launch.results  # rank 0 did not go on training alone


def test_on_alert_raise_stops_every_rank_at_the_same_step() -> None:
    launch = torchrun("ddp_loop.py", "--bug", "--raise-alert")
    assert launch.returncode == 0, launch.output[-3000:]
    assert launch.results[0]["stopped"] == launch.results[1]["stopped"] == "step 0: fail"


def test_a_budget_decides_the_same_check_on_every_rank(tmp_path: Path) -> None:
    launch = torchrun("ddp_loop.py", "--budget", "0.02", "--steps", "10", "--every", "1")
    result = _agreed(launch)
    assert result["statuses"], "no check ran"
    assert set(result["statuses"]) == {"ok"}


def test_logs_say_which_rank_they_come_from() -> None:
    launch = torchrun("ddp_loop.py", "--steps", "1", "--bug")  # a failed check logs a warning
    lines = [line for line in launch.output.splitlines() if "gradient_check " in line]
    assert sorted(line.rsplit("rank=", 1)[1] for line in lines) == ["0", "1"], json.dumps(lines)


# --------------------------------------------------------------------------- FSDP2


def test_fsdp2_is_checked_in_place_quiet_when_correct_and_training_is_unchanged(
    tmp_path: Path,
) -> None:
    report = tmp_path / "report"
    watched = torchrun("fsdp_loop.py", "--report", str(report))
    plain = torchrun("fsdp_loop.py", "--no-watch")
    result = _sharded_agreed(watched)
    assert result["statuses"] == ["ok", "ok"]
    assert result["dtype"] == ["float32", "float32"]
    for rank in (0, 1):  # each rank's shards and optimizer state, bit for bit
        assert watched.results[rank]["hash"] == plain.results[rank]["hash"]
    checks = load_report(report).checks
    assert [c.size for c in checks] == [227, 227]  # the full model, not a shard
    assert checks[0].tensors["blocks.1.linear.weight"].size == 64
    # A clean check is one joint screen over every rank's shards: its cost does not grow
    # with the ranks (2 directions, 2 evaluations each, J(theta) twice).
    assert [(c.mode, c.loss_evals) for c in checks] == [("directional", 6)] * 2
    assert "every rank's shards moved along one joint direction" in checks[0].notes[0]


def test_fsdp2_planted_bug_is_localized_shard_by_shard_and_named_on_every_rank(
    tmp_path: Path,
) -> None:
    report = tmp_path / "report"
    result = _sharded_agreed(torchrun("fsdp_loop.py", "--bug", "--report", str(report)))
    assert result["statuses"] == ["fail", "fail"]
    assert result["alerts"] == [["blocks.1.linear.weight"]] * 2
    check = load_report(report).checks[0]
    tensor = check.tensors["blocks.1.linear.weight"]
    assert (tensor.size, tensor.checked) == (64, 64)  # both ranks' rows, in turn
    assert "each of 2 ranks' shards in turn" in check.notes[0]
    assert any("the joint screen over every rank's shards fired" in n for n in check.notes)


def test_fsdp2_a_loss_fn_that_pops_from_its_batch_gets_a_fresh_one_every_evaluation() -> None:
    result = _sharded_agreed(torchrun("fsdp_loop.py", "--dict-batch", "--bug"))
    assert result["statuses"] == ["fail", "fail"]  # the joint screen and the turns both ran
    assert result["alerts"] == [["blocks.1.linear.weight"]] * 2


def test_fsdp2_a_rank_whose_check_raises_is_recorded_and_training_goes_on() -> None:
    launch = torchrun("fsdp_loop.py", "--fail-rank", "1")
    plain = torchrun("fsdp_loop.py", "--no-watch")
    result = _sharded_agreed(launch)
    assert result["statuses"] == ["error", "error"]
    assert "planted failure on rank 1" in str(result["errors"])
    assert launch.results[1]["hash"] == plain.results[1]["hash"]


def _sharded_agreed(launch: Launch) -> dict[str, Any]:
    """`_agreed` for FSDP2 runs: each rank's shards (and so its hash) are its own."""
    return _agreed(launch, keys=("sizes", "checked"))


def test_the_ddp_example_alerts_on_every_rank_with_bug_and_is_quiet_without(
    tmp_path: Path,
) -> None:
    from tests.integrations.distributed.launch import SCRIPTS

    example = SCRIPTS.parents[2] / "examples" / "ddp.py"
    buggy = torchrun(str(example), "--bug", "--steps", "11", "--report-dir", str(tmp_path / "b"))
    assert buggy.returncode != 0  # every rank exits 1 on an alert
    assert "2 alert(s)" in buggy.output
    alerts = load_report(tmp_path / "b").alerts
    assert [a.tensor for a in alerts] == ["hidden.weight", "hidden.weight"]
    clean = torchrun(str(example), "--steps", "11", "--report-dir", str(tmp_path / "c"))
    assert clean.returncode == 0, clean.output[-3000:]
    assert "no alert" in clean.output
