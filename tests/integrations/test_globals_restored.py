"""A loss that changes a process-wide torch setting inside a check leaves no trace (issue 27).

Each test's loss flips one setting on its first call; after ``check_module`` the
setting is what it was before the check (and the check itself still ran).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from gradwatch.integrations.torch import check_module

pytestmark = pytest.mark.torch

Setting = tuple[Callable[[], Any], Callable[[], object], Callable[[Any], object]]
"""(read the setting, change it, put a value back)."""

SETTINGS: dict[str, Setting] = {
    "num_threads": (
        torch.get_num_threads,
        lambda: torch.set_num_threads(torch.get_num_threads() + 1),
        torch.set_num_threads,
    ),
    "use_deterministic_algorithms": (
        lambda: (
            torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(),
        ),
        lambda: torch.use_deterministic_algorithms(True, warn_only=True),
        lambda value: torch.use_deterministic_algorithms(value[0], warn_only=value[1]),
    ),
    "set_detect_anomaly": (
        lambda: (torch.is_anomaly_enabled(), torch.is_anomaly_check_nan_enabled()),
        lambda: torch.autograd.set_detect_anomaly(True, check_nan=False),
        lambda value: torch.autograd.set_detect_anomaly(value[0], check_nan=value[1]),
    ),
    "set_float32_matmul_precision": (
        torch.get_float32_matmul_precision,
        lambda: torch.set_float32_matmul_precision("medium"),
        torch.set_float32_matmul_precision,
    ),
    "set_default_dtype": (
        torch.get_default_dtype,
        lambda: torch.set_default_dtype(torch.float16),
        torch.set_default_dtype,
    ),
    "set_grad_enabled": (
        torch.is_grad_enabled,
        lambda: torch.set_grad_enabled(False),
        torch.set_grad_enabled,
    ),
    "cudnn.benchmark": (
        lambda: torch.backends.cudnn.benchmark,
        lambda: setattr(torch.backends.cudnn, "benchmark", True),
        lambda value: setattr(torch.backends.cudnn, "benchmark", value),
    ),
    "cudnn.deterministic": (
        lambda: torch.backends.cudnn.deterministic,
        lambda: setattr(torch.backends.cudnn, "deterministic", True),
        lambda value: setattr(torch.backends.cudnn, "deterministic", value),
    ),
    "mkldnn.enabled": (
        lambda: torch.backends.mkldnn.enabled,
        lambda: setattr(torch.backends.mkldnn, "enabled", False),
        lambda value: setattr(torch.backends.mkldnn, "enabled", value),
    ),
}


@pytest.fixture(params=list(SETTINGS), ids=list(SETTINGS))
def setting(request: pytest.FixtureRequest) -> Iterator[Setting]:
    """One setting, put back after the test whatever happens."""
    read, change, put = SETTINGS[request.param]
    before = read()
    yield read, change, put
    put(before)


def test_a_setting_the_loss_changes_is_put_back(setting: Setting) -> None:
    """The setting after check_module is the one before it, though the loss changed it."""
    read, change, _ = setting
    model = torch.nn.Linear(3, 2)
    x = torch.randn(4, 3)
    calls = 0

    def loss_fn(module: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls == 1:
            change()
        return module(batch).square().mean()

    before = read()
    result = check_module(model, loss_fn, x, batched=False)
    assert calls > 1
    assert result.status in ("ok", "warn", "fail", "nondeterministic")
    assert read() == before
