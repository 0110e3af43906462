"""The module-local mode: a check whose float64 work is one block at a time.

A whole-model check holds a float64 copy of the model (3.4 copies of the parameters at
its peak, 12 training steps of time at 124M). In the module-local mode no such copy
exists:

1. One forward+backward of the step's J on the real model, in its own precision, with
   the step's random draws replayed (`block_pass.capture_blocks`). It runs on detached views of the
   parameters and on copies of the buffers (``torch.func``'s reparametrization), so it
   never touches ``.grad``, a parameter's hooks, a running statistic, a mode or an RNG.
   It keeps, for each chosen block, its call's inputs and the gradient arriving at its
   outputs (the cotangent), and the gradient of J for the block's parameters.
2. For each chosen block, a float64 copy of that block only and the adjoint test of
   `LocalChecker` (`gradwatch.integrations._local.adjoint`) on a few examples of the
   captured inputs; a failing block is searched down to the module that is wrong
   (`block_check.check_block`).
3. The step link: the optimizer's ``.grad`` of the chosen blocks' parameters against
   the capture pass's gradient of the same J (same precision, same draws;
   `block_pass.block_link`).

Blocks (`model_blocks`) partition the module tree: the repeated layers and the modules
around them. They rotate across due checks (`chosen_blocks`), so over
``blocks / per_check`` checks every block is covered; the result's ``coverage`` says
which. What no block holds (the loss, the model's own forward between its blocks) is
not checked in this mode: `resolve_mode` keeps the whole-model check below
`AUTO_LOCAL_MIN_PARAMETERS`, where it is cheap.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal

from gradwatch.integrations._local.adjoint import LOCAL_THRESHOLD, STEPS
from gradwatch.integrations._local.block_check import check_block
from gradwatch.integrations._local.block_pass import Captured, block_link, capture_blocks
from gradwatch.integrations._parallel.ranks import Ranks
from gradwatch.integrations._parallel.sharded import is_sharded
from gradwatch.integrations._shadow.loss import LossFn
from gradwatch.integrations._shadow.model import trainable_parameters, untouched_globals
from gradwatch.integrations._step import MicroBatch
from torch import nn

from gradwatch.engine.finish import finish
from gradwatch.errors import OptionError
from gradwatch.result import (
    CheckResult,
    Coverage,
    Localization,
    ModuleSuspect,
    ModuleVerdict,
    StepLink,
)

if TYPE_CHECKING:
    from gradwatch.callback import GradWatch

__all__ = [
    "AUTO_LOCAL_MIN_PARAMETERS",
    "MODES",
    "ROTATION",
    "CheckMode",
    "check_blocks",
    "checked_mode",
    "chosen_blocks",
    "model_blocks",
    "resolve_mode",
    "run_local",
    "timed",
]

CheckMode = Literal["auto", "whole", "local"]
MODES: tuple[CheckMode, ...] = ("auto", "whole", "local")

AUTO_LOCAL_MIN_PARAMETERS = 2_000_000
"""``mode="auto"`` checks the whole model in float64 below this many trainable
parameters and module by module from it. Measured (`benchmarks.scaling`, GPT-2 under the
HF Trainer, batch 4 x 128, CPU, one thread): a whole-model check costs 10-12 training
steps at every size and its peak RSS grows to 1.57x the run's at 10M parameters (1.91x
at 42M); at 0.7M it is 0.5 s of CPU and +76 MB (1.17x, mostly gradwatch's own imports).
There it stays cheap, and its J also covers the loss and the glue no block holds."""

BLOCK_SHARE = 8
"""A module holding more than 1/BLOCK_SHARE of the parameters is split into its
children (a leaf is a block whatever its size)."""

ROTATION = 4
"""Checks over which the blocks rotate: each check covers ceil(blocks / ROTATION)."""

COLLECT_PARAMETERS = 1_000_000
"""A block larger than this (8 MB in float64) is garbage-collected right after its check."""


def resolve_mode(
    model: nn.Module,
    mode: CheckMode,
    *,
    precision: str = "float64",
    analytic: str = "recompute",
    penalties: bool = False,
) -> Literal["whole", "local"]:
    """Which check runs: ``mode`` as given, or for ``"auto"`` local from
    `AUTO_LOCAL_MIN_PARAMETERS` parameters (whole for a distributed or sharded model, a
    native-precision or ``analytic="live"`` check: the local mode does neither; and
    whole when regularization penalties were given: they are outside every block)."""
    checked = checked_mode(mode)
    if checked != "auto":
        return checked
    if precision != "float64" or analytic != "recompute" or penalties:
        return "whole"
    if Ranks.current() is not None or is_sharded(model):
        return "whole"
    size = sum(p.numel() for p in trainable_parameters(model).values())
    return "local" if size >= AUTO_LOCAL_MIN_PARAMETERS else "whole"


def model_blocks(model: nn.Module) -> list[str]:
    """The blocks of ``model``: module paths that partition its module tree.

    Each item of a list of repeated layers (a ``ModuleList`` or ``Sequential`` of two or
    more modules of one class) is a block, so a layer's own forward code is checked too;
    any other module is a block when it has no children or holds at most 1/`BLOCK_SHARE`
    of the trainable parameters, else its children are visited. A GPT-2 gives its
    embeddings, each transformer layer, the final norm and the head.
    """
    total = sum(p.numel() for p in trainable_parameters(model).values())
    limit = max(total / BLOCK_SHARE, 1.0)
    blocks: list[str] = []

    def visit(path: str, module: nn.Module) -> None:
        children = list(module.named_children())
        own = sum(p.numel() for p in module.parameters() if p.requires_grad)
        repeated = (
            isinstance(module, nn.ModuleList | nn.Sequential)
            and len(children) >= 2
            and len({type(child) for _, child in children}) == 1
        )
        if repeated:
            blocks.extend(f"{path}.{name}" if path else name for name, _ in children)
            return
        if not children or own <= limit:
            blocks.append(path)
            return
        for name, child in children:
            visit(f"{path}.{name}" if path else name, child)

    visit("", model)
    return blocks


def chosen_blocks(blocks: Sequence[str], done: int, count: int) -> list[str]:
    """The ``count`` blocks a check covers after ``done`` local checks: the next ones in
    the rotation (so every block is covered once every ceil(len / count) checks)."""
    count = max(1, min(count, len(blocks)))
    start = (done * count) % len(blocks)
    return [blocks[(start + i) % len(blocks)] for i in range(count)]


def per_check(blocks: Sequence[str]) -> int:
    """Blocks a check covers as configured: the rotation covers all in `ROTATION` checks."""
    return max(1, math.ceil(len(blocks) / ROTATION))


def check_blocks(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    *,
    done: int,
    count: int | None = None,
    step_batches: Sequence[MicroBatch] | None = None,
    step_loss_fn: LossFn | None = None,
    clip_factor: float | None = 1.0,
    seed: int = 0,
    threshold: float = LOCAL_THRESHOLD,
    notes: Sequence[str] = (),
) -> tuple[CheckResult, StepLink | None]:
    """A module-local check of the next blocks in the rotation, and the step link.

    Args:
        model: never modified (parameters, ``.grad``, buffers, modes, RNGs).
        loss_fn: J on one batch, as for ``check_module``.
        batch: the batch J is on (without ``step_batches``).
        done: local checks run so far (the rotation's position).
        count: blocks to cover (None: `per_check`).
        step_batches: the step's micro-batches; with them J is over all of them (their
            draws replayed) and the step link compares the chosen blocks' ``.grad``.
        step_loss_fn: J on each micro-batch (default ``loss_fn``).
        clip_factor: the factor a clip applied to ``.grad`` (None: measured).

    Returns:
        The result (``mode="local"``, ``coverage``, ``localization`` naming a suspect)
        and the step link (None without ``step_batches``).
    """
    started = time.perf_counter()
    blocks = model_blocks(model)
    configured = per_check(blocks)
    chosen = chosen_blocks(blocks, done, configured if count is None else count)
    micro = list(step_batches) if step_batches else [MicroBatch(batch)]
    captured = capture_blocks(model, step_loss_fn or loss_fn, micro, chosen)
    # The step link first: J's gradient for the chosen blocks is freed before the float64 work.
    link = block_link(model, captured, micro, clip_factor) if step_batches else None
    captured.gradients.clear()
    found = _Found()
    with untouched_globals(model):
        for path in chosen:
            for index, call in enumerate(captured.calls[path]):
                found.add(*check_block(call, seed + 104729 * (done + index), threshold))
                # The block's float64 copy sits in reference cycles (captured calls point
                # at their parents): a large one is freed now, not at a later collection
                # (a full collection costs about 0.1 s: not worth it for a small block).
                if sum(p.numel() for p in call.module.parameters()) > COLLECT_PARAMETERS:
                    gc.collect()
    notes = [*_coverage_notes(chosen, blocks, found.examples), *notes]
    if step_batches and captured.left_out:
        notes.append(
            "step link: vocabulary-sized tensors left out (their gradient would be the "
            f"check's largest allocation): {', '.join(captured.left_out)}"
        )
    coverage = Coverage(
        modules=chosen, blocks=len(blocks), per_check=configured, examples=found.examples
    )
    result = _local_result(model, captured, found, coverage, notes, threshold, seed, started)
    return result, link


class _Found:
    """What the checks of a local check's blocks found, gathered."""

    def __init__(self) -> None:
        self.suspects: list[ModuleSuspect] = []
        self.verdicts: list[ModuleVerdict] = []
        self.notes: list[str] = []
        self.evaluations = 0
        self.examples: int | None = None

    def add(
        self,
        suspects: list[ModuleSuspect],
        verdicts: list[ModuleVerdict],
        evaluations: int,
        notes: list[str],
        examples: int | None,
    ) -> None:
        self.suspects += suspects
        self.verdicts += verdicts
        self.evaluations += evaluations
        self.notes += notes
        self.examples = examples if examples is not None else self.examples


def _coverage_notes(chosen: list[str], blocks: list[str], examples: int | None) -> list[str]:
    return [
        f"module-local check (mode='local'): blocks {', '.join(p or '(model)' for p in chosen)} "
        f"of {len(blocks)}, each on a float64 copy of that block only, at the step's "
        f"activations ({examples or 'all'} example(s)); the blocks rotate, so every block "
        f"is covered once every {math.ceil(len(blocks) / max(len(chosen), 1))} checks; the "
        "loss and the model's own code between blocks are not checked in this mode"
    ]


def _local_result(
    model: nn.Module,
    captured: Captured,
    found: _Found,
    coverage: Coverage,
    notes: list[str],
    threshold: float,
    seed: int,
    started: float,
) -> CheckResult:
    """The `CheckResult` of a local check: failed when a block call failed, the worst
    local ratio as its ratio, the suspects in its localization."""
    ratio = max((_largest(v) for v in found.verdicts), default=0.0)
    failed = bool(found.suspects) or any(v.status == "fail" for v in found.verdicts)
    unreached = [p for p in coverage.modules if not captured.calls[p]]
    if unreached:
        notes.append(f"not called in the step's forward: {', '.join(unreached)}")
    if failed and found.suspects:
        first = found.suspects[0]
        verdict = (
            f"fail by the module-local rule: {first.module or '(model)'} local ratio "
            f"{first.ratio:.3g} >= {threshold:g}"
        )
    else:
        verdict = (
            f"{'fail' if failed else 'ok'}: largest local ratio {ratio:.3g} of the module "
            f"calls checked (threshold {threshold:g})"
        )
    seconds = time.perf_counter() - started
    return CheckResult(
        ratio=ratio,
        status="fail" if failed else "ok",
        tensors={},
        worst=[],
        eps=STEPS[0],
        eps_policy="local: each tensor's RMS x 1e-6, then 1e-7",
        checked=len(found.verdicts),
        size=sum(p.numel() for p in trainable_parameters(model).values()),
        loss=captured.loss,
        loss_evals=found.evaluations,
        seconds=seconds,
        regularization={},
        mode="local",
        dtype="float64",
        warn=threshold / 10,
        threshold=threshold,
        seed=seed,
        notes=notes,
        verdict=verdict,
        rule="global" if failed else "none",
        rule_ratio=ratio,
        localization=Localization(
            suspects=found.suspects,
            modules=found.verdicts,
            evaluations=found.evaluations,
            checks=len(found.verdicts),
            seconds=seconds,
            threshold=threshold,
            notes=found.notes,
        ),
        coverage=coverage,
    )


def _largest(verdict: ModuleVerdict) -> float:
    ratios = [r for r in (verdict.input_ratio, verdict.parameter_ratio) if r is not None]
    return max(ratios, default=0.0)


def run_local(
    watch: GradWatch,
    due: object,
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    *,
    step_batches: Sequence[MicroBatch] | None,
    step_loss_fn: LossFn | None,
    clip_factor: float | None,
    notes: Sequence[str] = (),
) -> tuple[CheckResult, StepLink | None]:
    """`check_blocks` at a due step of ``watch``: the rotation continues from the watch's
    earlier local checks, and a budget's plan for the step sets how many blocks.
    ``due``: the due step, or the watch's plan for it (anything with a ``step``)."""
    step = due if isinstance(due, int) else getattr(due, "step", None)
    plans = watch.plans
    count = plans[-1].blocks if plans and plans[-1].step == step else None
    return check_blocks(
        model,
        loss_fn,
        batch,
        done=sum(1 for result in watch.results if result.coverage is not None),
        count=count,
        step_batches=step_batches,
        step_loss_fn=step_loss_fn,
        clip_factor=clip_factor,
        seed=watch.seed,
        notes=notes,
    )


def timed(compute: Callable[[], CheckResult]) -> Callable[[], CheckResult]:
    """``compute`` whose result's ``seconds`` is the wall time of all of it (the copies,
    the step link, the module search), not of the core's part only."""

    def run() -> CheckResult:
        started = time.perf_counter()
        result = compute()
        return finish(result, seconds=time.perf_counter() - started)

    return run


def checked_mode(mode: object) -> CheckMode:
    """``mode`` when it is one of `MODES`, else an `OptionError` saying what is expected."""
    if mode not in MODES:
        raise OptionError(f"mode: expected one of {', '.join(map(repr, MODES))}, received {mode!r}")
    return mode
