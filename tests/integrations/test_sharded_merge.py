"""Merging the ranks' checks of their FSDP2 shards into one result over the full tensors."""

from __future__ import annotations

import pytest

from gradwatch.result import CheckResult, Component, TensorResult

pytest.importorskip("torch")
from gradwatch.integrations._parallel.merge import merge_shard_results


def _shard_result(status: str, ratio: float, rows: int, component: Component) -> CheckResult:
    tensor = TensorResult(
        ratio=ratio, checked=rows * 3, size=rows * 3, max_abs_error=ratio, status=status
    )
    return CheckResult(
        ratio=ratio,
        status=status,
        tensors={"w": tensor},
        worst=[component],
        eps=1e-3,
        eps_policy="dtype",
        checked=rows * 3,
        size=rows * 3,
        loss=1.5,
        loss_evals=2 * rows * 3,
        seconds=0.5,
        regularization={},
        dtype="float32",
        notes=[f"note {status}"],
    )


def _component(row: int, rel_error: float) -> Component:
    return Component(
        tensor="w",
        index=[row, 2],
        name=f"w[{row}, 2]",
        analytic=1.0,
        numeric=1.0 + rel_error,
        abs_error=rel_error,
        rel_error=rel_error,
    )


def test_shard_indices_become_full_indices_and_the_worse_shard_sets_the_verdict() -> None:
    # w is 5 x 3, sharded in chunks of 3 rows: rank 0 holds rows 0..2, rank 1 rows 3..4.
    rank0 = _shard_result("ok", 1e-7, 3, _component(1, 1e-7))
    rank1 = _shard_result("fail", 0.25, 2, _component(1, 0.5))
    merged = merge_shard_results([(rank0, {"w": 0}), (rank1, {"w": 3})], {"w": (5, 3)}, 2)
    assert merged.status == "fail" and merged.ratio == 0.25
    assert merged.size == 15 and merged.checked == 15 and merged.loss_evals == 30
    w = merged.tensors["w"]
    assert (w.status, w.ratio, w.checked, w.size) == ("fail", 0.25, 15, 15)
    assert [c.name for c in merged.worst] == ["w[4, 2]"]  # local row 1 of rank 1 is row 4
    assert merged.worst[0].index == [4, 2]
    assert merged.notes[0].startswith("FSDP2: checked in place in float32, each of 2 ranks'")
    assert merged.notes[1:] == ["note fail", "note ok"]
