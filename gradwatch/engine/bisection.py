"""Where in a failing tensor the error sits: bisection along one random direction.

The error of a tensor along a direction v restricted to a range of entries,
``d(range) = (J(theta + h v_range) - J(theta - h v_range)) / 2h - g . v_range``, is
additive over disjoint ranges (to O(h^2)). Knowing d over a range, the error over one
half costs two evaluations and the other half's is the difference, so following the
half with the larger |d| reaches one entry in ``2 + 2 ceil(log2 n)`` evaluations
(n = 4096: 26) instead of the 2n of checking every entry. An error confined to a few
entries is found exactly; an error spread over the tensor leads to an entry whose
error is large along the way. Either way the entry is then checked component-wise.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from gradwatch.engine.uninterrupted import restoring

__all__ = ["bisect", "bisection_cost"]

F64 = npt.NDArray[np.float64]


def bisection_cost(size: int) -> int:
    """Loss evaluations `bisect` spends on a tensor of ``size`` entries.

    >>> bisection_cost(1), bisection_cost(4096)
    (2, 26)
    """
    return 2 + 2 * math.ceil(math.log2(max(size, 1)))


def bisect(
    view: npt.NDArray[np.floating],
    gradient: F64,
    direction: F64,
    step: float,
    evaluate: Callable[[str], float],
    where: str,
) -> int:
    """The flat index of ``view`` (a writable flat view of theta's tensor) to blame.

    Args:
        view: the tensor's entries, perturbed in place and restored bit for bit.
        gradient: the analytic gradient of J for those entries, flat, float64.
        direction: a flat random direction with no entry near 0 (see ``_random_block``).
        step: h.
        evaluate: J at the current theta (regularization included); ``where`` + a
            range names the evaluation in errors.
        where: the tensor's name.
    """
    olds = view.astype(np.float64)
    ups = (olds + step * direction).astype(view.dtype)
    downs = (olds - step * direction).astype(view.dtype)
    # The analytic side over the step realized in the dtype, entry by entry.
    analytic = gradient * (ups.astype(np.float64) - downs.astype(np.float64)) / (2 * step)

    def error(low: int, high: int) -> float:
        backup = view[low:high].copy()

        def put_back() -> None:
            view[low:high] = backup

        with restoring(put_back) as region:
            view[low:high] = ups[low:high]
            plus = region.run(evaluate, f"{where}[{low}:{high}] + h v")
            view[low:high] = downs[low:high]
            minus = region.run(evaluate, f"{where}[{low}:{high}] - h v")
        return (plus - minus) / (2 * step) - float(analytic[low:high].sum())

    low, high = 0, view.size
    whole = error(low, high)
    while high - low > 1:
        middle = (low + high) // 2
        left = error(low, middle)
        right = whole - left
        if abs(left) >= abs(right):
            high, whole = middle, left
        else:
            low, whole = middle, right
    return low
