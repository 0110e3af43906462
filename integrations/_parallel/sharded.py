"""A check of an FSDP2 (``fully_shard``) model in place, shard by shard, never gathered.

FSDP2 shards every parameter on dim 0 across the ranks (a DTensor whose local part
is a view of the storage the forward all-gathers from), and FSDP forbids
``copy.deepcopy``. So no rank builds a copy of the model: the check perturbs the
model's own local shards in place, through numpy views, in the parameters' dtype, and
puts every value back exactly (``precision="native"``: the core takes the step and
the thresholds from that dtype).

J is the mean of the ranks' losses, and every evaluation of J is collective (the
forward all-gathers the shards). With ``sample="auto"`` every rank first runs the core
at once over its own shards (`_joint_screen`): each moves its shards along its part of
one random direction, so J sees the whole direction, and the screen's sums and maxima
are reduced over the ranks (`gradwatch.engine.objective.SplitObjective`). A clean screen is
the whole check, at a cost that does not grow with the ranks. When it fires (or for
another ``sample``) the core runs on one rank at a time, over that rank's shards, while
the other ranks hold theirs still and join every evaluation (`_serve`); the rank whose
turn it is tells them what comes next (an evaluation, a backward, done). The gradient
is FSDP's own: a collective backward of J (whose reduce-scatter averages the ranks'
gradients) into ``.grad`` for each visit of the core, after which the training's
``.grad`` tensors are put back. Per rank a check holds its shard's gradient during a
visit, the backups of the shards a direction moves, and the activations of one forward.
The ranks' results are merged into one, identical on every rank (`merge`): tensors by
their full names, components by their full (unsharded) indices.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from gradwatch.integrations._parallel.merge import merge_shard_results
from gradwatch.integrations._parallel.ranks import Ranks
from gradwatch.integrations._shadow.loss import LossFn, Penalty, is_immutable, j_terms
from gradwatch.integrations._shadow.model import (
    GENERATORS,
    NATIVE_DTYPES,
    RngState,
    trainable_parameters,
    untouched_globals,
)
from torch import nn

import gradwatch
from gradwatch.engine.finish import finish
from gradwatch.errors import OptionError, ProcessGroupError
from gradwatch.result import CheckResult

__all__ = ["check_sharded", "is_sharded"]

_DONE, _EVALUATE, _BACKWARD = 0.0, 1.0, 2.0
"""What the rank whose turn it is tells the others comes next."""


def is_sharded(model: nn.Module) -> bool:
    """True for a model with DTensor parameters (FSDP2's ``fully_shard``)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


class _Shard:
    """One rank's part of a dim-0 sharded parameter: the numpy view, where it sits."""

    def __init__(self, name: str, parameter: Any, ranks: Ranks) -> None:
        from torch.distributed.tensor import Shard

        placements = tuple(parameter.placements)
        if placements != (Shard(0),):
            raise OptionError(
                f"model: expected parameters sharded on dim 0 over one mesh dimension "
                f"(FSDP2's fully_shard), received {name} with placements {placements} "
                "(tensor parallelism and HSDP are not supported)"
            )
        if parameter.dtype not in NATIVE_DTYPES:
            raise OptionError(
                f"model: expected FSDP2 parameters in float64, float32 or float16 (checked in "
                f"place, in their own dtype), received {name} in {parameter.dtype}"
            )
        self.parameter = parameter
        self.shape = tuple(parameter.shape)
        local = parameter.to_local()
        rows = self.shape[0] if self.shape else 1
        chunk = math.ceil(rows / ranks.size)
        self.start_row = min(ranks.rank * chunk, rows)
        expected = max(0, min(chunk, rows - self.start_row))
        if local.shape[0] != expected:
            raise OptionError(
                f"model: expected {name}'s local shard to hold rows {self.start_row}.."
                f"{self.start_row + expected} (FSDP2's even chunks), received "
                f"{tuple(local.shape)}"
            )
        self.local = local
        self.on_cpu = local.device.type == "cpu"
        # On the CPU the core perturbs the shard itself through a numpy view; elsewhere a
        # host copy, written into the device shard before each evaluation (`sync`).
        self.array: npt.NDArray[np.floating] = (
            local.detach().numpy() if self.on_cpu else local.detach().cpu().numpy().copy()
        )

    def sync(self) -> None:
        """Make the device shard hold the (possibly perturbed, or restored) host values."""
        if not self.on_cpu:
            with torch.no_grad():
                self.local.copy_(torch.from_numpy(self.array))


def check_sharded(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    penalties: list[tuple[str, Penalty]],
    options: dict[str, Any],
) -> CheckResult:
    """Check ``model`` (FSDP2) in place: every rank must call it, with its own batch."""
    ranks = Ranks.current()
    if ranks is None:
        raise OptionError(
            "model: expected an FSDP2 model inside its process group, received one whose "
            "process group has a single rank or is not initialized"
        )
    with ranks.together(), untouched_globals(model) as rng, _fsdp_state_kept(model):
        shards = {name: _Shard(name, p, ranks) for name, p in trainable_parameters(model).items()}
        evaluate = _LocalJ(model, loss_fn, batch, penalties, rng, list(shards.values()))
        results = []
        screened: CheckResult | None = None
        try:
            if options.get("sample", "auto") == "auto":
                screened = _joint_screen(ranks, shards, evaluate, options)
                if screened.status in ("ok", "nondeterministic"):
                    return screened
            for driver in range(ranks.size):
                results.append(_turn(driver, ranks, shards, evaluate, options))
        finally:
            evaluate.sync()  # device shards back to the values the core restored
        merged = _merged(results, shards, ranks)
        note = (
            "each rank's shards checked in turn"
            if screened is None
            else f"the joint screen over every rank's shards fired (ratio {screened.ratio:.3g}); "
            "each rank's shards checked in turn to localize"
        )
        return finish(merged, notes=[note])


class _SplitJ:
    """J for the joint screen: every rank checks its own shards at once, J collective.

    A `gradwatch.engine.objective.SplitObjective`: every rank moves its shards along its part of
    one direction, so J sees the whole direction; the screen's sums and maxima are taken
    over the ranks. Its gradient (`visit`) is one collective FSDP backward.
    """

    def __init__(self, ranks: Ranks, shards: dict[str, _Shard], evaluate: _LocalJ) -> None:
        self.ranks, self.shards, self.evaluate = ranks, shards, evaluate

    def __call__(self) -> float:
        return self.ranks.mean_of(self.evaluate)

    def total(self, values: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        summed = self.ranks.sum_tensor(torch.from_numpy(np.asarray(values, dtype=np.float64)))
        return np.asarray(summed.cpu().numpy(), dtype=np.float64)

    def largest(self, value: float) -> float:
        return self.ranks.largest(value)

    def full_sizes(self) -> dict[str, int]:
        return {name: math.prod(shard.shape) for name, shard in self.shards.items()}

    def visit(
        self, names: Sequence[str], consume: Callable[[str, npt.NDArray[np.floating]], None]
    ) -> None:
        _hand_over(self.shards, self.evaluate, self.ranks, names, consume)


def _joint_screen(
    ranks: Ranks, shards: dict[str, _Shard], evaluate: _LocalJ, options: dict[str, Any]
) -> CheckResult:
    """``sample="auto"``'s screen along directions over every rank's shards at once.

    Its cost does not grow with the ranks (a clean check is then the whole check); every
    rank runs the core at once, so a rank whose part raised between two collectives
    announces it at the next one.
    """
    split = _SplitJ(ranks, shards, evaluate)
    arrays = {name: shard.array for name, shard in shards.items()}
    try:
        result = gradwatch.check(split, arrays, split, **options)
    except ProcessGroupError:
        raise
    except Exception as error:
        ranks.point(error)
        raise
    ranks.point()
    sizes = split.full_sizes()
    return result.model_copy(
        update={
            "size": sum(sizes.values()),
            "tensors": {
                name: tensor.model_copy(update={"size": sizes[name]})
                for name, tensor in result.tensors.items()
            },
            "notes": [
                f"FSDP2: checked in place in {result.dtype}, every rank's shards moved along "
                f"one joint direction at once; J is the mean of the {ranks.size} ranks' losses",
                *result.notes,
            ],
        }
    )


class _LocalJ:
    """This rank's J at the model's current values, from the same RNG state every time."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batch: Any,
        penalties: list[tuple[str, Penalty]],
        rng: RngState,
        shards: list[_Shard],
    ) -> None:
        from torch.distributed.fsdp import FSDPModule

        self.model, self.loss_fn, self.batch = model, loss_fn, batch
        self.penalties, self.rng = penalties, rng
        self._fresh_batch = not is_immutable(batch)
        self.shards = [shard for shard in shards if not shard.on_cpu]
        self._fsdp = [m for m in model.modules() if isinstance(m, FSDPModule)]

    def sync(self) -> None:
        """Write the host copies into the device shards (nothing to do on the CPU)."""
        for shard in self.shards:
            shard.sync()

    def total(self) -> torch.Tensor:
        self.sync()
        # The root keeps its gathered parameters after a forward (its backward needs
        # them): reshard, so this forward gathers the shards as they are now.
        for module in self._fsdp:
            module.reshard()
        self.rng.restore(GENERATORS)
        loss, penalties = j_terms(
            self.model, self.loss_fn, self.batch, self.penalties, fresh_batch=self._fresh_batch
        )
        return loss + sum(penalties.values()) if penalties else loss

    def __call__(self) -> float:
        with torch.no_grad():
            return float(self.total())


def _fsdp_gradient(
    shards: dict[str, _Shard], evaluate: _LocalJ, ranks: Ranks
) -> dict[str, npt.NDArray[np.floating]]:
    """This rank's shard of the gradient of J (FSDP averages the ranks'); ``.grad`` kept.

    Collective (FSDP's backward reduce-scatters): every rank calls it at once.
    """
    # With .grad None, FSDP's reduce-scatter gives each parameter a new gradient tensor
    # (it accumulates only into an existing one): the training's .grad stays untouched
    # aside, and is put back (tests check the run stays bit-identical).
    kept = {name: shard.parameter.grad for name, shard in shards.items()}
    try:
        for shard in shards.values():
            shard.parameter.grad = None
        failure: Exception | None = None
        with torch.enable_grad():
            try:
                total = evaluate.total()
            except Exception as error:
                failure = error
            ranks.point(failure)  # FSDP's backward is collective: every forward went through
            if total.requires_grad:
                total.backward()  # type: ignore[no-untyped-call]
        grads: dict[str, npt.NDArray[np.floating]] = {}
        for name, shard in shards.items():
            gradient = shard.parameter.grad
            # In the shard's own dtype, as FSDP reduced it: one copy of this rank's shard.
            grads[name] = (
                np.zeros_like(shard.array)
                if gradient is None
                else gradient.to_local().detach().cpu().numpy()
            )
    finally:
        for name, shard in shards.items():
            shard.parameter.grad = kept[name]
    return grads


def _turn(
    driver: int,
    ranks: Ranks,
    shards: dict[str, _Shard],
    evaluate: _LocalJ,
    options: dict[str, Any],
) -> CheckResult | None:
    """``driver`` checks its shards; the others serve its evaluations of J. Its result."""
    failure: Exception | None = None
    result = None
    try:
        if ranks.rank == driver:
            result = _drive(ranks, shards, evaluate, options)
        else:
            _serve(driver, ranks, shards, evaluate)
    except ProcessGroupError:
        raise
    except Exception as error:
        failure = error
    ranks.point(failure)  # announces a failure the other ranks do not know of yet
    if failure is not None:  # one they know of: every rank raises here
        raise failure
    return result


class _ShardGradients:
    """The driver's shards of the gradient of J, as a `gradwatch.params.GradientSource`.

    Each visit is one collective backward (the other ranks are told to join it), whose
    gradient is handed over tensor by tensor and dropped after the visit: the check never
    holds it longer than FSDP's own backward does.
    """

    def __init__(self, ranks: Ranks, shards: dict[str, _Shard], evaluate: _LocalJ) -> None:
        self.ranks, self.shards, self.evaluate = ranks, shards, evaluate

    def visit(
        self, names: Sequence[str], consume: Callable[[str, npt.NDArray[np.floating]], None]
    ) -> None:
        self.ranks.command(_BACKWARD, source=self.ranks.rank)
        _hand_over(self.shards, self.evaluate, self.ranks, names, consume)


def _hand_over(
    shards: dict[str, _Shard],
    evaluate: _LocalJ,
    ranks: Ranks,
    names: Sequence[str],
    consume: Callable[[str, npt.NDArray[np.floating]], None],
) -> None:
    """One collective backward; each of ``names``' gradient shard to ``consume``, then dropped."""
    grads = _fsdp_gradient(shards, evaluate, ranks)
    for name in names:
        consume(name, grads[name])


def _drive(
    ranks: Ranks,
    shards: dict[str, _Shard],
    evaluate: _LocalJ,
    options: dict[str, Any],
) -> CheckResult | None:
    """This rank's turn: the core over its non-empty shards, every J collective."""
    mine = {name: shard.array for name, shard in shards.items() if shard.array.size}

    def collective_j() -> float:
        ranks.command(_EVALUATE, source=ranks.rank)
        return ranks.mean_of(evaluate)

    try:
        if not mine:
            return None
        return gradwatch.check(
            collective_j, mine, _ShardGradients(ranks, shards, evaluate), **options
        )
    finally:
        ranks.command(_DONE, source=ranks.rank)


def _serve(driver: int, ranks: Ranks, shards: dict[str, _Shard], evaluate: _LocalJ) -> None:
    """Join the driver's evaluations of J and its backward passes until it says done.

    A failed one is announced to every rank inside it (`Ranks.mean_of`, or the point in
    `_fsdp_gradient`); the driver then stops its check and says done, and this rank
    raises its own failure.
    """
    failure: Exception | None = None
    while (command := ranks.command(None, source=driver)) != _DONE:
        try:
            if command == _EVALUATE:
                ranks.mean_of(evaluate)
            else:
                _fsdp_gradient(shards, evaluate, ranks)
        except ProcessGroupError:
            raise
        except Exception as error:
            failure = failure or error
    if failure is not None:
        raise failure


@contextmanager
def _fsdp_state_kept(model: nn.Module) -> Iterator[None]:
    """Leave the model as the check found it: resharded, every buffer's values back.

    A forward leaves the root's parameters gathered (FSDP keeps them for the backward);
    left so, the next training forward would not gather the updated shards. BatchNorm
    running statistics move in train-mode forwards.
    """
    from torch.distributed.fsdp import FSDPModule

    saved = [(buffer, buffer.detach().clone()) for buffer in model.buffers()]
    try:
        yield
    finally:
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def _merged(
    results: list[CheckResult | None], shards: dict[str, _Shard], ranks: Ranks
) -> CheckResult:
    """One result from every rank's, identical on every rank."""
    mine = [None if r is None else r.model_dump(mode="json") for r in results]
    gathered: list[Any] = [None] * ranks.size
    ranks.gather(gathered, mine[ranks.rank])
    offsets: list[Any] = [None] * ranks.size
    ranks.gather(offsets, {name: s.start_row for name, s in shards.items()})
    parts = [
        (CheckResult.model_validate(dump), offsets[rank])
        for rank, dump in enumerate(gathered)
        if dump is not None
    ]
    return merge_shard_results(parts, {name: s.shape for name, s in shards.items()}, ranks.size)
