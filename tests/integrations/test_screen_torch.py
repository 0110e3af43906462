"""Issue 12 on torch: a 0-d nn.Parameter under auto, a failing 30k-parameter GPT-2's cost."""

from __future__ import annotations

import pytest
import torch
from gradwatch.integrations.torch import check_module
from torch import nn

from gradwatch.check import most_evaluations


class Scaled(nn.Module):
    """An MLP whose output is multiplied by a learnable 0-d scale (CLIP's logit_scale)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(50, 50), nn.Tanh(), nn.Linear(50, 1))
        self.logit_scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).squeeze(-1) * self.logit_scale


def _loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model(batch).pow(2).mean()


def test_a_zero_d_parameter_is_screened_under_auto() -> None:
    """A model above the full-check size with a 0-d parameter is checked by the screen."""
    torch.manual_seed(0)
    model = Scaled()
    result = check_module(model, _loss, torch.randn(8, 50), sample="auto")
    assert (result.status, result.mode, result.loss_evals) == ("ok", "directional", 6)
    assert result.tensors["logit_scale"].size == 1
    assert float(model.logit_scale.detach()) == 2.0


@pytest.mark.parametrize("bug", ["entry", "gelu"])
def test_a_failing_gpt2_check_is_bounded_and_localized(bug: str) -> None:
    """A 29k-parameter GPT-2 with a planted bug, per-tensor ratios asked for: at most 400
    evaluations, the bug's tensor named."""
    pytest.importorskip("transformers")
    from benchmarks.failing_check import PLANTED_ENTRY, build, loss_fn

    model, ids = build(bug)
    result = check_module(model, loss_fn, ids, sample="auto", per_tensor=True)
    assert result.status == "fail"
    assert result.loss_evals <= 400
    failing = {n for n, t in result.tensors.items() if t.status == "fail"}
    if bug == "entry":
        assert failing == {"transformer.h.1.mlp.c_proj.weight"}
        assert result.worst[0].index == list(PLANTED_ENTRY)
        assert result.worst[0].diagnosis == "bug"
    else:  # every tensor upstream of block 0's MLP activation is wrong, none after it
        assert "transformer.h.0.mlp.c_fc.weight" in failing
        assert not any(name.startswith("transformer.h.1") for name in failing)


def test_the_failing_gpt2_check_stays_within_most_evaluations() -> None:
    """The planted-activation GPT-2, per-tensor ratios asked for, spends no more than the
    documented bound."""
    pytest.importorskip("transformers")
    from benchmarks.failing_check import build, loss_fn

    model, ids = build("gelu")
    result = check_module(model, loss_fn, ids, sample="auto", per_tensor=True)
    assert result.loss_evals <= most_evaluations(result.size, len(result.tensors)) == 322
