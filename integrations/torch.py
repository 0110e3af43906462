"""PyTorch modules as gradient-check parameters: a float64 shadow, RNG replay, restore.

``check_module`` checks the gradient of J = ``loss_fn(model, batch)`` (+ penalties)
in *recompute* mode: it never touches ``model``. It deep-copies the model into a
*shadow* (float64 by default) and hands the shadow's parameters to
``gradwatch.check`` as numpy arrays that share memory with the shadow's tensors, so
the core's in-place perturbation of one component is what the shadow's next forward
sees. The analytic gradient is autograd on the shadow, streamed to the check one
tensor at a time (`ShadowGradients`), and moved tensors are restored from the
model's own values: the shadow is the only copy of the parameters a check holds.
Every evaluation of J (and the analytic pass) starts from the same forked state of
the generators J draws from, so dropout draws the same mask every time; afterwards
every global RNG (python, numpy, torch, CUDA) and torch's default dtype are put
back as they were. Where J can be vmapped (no randomness, no BatchNorm in train
mode), the perturbations of each tensor are evaluated in chunks with
``torch.func.vmap`` instead of one forward each.
The model's parameters, ``.grad``, buffers (BatchNorm running stats), train/eval
mode and the optimizer are never written to, so training continues bit for bit as
if no check had run.

Plain PyTorch loop, after ``loss.backward()`` and before ``optimizer.step()``::

    import gradwatch
    from gradwatch.integrations.torch import after_backward

    def loss_fn(model, batch):
        x, y = batch
        return torch.nn.functional.cross_entropy(model(x), y)

    watch = gradwatch.GradWatch(every=500, report_dir="runs/exp1/gradwatch")
    for step, batch in enumerate(loader):
        optimizer.zero_grad()
        loss_fn(model, batch).backward()
        after_backward(watch, step, model, loss_fn, batch, optimizer=optimizer)
        optimizer.step()
    watch.close()

Where the bug is: when a check fails, ``check_module`` searches the model's modules
with module-local checks (``result.localization``: the suspect module, whether its
input or its parameter gradient is wrong). The same checks on demand:
``check_modules(model, loss_fn, batch)`` for every module call of one batch, and
``check_local(module, *inputs)`` for one module.

The framework callbacks (``gradwatch.integrations.transformers`` and
``gradwatch.integrations.lightning``) use the same pieces: `BatchCapture` to see the
batch, `weight_decay_notes`, and `check_due` to run and record a due check.
"""

from __future__ import annotations

try:  # without its framework, say which extra installs it (not a bare ModuleNotFoundError)
    import torch  # noqa: F401
except ImportError as missing:
    raise ImportError(
        f"gradwatch.integrations.torch needs {missing.name or 'torch'}: "
        'pip install "gradwatch[torch]"'
    ) from missing

from typing import TYPE_CHECKING, Any

from gradwatch.integrations._check import Analytic, check_module, weight_decay_notes
from gradwatch.integrations._local.adjoint import LOCAL_THRESHOLD
from gradwatch.integrations._local.blocks import CheckMode
from gradwatch.integrations._local.search import check_local, check_modules
from gradwatch.integrations._shadow.loss import LossFn, Penalties, Penalty
from gradwatch.integrations._shadow.model import (
    NATIVE_DTYPES,
    Precision,
    RngState,
    is_shadow,
    module_gradients,
    trainable_parameters,
)
from gradwatch.integrations._step import MicroBatch
from gradwatch.integrations._training import (
    STATUS_CODES,
    BatchCapture,
    TrainingWatch,
    check_due,
    check_step_notes,
    join_ranks,
    result_metrics,
)
from torch import nn

from gradwatch.result import CheckResult

if TYPE_CHECKING:
    from gradwatch.callback import GradWatch

__all__ = [
    "LOCAL_THRESHOLD",
    "NATIVE_DTYPES",
    "STATUS_CODES",
    "BatchCapture",
    "LossFn",
    "Penalties",
    "Penalty",
    "Precision",
    "RngState",
    "TrainingWatch",
    "after_backward",
    "check_due",
    "check_local",
    "check_module",
    "check_modules",
    "check_step_notes",
    "is_shadow",
    "module_gradients",
    "result_metrics",
    "trainable_parameters",
    "weight_decay_notes",
]


def after_backward(
    watch: GradWatch,
    step: int,
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    *,
    optimizer: Any = None,
    regularization: Penalties = (),
    precision: Precision = "float64",
    analytic: Analytic = "recompute",
    step_check: bool = False,
    rng: RngState | None = None,
    clip_factor: float = 1.0,
    mode: CheckMode = "auto",
) -> CheckResult | None:
    """The plain-loop hook for torch: call after ``loss.backward()``, before ``optimizer.step()``.

    The torch counterpart of ``GradWatch.after_backward``: when ``watch.due(step)``
    (``step`` = updates completed before this one), checks ``model`` on ``batch``
    with `check_module` and records the result; otherwise returns None at once.
    Training is not changed either way.

    ``step_check=True`` also compares the model's ``.grad`` (what the optimizer will
    use; divided by ``clip_factor`` if you clipped) with the float64 gradient of
    ``loss_fn(model, batch)``: a missing ``zero_grad``, a gradient hook, a loss scaled
    twice fail that link (``result.step_link``). When the forward draws random numbers
    (dropout), pass ``rng=RngState.capture()`` taken just before the training forward,
    so the same masks are replayed.

    ``mode``: ``"whole"`` checks J on a float64 copy of the whole model, ``"local"`` one
    block of modules at a time from their captured inputs and output gradients (no
    whole-model copy; blocks rotate across due checks, ``result.coverage`` says which),
    ``"auto"`` (default) picks by size (see docs/torch.md).

    In a ``torch.distributed`` job call it on every rank, with that rank's batch: the
    check is collective (J is the mean of the ranks' losses), every rank gets the same
    result, and only rank 0 writes the report. ``model`` may be a
    ``DistributedDataParallel`` or an FSDP2 ``fully_shard`` model (checked in place,
    shard by shard; no step link); see docs/distributed.md.
    """
    join_ranks(watch)
    due = watch.due(step)
    if due is None:
        return None
    step_batches = None
    if step_check:
        step_batches = [MicroBatch(batch, 1.0, rng)]
    return check_due(
        watch,
        due,
        model,
        loss_fn,
        batch,
        optimizer=optimizer,
        regularization=regularization,
        precision=precision,
        analytic=analytic,
        step_batches=step_batches,
        clip_factor=clip_factor,
        mode=mode,
    )
