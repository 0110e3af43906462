"""Parallel wrappers in one process: DDP is looked through, sharding wrappers refused."""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
from gradwatch.integrations.torch import after_backward, check_module  # noqa: E402
from torch import Tensor, nn  # noqa: E402

import gradwatch  # noqa: E402


@pytest.fixture
def one_rank_group(tmp_path: Path) -> Iterator[None]:
    """A gloo process group of one rank (DDP needs one), destroyed afterwards."""
    dist.init_process_group(
        "gloo",
        init_method=f"file://{tmp_path / 'store'}",
        rank=0,
        world_size=1,
        timeout=datetime.timedelta(seconds=30),
    )
    yield
    dist.destroy_process_group()


def _loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def test_ddp_is_checked_through_its_module_under_the_module_s_names(one_rank_group: None) -> None:
    torch.manual_seed(0)
    ddp = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(3, 4), nn.Tanh()))
    batch = (torch.randn(5, 3), torch.randn(5, 4))
    result = check_module(ddp, _loss, batch)
    assert result.status == "ok"
    assert list(result.tensors) == ["0.weight", "0.bias"]  # not "module.0.weight"


def test_a_partitioned_parameter_is_an_error_check_and_training_goes_on() -> None:
    model = nn.Linear(3, 2)
    model.weight.ds_id = 7  # type: ignore[attr-defined]  # how DeepSpeed ZeRO-3 marks its own
    batch = (torch.randn(4, 3), torch.randn(4, 2))
    before = [p.detach().clone() for p in model.parameters()]
    with gradwatch.GradWatch(every=1, report_dir=None) as watch:
        result = after_backward(watch, 0, model, _loss, batch)
    assert result is not None and result.status == "error"
    assert "DeepSpeed ZeRO or FSDP1" in (result.error or "")
    assert "'Distributed training' table" in (result.error or "")
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
