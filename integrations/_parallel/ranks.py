"""A check across the ranks of a ``torch.distributed`` job: one J, one verdict, no hang.

Under data parallelism each rank holds a different batch, and the optimizer gets the
mean of the ranks' gradients. A check is therefore collective: J is the mean of the
ranks' losses (every evaluation ends in one ``all_reduce``), its gradient the mean of
theirs, and every rank runs the same core on the same numbers, so every rank takes
the same decisions, draws the same components and reaches the same verdict.

A rank must never wait in a collective its peers will not join. Every collective of a
check goes through `Ranks`, and carries, besides its payload, one flag per rank
saying "my part raised". A rank whose part raised still joins that collective; every
rank then learns which rank failed and why (its message is broadcast), the failed rank
raises its own exception and the others `PeerCheckError`, so all of them leave the
check at the same point and training goes on. An exception between two collectives is
announced the same way when it leaves `Ranks.together`. A collective that itself fails
(a rank died, the group timed out) is `gradwatch.errors.ProcessGroupError`: the next
training step would fail the same way, so it goes to the training loop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, ClassVar, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from gradwatch.errors import OptionError, PeerCheckError, ProcessGroupError

__all__ = ["PeerCheckError", "Ranks", "unwrap_data_parallel"]

T = TypeVar("T")


class Ranks:
    """The ranks of the default process group, as one check sees them.

    One object per process group (`current`), so the exceptions it raised after every
    rank learned of them (`_told`) are known in every frame of the check they leave,
    without marking the exceptions themselves.
    """

    _current: ClassVar[Ranks | None] = None

    def __init__(self) -> None:
        self.rank = dist.get_rank()
        self.size = dist.get_world_size()
        self._group = dist.group.WORLD
        self._told: list[BaseException] = []
        """Exceptions every rank knows of: not announced again on their way out."""
        self._depth = 0
        backend = str(dist.get_backend())
        self.device = (
            torch.device("cuda", torch.cuda.current_device())
            if backend == "nccl"
            else torch.device("cpu")
        )

    @classmethod
    def current(cls) -> Ranks | None:
        """The job's ranks when this process is one of several, else None."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return None
        known = cls._current
        if known is None or known._group is not dist.group.WORLD:
            known = cls._current = cls()
        return known

    # -- the collective points of a check ------------------------------------------------

    def _exchange(self, payload: torch.Tensor, failure: BaseException | None) -> torch.Tensor:
        """One point: every rank's failure flag, then (when none failed) the sum of ``payload``.

        The flags come first, in a collective of the same shape at every point, so a
        rank that failed can announce it wherever its peers are waiting.
        """
        flags = torch.zeros(self.size, dtype=torch.float64, device=self.device)
        if failure is not None:
            flags[self.rank] = 1.0
        self._collective(dist.all_reduce, flags)
        failed = [rank for rank in range(self.size) if flags[rank] > 0]
        if failed:
            self._raise_agreed(failed, failure)
        total = payload.detach().to(device=self.device, dtype=torch.float64, copy=True)
        if total.numel():
            self._collective(dist.all_reduce, total)
        return total

    def _raise_agreed(self, failed: list[int], failure: BaseException | None) -> None:
        """Every rank learns the first failed rank's message; each raises at once."""
        source = failed[0]
        message = [None if failure is None else f"{type(failure).__name__}: {failure}"]
        self._collective(dist.broadcast_object_list, message, src=source)
        if failure is not None:
            self._told.append(failure)
            raise failure
        others = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
        error = PeerCheckError(f"the check raised on rank {source}{others}: {message[0]}")
        self._told.append(error)
        raise error

    def _known(self, failure: BaseException) -> bool:
        return any(failure is told for told in self._told)

    def _collective(self, operation: Any, *args: Any, **kwargs: Any) -> None:
        try:
            operation(*args, **kwargs)
        except Exception as error:
            raise ProcessGroupError(
                f"a collective of the gradient check failed on rank {self.rank} of "
                f"{self.size} ({type(error).__name__}: {error}): a rank died or the process "
                "group timed out"
            ) from error

    def point(self, failure: BaseException | None = None) -> None:
        """A point without payload: announce ``failure`` unless every rank knows it already."""
        if failure is not None and self._known(failure):
            failure = None
        self._exchange(torch.zeros(0, dtype=torch.float64), failure)

    def command(self, value: float | None, *, source: int) -> float:
        """``source``'s number on every rank (the others pass None): what comes next."""
        box = torch.tensor([0.0 if value is None else value], dtype=torch.float64)
        box = box.to(self.device)
        self._collective(dist.broadcast, box, src=source)
        return float(box[0])

    def gather(self, out: list[Any], value: Any) -> None:
        """Every rank's ``value`` (picklable) into ``out``, on every rank."""
        self._collective(dist.all_gather_object, out, value)

    def mean_of(self, evaluate: Callable[[], float]) -> float:
        """The mean over ranks of ``evaluate()``; a rank whose ``evaluate`` raises still joins."""
        try:
            value = float(evaluate())
        except (PeerCheckError, ProcessGroupError):
            raise
        except Exception as error:
            self._exchange(torch.zeros(1, dtype=torch.float64), error)
            raise  # pragma: no cover - _exchange raised already
        return (
            float(self._exchange(torch.tensor([value], dtype=torch.float64), None)[0]) / self.size
        )

    def largest(self, value: float) -> float:
        """The largest ``value`` over the ranks (one point, then one max-reduction)."""
        self.point()
        box = torch.tensor([value], dtype=torch.float64, device=self.device)
        self._collective(dist.all_reduce, box, op=dist.ReduceOp.MAX)
        return float(box[0])

    def sum_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of a tensor of the same shape on every rank, in float64."""
        return self._exchange(tensor.detach(), None)

    def mean_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean over ranks of a tensor of the same shape on every rank, in float64."""
        return self.sum_tensor(tensor) / self.size

    def agree(self, value: T) -> T:
        """Rank 0's ``value``, on every rank (one point and one broadcast)."""
        self.point()
        box = [value]
        self._collective(dist.broadcast_object_list, box, src=0)
        return box[0]

    @contextmanager
    def together(self) -> Iterator[None]:
        """Run one check's part on this rank; every rank leaves it at the same point.

        On the way out every rank joins one last point: a rank whose part raised
        between two collectives announces it there, and its peers raise
        `PeerCheckError` instead of returning a verdict the failed rank never reached.
        """
        self._depth += 1
        try:
            try:
                yield
            except ProcessGroupError:
                raise
            except Exception as error:
                if not self._known(error):  # the peers know of it already otherwise
                    self.point(error)
                raise
            self.point()
        finally:
            self._depth -= 1
            if self._depth == 0:
                self._told.clear()  # the check is left: nothing of it is held


def unwrap_data_parallel(model: nn.Module) -> nn.Module:
    """The module a check runs on: DDP's ``.module``; wrappers it cannot check refused.

    ``DistributedDataParallel`` (and ``DataParallel``) replicate the module, so the
    check runs on the replica and makes J collective itself. Wrappers that shard the
    parameters need a check that never gathers them: FSDP2's ``fully_shard`` has one
    (`gradwatch.integrations._parallel.sharded`); FSDP1, DeepSpeed and tensor parallelism
    (DTensor parameters outside ``fully_shard``) are refused with a clear error, which
    a due check records as status ``"error"`` while training goes on.
    """
    while isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
        model = model.module
    unsupported = _unsupported_wrapper(model)
    if unsupported is not None:
        raise OptionError(
            f"model: expected a module, a DistributedDataParallel or an FSDP2 fully_shard "
            f"module, received {type(model).__name__} with {unsupported}, which "
            "gradwatch cannot check (see the 'Distributed training' table in docs/distributed.md)"
        )
    return model


def _unsupported_wrapper(model: nn.Module) -> str | None:
    """The sharding wrapper inside ``model`` that a check cannot see through, if any."""
    for module in model.modules():
        kind = type(module).__name__
        if kind == "FullyShardedDataParallel" or "deepspeed" in type(module).__module__:
            return f"a submodule wrapped by {type(module).__module__}.{kind}"
    for name, parameter in model.named_parameters():
        if hasattr(parameter, "ds_id") or name.endswith("_flat_param"):
            return f"a partitioned parameter ({name}: DeepSpeed ZeRO or FSDP1)"
    return None
