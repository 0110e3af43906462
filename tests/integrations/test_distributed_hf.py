"""The Hugging Face Trainer under torchrun / accelerate launch: 2 ranks, DDP, gloo, CPU.

Every rank checks at the same steps and reaches the same verdict; only rank 0 writes
the report; the step link holds on a correct run, whether the Trainer clipped
(the factor then measured) or not, for a causal LM (``num_items_in_batch`` summed over
the ranks, the loss times the world size) and a sequence classifier; a planted
backward bug is named identically on both ranks; training is bit-identical to a run
without the callback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from gradwatch import load_report
from tests.integrations.distributed.launch import SCRIPTS, Launch, agreed, run_job, torchrun

pytestmark = [pytest.mark.torch, pytest.mark.slow]


def _agreed(launch: Launch) -> dict[str, Any]:
    """`agreed` on steps, step links and the weights' hash too, the model wrapped in DDP."""
    first = agreed(launch, "steps", "step_links", "hash")
    assert first["ddp"] == "DistributedDataParallel"
    return first


def _quiet(result: dict[str, Any]) -> None:
    assert result["steps"] == [0, 2]
    assert result["statuses"] == ["ok", "ok"], result["errors"]
    assert all(ratio < 1e-6 for ratio in result["ratios"]), result["ratios"]
    assert all(link < 1e-6 for link in result["step_links"]), result["step_links"]
    assert all(abs(scale - 1) < 1e-6 for scale in result["step_scales"])


def test_a_correct_causal_lm_is_quiet_and_training_is_unchanged(tmp_path: Path) -> None:
    """Clipped by the Trainer (max_grad_norm=1.0): the clip factor is measured. Then the
    same training in the same processes without the callback: the same bits."""
    launch = torchrun("hf_trainer.py", "--output", str(tmp_path), "--also-plain")
    result = _agreed(launch)
    _quiet(result)
    assert all(factor < 0.99 for factor in result["clip_factors"])  # clipped, measured
    assert result["hash"] == result["plain_hash"] == launch.results[1]["plain_hash"]
    assert result["losses"] == result["plain_losses"] and len(result["losses"]) == 4
    # one report, written by rank 0 alone: one line per check, not one per rank
    report = tmp_path / "gradwatch"
    assert len((report / "checks.jsonl").read_text().splitlines()) == 2
    loaded = load_report(report)
    assert [r.step for r in loaded.checks] == [0, 2]
    assert any("mean of 2 ranks' losses" in note for note in loaded.checks[0].notes)
    assert not (tmp_path / "plain" / "gradwatch").exists()


def test_the_step_link_of_an_unclipped_causal_lm_holds_with_accumulation(tmp_path: Path) -> None:
    """num_items_in_batch summed over ranks and micro-batches, the loss times the world
    size: J does the same, so the step link holds at its true scale (no clip to measure)."""
    launch = torchrun(
        "hf_trainer.py", "--output", str(tmp_path), "--accumulation", "2", "--max-grad-norm", "0"
    )
    result = _agreed(launch)
    _quiet(result)
    assert result["clip_factors"] == [1.0, 1.0]


def test_a_planted_bug_is_caught_and_named_identically_on_both_ranks(tmp_path: Path) -> None:
    launch = torchrun("hf_trainer.py", "--output", str(tmp_path), "--model", "bert", "--bug")
    result = _agreed(launch)
    assert result["statuses"] == ["fail", "fail"]
    assert result["alerts"][0] == ["bert.encoder.layer.1.output.LayerNorm.weight"]
    assert result["worst"][0].startswith("bert.encoder.layer.1.output.LayerNorm.weight")
    assert all(link < 1e-6 for link in result["step_links"])  # .grad is the bug's gradient
    assert [c.status for c in load_report(tmp_path / "gradwatch").checks] == ["fail", "fail"]


def test_accelerate_launch_a_correct_sequence_classifier_is_quiet(tmp_path: Path) -> None:
    """``accelerate launch --multi_gpu --num_processes 2``, no config file (the script asks
    for the CPU and gloo; ``--cpu --num_processes 2`` would need accelerate's MPI launcher).
    The classifier's loss ignores num_items_in_batch: the Trainer trains on the world size
    times its mean loss, and J is that (unclipped here: the scale is checked)."""
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        *("--num_processes", "2", "--num_machines", "1"),
        *("--mixed_precision", "no", "--dynamo_backend", "no"),
        str(SCRIPTS / "hf_trainer.py"),
        *("--output", str(tmp_path), "--model", "bert"),
    ]
    result = _agreed(run_job(command))
    _quiet(result)
    assert result["clip_factors"] == [1.0, 1.0]  # gradient norm below max_grad_norm
    assert len((tmp_path / "gradwatch" / "checks.jsonl").read_text().splitlines()) == 2
