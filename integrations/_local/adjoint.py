"""Module-local checks: which module's backward disagrees with the derivative of its forward.

A wrong backward spoils the gradient of every tensor upstream of it, so per-tensor ratios
cannot say where the bug is, and a module without parameters has no tensor to name. A
local check needs neither. For one module call f with captured inputs x, parameters
theta_m and the gradient g that arrived at its outputs (`_local_capture`), the scalar
phi(x, theta_m) = <g, f(x; theta_m)> has the gradient autograd's vector-Jacobian product
gives (the module's backward); its central difference along a random direction v must
agree with <VJP, v> (the dot-product, or adjoint, test). Each side is judged on its own:
the input side (v in x only: what makes modules without parameters findable) and the
parameter side (v in theta_m only). Every evaluation replays the random generators as
they were at the call (dropout draws the same mask), starts from fresh copies of the
captured arguments (an in-place op, a cache it appends to), and puts the module's buffers
back (running statistics).

`_local_search` descends the module tree with these checks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from gradwatch.integrations._local.capture import ModuleCall, fresh_arguments, tensor_leaves
from torch import nn

from gradwatch.result import ModuleVerdict

__all__ = ["LOCAL_THRESHOLD", "LocalChecker", "custom_functions"]

STEPS = (1e-6, 1e-7)
"""The two trials' steps, relative to each tensor's RMS. A failing call fails both, each
along its own random direction: a kink (ReLU, max) between x - hv and x + hv spoils one
trial's difference with probability ~ (entries near the kink) x h, so the second, ten
times shorter step and a new direction make a kink in both about 1e-4 as likely; float64
truncation, ~h^2 relative, is far below any threshold at either step."""

ROUNDOFF_UNITS = 1e3
"""The roundoff allowed in a difference of <g, f>, in units of eps * ||g * f||_2 / h (the
rounding of each output entry, summed with random signs; 1e3 leaves room for cancellation
inside f, such as a norm's mean subtraction)."""

LOCAL_THRESHOLD = 1e-4
"""A side fails at this ratio |numeric - analytic| / (|numeric| + |analytic|) in both
trials (a correct float64 module measures ~1e-9 to 1e-7; a wrong backward 1e-3 to 1)."""

KINK = 1e-6
"""An output entry whose second differences at h and h/2 do not scale like h^2, by more
than this times its slope (plus roundoff), is not smooth along the step: left out of the
test (`_Call.kinks`). A smooth entry's scale to about h^2 relative (1e-12)."""

SURE_RATIO = 1e-2
"""A trial whose every output entry is smooth along the step (none left out) and whose
ratio reaches this fails the side without a second trial: a kink inside the module that
no output entry shows at `KINK` cannot move <g, f> by this much (the error it could hide
is at most about KINK x sqrt(output entries) relative)."""

MOST_LEFT_OUT = 0.5
"""A trial whose kinks take more than this share of |g| out judges nothing."""


@dataclass
class SideResult:
    """One side (input or parameter) of one call's local check."""

    ratio: float
    failed: bool | None
    """None: not judged (kinks took most of the cotangent out of a trial)."""


class _Call:
    """Evaluations of one module call at perturbed inputs or parameters."""

    def __init__(
        self, call: ModuleCall, counter: list[int], mode: AbstractContextManager[Any]
    ) -> None:
        self.call = call
        self.counter = counter
        self.mode = mode
        self.params = [
            p for p in call.module.parameters() if p.requires_grad and p.is_floating_point()
        ]
        self.leaves = tensor_leaves((call.args, call.kwargs))
        self.inputs = sorted(call.differentiable)
        self.cotangents = [call.cotangents.get(i) for i in range(call.outputs)]
        self.buffers = [(b, b.detach().clone()) for b in call.module.buffers()]

    def outputs(
        self,
        shifts: dict[int, torch.Tensor] | None = None,
        leaves: dict[int, torch.Tensor] | None = None,
    ) -> list[torch.Tensor | None]:
        """The call's output tensors that received a gradient (None elsewhere).

        ``shifts``: input position -> what to add to that input; ``leaves``: input
        position -> a tensor requiring grad to use (through a copy) instead: the
        autograd pass, after which the caller runs `restore_buffers` (the backward
        may need the buffers as the forward left them)."""

        def argument(position: int, tensor: torch.Tensor) -> torch.Tensor:
            if leaves is not None and position in leaves:
                return leaves[position].clone()  # a copy: an in-place op may not hit a leaf
            if shifts is not None and position in shifts:
                return tensor + shifts[position]
            return tensor.clone()

        self.call.rng.restore()
        args, kwargs = fresh_arguments((self.call.args, self.call.kwargs), argument)
        try:
            with self.mode, torch.set_grad_enabled(leaves is not None):
                output = self.call.module(*args, **kwargs)
        finally:
            self.counter[0] += 1
            if leaves is None:
                self.restore_buffers()
        found = tensor_leaves(output)
        if len(found) != self.call.outputs:
            raise _Unchecked(f"{len(found)} outputs this time, {self.call.outputs} captured")
        return [found[i] if i in self.call.cotangents else None for i in range(len(found))]

    def restore_buffers(self) -> None:
        """The module's buffers as captured (running statistics an evaluation moved)."""
        with torch.no_grad():
            for buffer, saved in self.buffers:
                if not torch.equal(buffer, saved):  # untouched ones keep their version
                    buffer.copy_(saved)

    def contrast(self, g: list[torch.Tensor | None], plus: list[Any], minus: list[Any]) -> float:
        """<g, f(+) - f(-)>, the difference taken entry by entry before the sum (so its
        roundoff is that of the entries, not of the sums)."""
        total = 0.0
        for cotangent, a, b in zip(g, plus, minus, strict=True):
            if cotangent is not None and a is not None and b is not None:
                total += float(((a - b) * cotangent).sum())
        return total

    def kinks(
        self, g: list[torch.Tensor | None], points: list[list[Any]], h: float
    ) -> tuple[list[torch.Tensor | None], float]:
        """``g`` with the output entries whose forward is not smooth along the step set to
        0, and the share of ``|g|`` that left out (the test is valid for any cotangent).

        ``points`` are the outputs at x + t h v for t = 1, 1/2, 0, -1/2, -1. A smooth
        entry's second difference shrinks like h^2 (so f(h) - 2f(0) + f(-h) is four times
        f(h/2) - 2f(0) + f(-h/2), up to h^4); at a kink between the points (a ReLU at 0,
        a max-pool tie) they differ by the jump in slope, whatever h is. Checking the
        scaling, not the size, keeps a curved entry (the loss of a big module) in the test.
        """
        masked: list[torch.Tensor | None] = []
        left_out, total = 0.0, 0.0
        eps = torch.finfo(torch.float64).eps
        for position, cotangent in enumerate(g):
            values = [point[position] for point in points]
            if cotangent is None or any(value is None for value in values):
                masked.append(cotangent)
                continue
            plus, half_plus, base, half_minus, minus = values
            second = plus - 2 * base + minus
            second_half = half_plus - 2 * base + half_minus
            noise = ROUNDOFF_UNITS * eps * sum(value.abs() for value in values)
            slope = (plus - minus).abs() / 2
            rough = (second - 4 * second_half).abs() > noise + KINK * slope
            weight = cotangent.abs()
            total += float(weight.sum())
            if bool(rough.any()):
                left_out += float(weight[rough].sum())
                masked.append(cotangent.masked_fill(rough, 0.0))
            else:
                masked.append(cotangent)
        return masked, left_out / total if total > 0 else 0.0

    def scale(self, g: list[torch.Tensor | None], outputs: list[Any]) -> float:
        """||g * f||_2 at these outputs: the unit of <g, f>'s roundoff."""
        squares = 0.0
        for cotangent, output in zip(g, outputs, strict=True):
            if cotangent is not None and output is not None:
                squares += float((output * cotangent).square().sum())
        return math.sqrt(squares)


class _Unchecked(Exception):
    """A call the local check cannot evaluate again as it ran (said in the verdict)."""


@contextmanager
def _moved(params: Sequence[torch.Tensor], shifts: Sequence[torch.Tensor]) -> Iterator[None]:
    """The parameters moved by ``shifts`` in place, then put back bit for bit."""
    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for p, shift in zip(params, shifts, strict=True):
                p.add_(shift)
        yield
    finally:
        with torch.no_grad():
            for p, value in zip(params, saved, strict=True):
                p.copy_(value)


def _direction(tensor: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random direction shaped like ``tensor``, scaled to its RMS (1 for a zero tensor)."""
    scale = float(tensor.detach().double().square().mean().sqrt()) if tensor.numel() else 1.0
    draw = torch.randn(
        tensor.shape, generator=generator, dtype=torch.float64, device=generator.device
    )
    return (draw.to(tensor.device) * (scale or 1.0)).to(tensor.dtype)


class LocalChecker:
    """The adjoint test of module calls, in the shadow's dtype (float64).

    Args:
        mode: entered around every forward of a module (the shadow's `ShadowMode`, so
            a float32 request yields float64); never around a backward, so that an
            autograd error is raised, not answered.
        threshold: a side fails at or above this ratio in both trials.
        seed: seed of the random directions.
    """

    def __init__(
        self,
        mode: AbstractContextManager[Any],
        threshold: float = LOCAL_THRESHOLD,
        seed: int = 0,
    ) -> None:
        self.mode = mode
        self.threshold = threshold
        self.seed = seed
        self.evaluations = [0]
        self.checked = 0

    def verdict(self, call: ModuleCall) -> ModuleVerdict:
        """The local verdict of one call: each side's ratio and whether it failed."""
        self.checked += 1
        path = call.path
        base = ModuleVerdict(
            module=path, call=call.number, calls=call.calls, class_name=_class_name(call.module)
        )
        if not call.reached:
            return base.model_copy(update={"status": "unreached"})
        try:
            sides = self._sides(_Call(call, self.evaluations, self.mode))
        except _Unchecked as unchecked:
            return base.model_copy(update={"status": "unchecked", "note": str(unchecked)})
        except Exception as error:  # the module cannot be called again on its own
            why = f"{type(error).__name__}: {' '.join(str(error).split())[:160]}"
            return base.model_copy(update={"status": "unchecked", "note": why})
        failed = any(side.failed for side in sides.values())
        unjudged = [name for name, side in sides.items() if side.failed is None]
        status = "fail" if failed else "unchecked" if unjudged else "ok"
        note: str | None = None
        if unjudged and not failed:
            note = f"{' and '.join(unjudged)} side not smooth here (kinks or ties): not judged"

        def ratio(name: str) -> float | None:
            side = sides.get(name)
            return None if side is None or side.ratio != side.ratio else side.ratio

        return base.model_copy(
            update={
                "status": status,
                "note": note,
                "input_ratio": ratio("input"),
                "parameter_ratio": ratio("parameter"),
                "input_failed": "input" in sides and sides["input"].failed is True,
                "parameter_failed": "parameter" in sides and sides["parameter"].failed is True,
            }
        )

    def _sides(self, run: _Call) -> dict[str, SideResult]:
        # On the device of the call's tensors: directions drawn where they are used.
        tensors = [t for t in (*run.params, *run.leaves) if isinstance(t, torch.Tensor)]
        device = tensors[0].device if tensors else torch.device("cpu")
        generator = torch.Generator(device=device).manual_seed(self.seed + 7919 * self.checked)
        with torch.inference_mode(False), torch.enable_grad():
            leaves = {i: run.leaves[i].detach().clone().requires_grad_(True) for i in run.inputs}

            def forward() -> list[torch.Tensor | None]:
                return run.outputs(leaves=leaves)

            vjp = _Vjp(forward, [*leaves.values(), *run.params], run.restore_buffers)
            outputs = vjp.outputs
            full = vjp(run.cotangents)
            base = [None if o is None else o.detach() for o in outputs]
            sides: dict[str, SideResult] = {}
            if leaves:
                inputs = [run.leaves[i] for i in leaves]

                def inputs_at(shifts: list[torch.Tensor]) -> list[Any]:
                    return run.outputs(shifts=dict(zip(leaves, shifts, strict=True)))

                picked = slice(0, len(leaves))
                sides["input"] = self._side(
                    run, vjp, full, picked, inputs, inputs_at, base, generator
                )
            if run.params:

                def params_at(shifts: list[torch.Tensor]) -> list[Any]:
                    with _moved(run.params, shifts):
                        return run.outputs()

                picked = slice(len(leaves), None)
                sides["parameter"] = self._side(
                    run, vjp, full, picked, run.params, params_at, base, generator
                )
        return sides

    def _side(
        self,
        run: _Call,
        vjp: _Vjp,
        full: list[torch.Tensor | None],
        picked: slice,
        tensors: Sequence[torch.Tensor],
        at: Callable[[list[torch.Tensor]], list[Any]],
        base: list[Any],
        generator: torch.Generator,
    ) -> SideResult:
        """Two trials (`STEPS`), each with its own direction: failed when both fail,
        passed when one passes, unchecked (None) when kinks leave a trial without most
        of its cotangent."""
        ratios: list[float] = []
        conclusive = 0
        for trial, h in enumerate(STEPS):
            direction = [_direction(t, generator) for t in tensors]
            plus, minus = at([h * v for v in direction]), at([-h * v for v in direction])
            vjp.stale = True  # the evaluations moved what the graph saved (buffers, parameters)
            if trial == 0:
                # Most calls pass at once: only a failing one pays for the kink analysis.
                ratio, passed = self._judge(
                    run, full, picked, direction, run.cotangents, plus, base, minus, h
                )
                if passed:
                    return SideResult(ratio=ratio, failed=False)
            halves = [at([t * h * v for v in direction]) for t in (0.5, -0.5)]
            g, left_out = run.kinks(run.cotangents, [plus, halves[0], base, halves[1], minus], h)
            if left_out > MOST_LEFT_OUT:
                continue
            conclusive += 1
            grads = vjp(g) if left_out > 0 else full
            ratio, passed = self._judge(run, grads, picked, direction, g, plus, base, minus, h)
            ratios.append(ratio)
            if passed:
                return SideResult(ratio=min(ratios), failed=False)
            if left_out == 0 and ratio >= SURE_RATIO:
                return SideResult(ratio=ratio, failed=True)
        if conclusive < len(STEPS):
            return SideResult(ratio=min(ratios) if ratios else float("nan"), failed=None)
        return SideResult(ratio=min(ratios), failed=True)

    def _judge(
        self,
        run: _Call,
        grads: list[torch.Tensor | None],
        picked: slice,
        direction: list[torch.Tensor],
        g: list[torch.Tensor | None],
        plus: list[Any],
        base: list[Any],
        minus: list[Any],
        h: float,
    ) -> tuple[float, bool]:
        """The ratio of <g, f>'s central difference to <VJP(g), v>, and whether it passes."""
        analytic = sum(
            float((grad * v).sum())
            for grad, v in zip(grads[picked], direction, strict=True)
            if grad is not None
        )
        central = run.contrast(g, plus, minus) / (2 * h)
        forward = run.contrast(g, plus, base) / h
        backward = run.contrast(g, base, minus) / h
        noise = ROUNDOFF_UNITS * torch.finfo(torch.float64).eps * run.scale(g, base) / h
        # A kink crossed inside the module on one side, too small in any one output entry
        # to be seen there, spoils the central difference but not the one-sided difference
        # on the other side.
        passed = any(
            abs(numeric - analytic) <= max(self.threshold * (abs(numeric) + abs(analytic)), noise)
            for numeric in (central, forward, backward)
        )
        return _ratio(central, analytic), passed


class _Vjp:
    """The vector-Jacobian products of one autograd pass of a call, for any cotangent.

    ``forward`` runs the call with autograd on; it runs again when the graph is
    ``stale`` (parameters it saved were moved in place since)."""

    def __init__(
        self,
        forward: Callable[[], list[torch.Tensor | None]],
        wanted: list[torch.Tensor],
        after_backward: Callable[[], None],
    ) -> None:
        self.forward = forward
        self.wanted = wanted
        self.after_backward = after_backward
        """Puts the buffers back, once the backward no longer needs them as they were."""
        try:
            self.outputs = forward()
        except BaseException:
            after_backward()
            raise
        self.stale = False

    def __call__(self, g: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        try:
            if self.stale:
                self.outputs, self.stale = self.forward(), False
            return self._grads(g)
        finally:
            self.after_backward()

    def _grads(self, g: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        pairs = [
            (output, cotangent)
            for output, cotangent in zip(self.outputs, g, strict=True)
            if output is not None and cotangent is not None and output.requires_grad
        ]
        if not pairs or not self.wanted:
            return [None] * len(self.wanted)
        grads = torch.autograd.grad(
            [output for output, _ in pairs],
            self.wanted,
            grad_outputs=[cotangent.to(output.dtype) for output, cotangent in pairs],
            retain_graph=True,
            allow_unused=True,
        )
        return list(grads)


def _ratio(numeric: float, analytic: float) -> float:
    denominator = abs(numeric) + abs(analytic)
    return abs(numeric - analytic) / denominator if denominator > 0 else 0.0


def _class_name(module: nn.Module) -> str:
    return type(module).__name__


def custom_functions(
    call: ModuleCall, mode: AbstractContextManager[Any], limit: int = 2000
) -> list[str]:
    """Names of the custom ``autograd.Function``s in the call's own backward graph."""
    run = _Call(call, [0], mode)
    with torch.inference_mode(False), torch.enable_grad():
        leaves = {i: run.leaves[i].detach().clone().requires_grad_(True) for i in run.inputs}
        try:
            outputs = run.outputs(leaves=leaves)
        except Exception:
            return []
        finally:
            run.restore_buffers()
    names: list[str] = []
    stack = [o.grad_fn for o in outputs if o is not None and o.grad_fn is not None]
    seen: set[int] = set()
    while stack and len(seen) < limit:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, torch.autograd.function.BackwardCFunction):
            name = type(node).__name__.removesuffix("Backward")
            if name not in names:
                names.append(name)
        stack.extend(next_node for next_node, _ in node.next_functions if next_node is not None)
    return names
