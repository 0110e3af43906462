"""The FSDP2 ranks' results over their own shards merged into one result over the full tensors.

Each rank checks its local shards (rows ``start_row`` onward of dim 0 of every tensor);
`merge_shard_results` names every tensor and component as the unsharded model would: a
tensor's ratio is the largest of its shards', components get their full indices. Plain
results in, one result out: no collective here (`gradwatch.integrations._parallel.sharded`
gathers the parts).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from gradwatch.engine.verdict import STATUS_ORDER
from gradwatch.params import component_name
from gradwatch.result import CheckResult, Component, TensorResult

__all__ = ["merge_shard_results"]


def merge_shard_results(
    parts: list[tuple[CheckResult, dict[str, int]]],
    shapes: dict[str, tuple[int, ...]],
    size: int,
) -> CheckResult:
    """The ranks' results over their shards as one result over the full tensors.

    A tensor's ratio is the largest of its shards' (each shard judged against J of the
    whole model), the global ratio the largest rank's; components get full indices.
    """
    worst_first = sorted(parts, key=lambda part: _severity(part[0]), reverse=True)
    lead = worst_first[0][0]
    tensors: dict[str, TensorResult] = {}
    components: list[Component] = []
    for result, starts in parts:
        for name, verdict in result.tensors.items():
            known = tensors.get(name)
            if known is None:
                tensors[name] = verdict.model_copy(update={"size": math.prod(shapes[name])})
            else:
                worse = verdict if _severity(verdict) > _severity(known) else known
                tensors[name] = worse.model_copy(
                    update={
                        "checked": known.checked + verdict.checked,
                        "size": math.prod(shapes[name]),
                        "max_abs_error": max(known.max_abs_error, verdict.max_abs_error),
                    }
                )
        for component in result.worst:
            index = _full_index(component.index, starts[component.tensor], shapes[component.tensor])
            components.append(
                component.model_copy(
                    update={"index": list(index), "name": component_name(component.tensor, index)}
                )
            )
    components.sort(key=lambda c: -c.rel_error if math.isfinite(c.rel_error) else -math.inf)
    ordered = {name: tensors[name] for name in shapes if name in tensors}
    note = (
        f"FSDP2: checked in place in {lead.dtype}, each of {size} ranks' shards in turn "
        "while the other ranks held theirs; J is the mean of the ranks' losses; a tensor's "
        "ratio is the largest of its shards'"
    )
    return lead.model_copy(
        update={
            "ratio": max(result.ratio for result, _ in parts),
            "tensors": ordered,
            "worst": components[: max(len(result.worst) for result, _ in parts)],
            "checked": sum(result.checked for result, _ in parts),
            "size": sum(math.prod(shape) for shape in shapes.values()),
            "loss_evals": sum(result.loss_evals for result, _ in parts),
            "seconds": sum(result.seconds for result, _ in parts),
            "notes": [note, *dict.fromkeys(n for result, _ in worst_first for n in result.notes)],
        }
    )


def _full_index(index: Sequence[int], start_row: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    if not shape:
        return ()
    return (int(index[0]) + start_row, *(int(i) for i in index[1:]))


def _severity(verdict: CheckResult | TensorResult) -> tuple[int, float]:
    """Worse status first, then the larger ratio (NaN the largest)."""
    order = STATUS_ORDER.get(verdict.status, len(STATUS_ORDER))
    if verdict.ratio is None:  # screened together: no ratio of its own
        return order, -math.inf
    return order, verdict.ratio if math.isfinite(verdict.ratio) else math.inf
