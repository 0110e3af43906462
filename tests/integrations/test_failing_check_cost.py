"""A failing torch check costs a few evaluations of J plus the module search (issue 24).

The fired screen is confirmed along fresh directions instead of two evaluations of J per
tensor, and the search never checks a backbone presumed to fail when a module inside it
fails. Oracles: the planted bug's module, and the screen's evaluation count formula.
"""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from gradwatch.integrations.torch import check_module

from benchmarks.local_bugs import LOCAL_BUGS, model_loss
from gradwatch.engine.sampling import screen_directions

pytestmark = pytest.mark.torch


def test_a_failing_check_confirms_the_screen_and_lets_the_search_name_the_module() -> None:
    """GPT-2 with a wrong GELU backward: 2 probes + two screens of J, no per-tensor ratio,
    the planted module named, the backbone (99% of the calls) never checked on its own."""
    bug = LOCAL_BUGS["gpt2-gelu"]
    model, batch = bug.build()
    tensors = sum(1 for p in model.parameters() if p.requires_grad)
    result = check_module(model, model_loss, batch, sample="auto")
    assert result.status == "fail"
    assert result.tensors == {}
    assert result.loss_evals == 2 + 2 * 2 * screen_directions(tensors)
    assert result.localization is not None
    assert [s.module for s in result.localization.suspects] == [bug.expected]
    checked = {verdict.module for verdict in result.localization.modules}
    assert "transformer" not in checked and "" not in checked
    assert "lm_head" in checked  # the head beside the backbone is checked first


def test_per_tensor_true_still_measures_every_tensor() -> None:
    """Asked for, per-tensor ratios are measured as before and the search names the same module."""
    bug = LOCAL_BUGS["gpt2-gelu"]
    model, batch = bug.build()
    tensors = sum(1 for p in model.parameters() if p.requires_grad)
    result = check_module(
        model, model_loss, batch, sample="auto", per_tensor=True, localize_evaluations=0
    )
    assert result.status == "fail"
    assert len(result.tensors) == tensors
    assert result.loss_evals >= 2 * tensors
    assert result.localization is not None
    assert [s.module for s in result.localization.suspects] == [bug.expected]
