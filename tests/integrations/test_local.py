"""Module-local checks: the failing check names the module where the bug was planted.

The oracle is the planted bug's module (`benchmarks.local_bugs`): tiny `transformers`
models built from configs in code, a batch of 4, nothing downloaded.
"""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import torch
from gradwatch.integrations.torch import (
    check_local,
    check_module,
    check_modules,
)
from torch import nn

from benchmarks.hf_models import ARCHITECTURES
from benchmarks.local_bugs import LOCAL_BUGS, batch_of, model_loss
from gradwatch.errors import OptionError
from tests.integrations.planted import WrongSquare

pytestmark = pytest.mark.torch

FAST_BUGS = ["gpt2-gelu", "resnet-batchnorm", "olmo-layernorm", "llama-detached-attention"]
"""A parameter-free activation, a BatchNorm (parameter order is not forward order), a
norm without affine part, glue code in a parent's forward."""


def _named(bug_name: str) -> tuple[str, Any]:
    bug = LOCAL_BUGS[bug_name]
    model, batch = bug.build()
    result = check_module(model, model_loss, batch, sample="auto")
    assert result.status == "fail"
    assert result.localization is not None
    return bug.expected, result.localization


@pytest.mark.parametrize("name", FAST_BUGS)
def test_a_failing_check_names_the_planted_module(name: str) -> None:
    """check_module's failing result names exactly the module where the bug was planted."""
    expected, localization = _named(name)
    assert [suspect.module for suspect in localization.suspects] == [expected]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(LOCAL_BUGS) - set(FAST_BUGS)))
def test_every_planted_bug_is_named(name: str) -> None:
    """Every planted bug of the catalogue is named at its module (or the parent, for glue)."""
    expected, localization = _named(name)
    assert [suspect.module for suspect in localization.suspects] == [expected]


def test_the_catalogue_covers_what_the_issue_asks() -> None:
    """At least 8 architectures, 3 parameter-free bugs, 2 where parameter order misleads."""
    bugs = LOCAL_BUGS.values()
    assert len({bug.architecture for bug in bugs}) >= 8
    assert sum(bug.parameter_free for bug in bugs) >= 3
    assert sum(bug.order_differs for bug in bugs) >= 2


def test_a_custom_function_activation_is_named_with_its_side() -> None:
    """The GELU suspect is a custom autograd.Function whose input gradient is wrong."""
    _, localization = _named("gpt2-gelu")
    suspect = localization.suspects[0]
    assert (suspect.kind, suspect.side, suspect.functions) == (
        "custom autograd.Function",
        "input",
        ["TanhGELUNoProductRule"],
    )
    assert suspect.class_name == "BuggyTanhGELU"
    assert "input gradient differs" in suspect.describe()


@pytest.mark.parametrize("name", ["gpt2", "llama", "t5", "bert-cls", "mixtral"])
def test_every_module_of_a_correct_model_passes(name: str) -> None:
    """No false suspect: every module call of a correct model passes its local check."""
    model, data = ARCHITECTURES[name].build()
    localization = check_modules(model.train(), model_loss, batch_of(data), scope="all")
    statuses = {verdict.status for verdict in localization.modules}
    assert statuses <= {"ok", "unreached"}
    assert localization.suspects == []


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_every_module_of_every_swept_architecture_passes(name: str) -> None:
    """The whole first sweep: 0 false suspects over every module call of every model."""
    model, data = ARCHITECTURES[name].build()
    localization = check_modules(model.train(), model_loss, batch_of(data), scope="all")
    failing = [v.module for v in localization.modules if v.status not in ("ok", "unreached")]
    assert failing == []


class Square(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return WrongSquare.apply(x)


class ReusedTwice(nn.Module):
    """A shared layer called twice, a kwargs-only call, a dict output, an in-place ReLU."""

    def __init__(self, wrong: bool) -> None:
        super().__init__()
        self.shared = nn.Linear(4, 4)
        self.square: nn.Module = Square() if wrong else nn.Tanh()
        self.relu = nn.ReLU(inplace=True)
        self.norm = nn.BatchNorm1d(4)

    def forward(self, *, x: torch.Tensor) -> dict[str, torch.Tensor]:
        first = self.relu(self.shared(x))
        second = self.shared(self.norm(first))
        return {"out": self.square(second), "index": torch.argmax(second, dim=-1)}


def _loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x=x)["out"].pow(2).sum()


def test_each_call_of_a_reused_module_is_its_own_check() -> None:
    """A module called twice gets two verdicts, a kwargs-only dict-output model passes."""
    model = ReusedTwice(wrong=False).train()
    localization = check_modules(model, _loss, torch.randn(8, 4), scope="all")
    shared = [(v.call, v.calls, v.status) for v in localization.modules if v.module == "shared"]
    assert shared == [(0, 2, "ok"), (1, 2, "ok")]
    assert {v.status for v in localization.modules} <= {"ok", "unreached"}


def test_a_wrong_backward_inside_a_small_model_is_named() -> None:
    """The wrong x^2 backward is named at its module, its input side, not its callers."""
    localization = check_modules(ReusedTwice(wrong=True).train(), _loss, torch.randn(8, 4))
    assert [(s.module, s.side) for s in localization.suspects] == [("square", "input")]


def test_the_model_is_left_as_it_was() -> None:
    """Parameters, BatchNorm running statistics and the RNG state are untouched."""
    model = ReusedTwice(wrong=True).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(8, 4)
    rng = torch.get_rng_state()
    check_modules(model, _loss, x, scope="all")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state())


def test_check_local_on_one_module() -> None:
    """check_local passes a correct module and fails a wrong backward on its input side."""
    assert check_local(nn.Linear(3, 2), torch.randn(4, 3)).status == "ok"
    verdict = check_local(Square(), torch.randn(5))
    assert (verdict.status, verdict.input_failed) == ("fail", True)
    assert verdict.input_ratio is not None and verdict.input_ratio > 0.1


def test_a_max_pool_tie_after_relu_is_not_a_bug() -> None:
    """Exact ties (ReLU zeros pooled) are left out of the test, not reported."""
    model = nn.Sequential(nn.ReLU(), nn.MaxPool2d(2))
    x = torch.randn(2, 3, 8, 8) - 1.0  # most entries 0 after the ReLU: ties in most windows
    verdict = check_local(model, x)
    assert verdict.status in ("ok", "unchecked")
    assert not verdict.input_failed


def test_bad_scope_is_refused() -> None:
    """An unknown scope is an OptionError naming what was expected."""
    with pytest.raises(OptionError, match="scope: expected 'search' or 'all'"):
        check_modules(nn.Linear(2, 2), _loss, torch.randn(1, 2), scope="everything")  # type: ignore[arg-type]


def test_a_wrong_loss_outside_every_module_is_named_as_such() -> None:
    """A hand-written loss backward outside the model: every module passes, the loss is named."""
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))

    def loss_fn(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return WrongSquare.apply(module(x)).sum()

    result = check_module(model, loss_fn, torch.randn(6, 4))
    assert result.status == "fail" and result.localization is not None
    assert [s.kind for s in result.localization.suspects] == ["outside"]
    assert "loss function's own code" in result.localization.suspects[0].describe()
