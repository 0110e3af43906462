"""Real `transformers` architectures trained by the real Trainer with GradWatch at defaults.

The models and planted bugs are those of ``python -m benchmarks.architectures``
(`benchmarks.hf_models`, `benchmarks.hf_bugs`): tiny configs built in code, synthetic
data with padding, dropout at the configs' defaults, nothing downloaded.
"""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from gradwatch.integrations.transformers import GradWatch  # noqa: E402

from benchmarks.architectures import blamed_tensor, train  # noqa: E402
from benchmarks.hf_bugs import BUGS, gradient_errors, points_at, under  # noqa: E402
from benchmarks.hf_models import ARCHITECTURES, parameter_count  # noqa: E402

pytestmark = pytest.mark.torch

REPRESENTATIVE = ["gpt2", "llama", "t5", "mixtral", "bert-mlm"]
"""Causal LM with tied embeddings, RMSNorm, seq2seq, mixture of experts, tied masked LM."""


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_architecture_is_tiny_and_computes_its_loss(name: str) -> None:
    """Each swept model has 10k-60k parameters and a finite loss on its padded examples."""
    model, data = ARCHITECTURES[name].build()
    batch = {key: torch.stack([data[i][key] for i in range(4)]) for key in data[0]}
    assert 10_000 <= parameter_count(model) <= 60_000
    assert math.isfinite(model(**batch).loss.item())


@pytest.mark.parametrize("name", sorted(BUGS))
def test_planted_bug_changes_the_backward_not_the_forward(name: str) -> None:
    """Against autograd on the unmodified model, the loss is equal and the bug's module
    holds the most wrong gradient."""
    bug = BUGS[name]
    loss_difference, errors = gradient_errors(bug)
    worst = max(errors, key=errors.__getitem__)
    assert loss_difference < 1e-12
    assert under(worst, bug.module), (worst, errors[worst])
    assert errors[worst] > 1e-2


@pytest.mark.slow
@pytest.mark.parametrize("name", REPRESENTATIVE)
def test_training_has_no_false_alarm(name: str) -> None:
    """Two Trainer steps with GradWatch(every=1) finish, and neither check fails or errors."""
    model, data = ARCHITECTURES[name].build()
    watch = GradWatch(every=1)
    run = train(model, data, steps=2, seed=0, callback=watch)
    assert run.crash is None
    assert run.steps_done == 2
    assert [r.step for r in watch.results] == [0, 1]
    assert [r.status for r in watch.results if r.status in ("fail", "error")] == [], [
        (r.status, r.ratio, blamed_tensor(watch, r)) for r in watch.results
    ]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BUGS))
def test_planted_bug_is_caught_at_step_0_and_named(name: str) -> None:
    """The step-0 check of a planted bug fails, and its alert names the planted module (or
    the module that owns the planted tensor)."""
    bug = BUGS[name]
    model, data = bug.build()
    watch = GradWatch(every=1)
    run = train(model, data, steps=1, seed=0, callback=watch)
    assert run.crash is None
    (result,) = watch.results
    assert (result.step, result.status) == (0, "fail"), result.ratio
    assert points_at(blamed_tensor(watch, result), bug.module), blamed_tensor(watch, result)
