"""Seams decided by types and dtypes, never by the words of another library's messages."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import torch
else:
    torch = pytest.importorskip("torch")

import torch.distributed as dist
from gradwatch.integrations._parallel.ranks import Ranks
from gradwatch.integrations._shadow.mode import ShadowMode

from gradwatch.errors import GradwatchError, PeerCheckError
from gradwatch.watch.recording import writer_rank

pytestmark = pytest.mark.torch

_LIBRARY = torch.library.Library("gradwatch_seams", "DEF")
_LIBRARY.define("twice(Tensor x) -> Tensor")


def _twice(x: torch.Tensor) -> torch.Tensor:
    """An op without a float64 kernel whose error says nothing about dtypes."""
    if x.dtype == torch.float64:
        raise RuntimeError("this backend cannot run it")
    return x * 2


_LIBRARY.impl("twice", _twice, "CompositeExplicitAutograd")


def test_an_op_without_a_float64_kernel_runs_in_float32_whatever_its_message() -> None:
    """The fallback follows the dtypes: the same call on float32 copies runs, so it is used."""
    x = torch.tensor([1.5, -2.0], dtype=torch.float64)
    mode = ShadowMode(torch.float64)
    with mode:
        y = torch.ops.gradwatch_seams.twice(x)
    assert y.dtype == torch.float64 and y.tolist() == [3.0, -4.0]
    assert mode.fallback_ops and "twice" in mode.fallback_ops[0]


def test_an_error_that_float32_repeats_is_raised_as_it_was() -> None:
    """A shape error is no dtype's fault: the float64 call's own error reaches the caller."""
    a, b = torch.ones(2, 3, dtype=torch.float64), torch.ones(2, 3, dtype=torch.float64)
    mode = ShadowMode(torch.float64)
    with mode, pytest.raises(RuntimeError, match="cannot be multiplied"):
        torch.mm(a, b)
    assert mode.fallback_ops == []


def test_a_call_that_writes_into_its_arguments_is_never_run_on_copies() -> None:
    """An in-place op refused in float64 is not retried on float32 copies (it would change them)."""
    leaf = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    mode = ShadowMode(torch.float64)
    with mode, pytest.raises(RuntimeError, match="in-place"):
        leaf.add_(1.0)
    assert mode.fallback_ops == [] and float(leaf.detach().abs().sum()) == 0.0


def test_a_peers_failure_is_a_gradwatch_error() -> None:
    """PeerCheckError sits under the one root (and stays importable where it was)."""
    from gradwatch.integrations._parallel import ranks

    assert issubclass(PeerCheckError, GradwatchError) and ranks.PeerCheckError is PeerCheckError


@pytest.fixture
def one_rank_group(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A one-process gloo group (a Ranks object needs one)."""
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_an_agreed_failure_travels_untouched(one_rank_group: None) -> None:
    """A failure every rank was told of leaves the check as it was raised: no flag set on it,
    and nothing of it kept once the check is left."""
    ranks = Ranks()

    def loss() -> float:
        raise ValueError("J cannot be evaluated")

    with pytest.raises(ValueError, match="J cannot be evaluated") as raised, ranks.together():
        ranks.mean_of(loss)
    assert vars(raised.value) == {}
    assert ranks._told == []


def test_a_broken_process_group_leaves_the_launchers_rank(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A process group that raises when asked its rank: the launcher's RANK decides who writes."""

    def broken() -> int:
        raise RuntimeError("the default process group was destroyed")

    fake = SimpleNamespace(is_available=lambda: True, is_initialized=lambda: True, get_rank=broken)
    monkeypatch.setitem(sys.modules, "torch.distributed", fake)
    monkeypatch.setenv("RANK", "3")
    assert writer_rank() == 3
