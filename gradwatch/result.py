"""What a check returns: pydantic models at the edge, filled from plain numpy in `check`."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

__all__ = [
    "CheckResult",
    "Component",
    "Coverage",
    "Diagnosis",
    "Localization",
    "ModuleSuspect",
    "ModuleVerdict",
    "Status",
    "StepLink",
    "SuspectKind",
    "TensorResult",
]

Status = Literal["ok", "warn", "fail", "nondeterministic", "error"]
"""``"error"``: the check itself could not run (an exception inside it); see `CheckResult.error`."""
Diagnosis = Literal["bug", "truncation", "roundoff", "kink", "nondeterministic"]
Mode = Literal["full", "sampled", "directional", "local"]
"""``"local"``: module-local checks of a few blocks (no whole-model J); see `Coverage`."""
Rule = Literal["global", "per-tensor", "non-finite", "step", "none"]
"""Which rule set a check's status: the global ratio, a tensor's own ratio, a non-finite
value in theta, the gradient or J (a failed check without a ratio), or none (ok, an
error, nondeterministic)."""

# Infinity and NaN are written as JSON constants so they survive a round trip
# (pydantic's default would write them as null).
_MODEL_CONFIG = ConfigDict(ser_json_inf_nan="constants", extra="forbid")


class Component(BaseModel):
    """One checked component of theta, e.g. ``W2[0, 3]``."""

    model_config = _MODEL_CONFIG

    tensor: str
    index: list[int]
    name: str
    analytic: float
    numeric: float
    abs_error: float
    rel_error: float
    diagnosis: Diagnosis | None = None
    """Label from re-evaluating with a second step size; None when not diagnosed."""


class TensorResult(BaseModel):
    """The verdict for one named tensor."""

    model_config = _MODEL_CONFIG

    ratio: float | None
    """The tensor's own ratio; None when it was not checked on its own (the joint screen
    of ``"auto"`` moved every tensor together: only the check's ``ratio`` was measured)."""
    checked: int
    size: int
    max_abs_error: float
    status: Status
    below_resolution: bool = False
    """The tensor's gradient is below what J's differences resolve: its ratio is judged
    against that resolution (``NOISE_UNITS`` roundoff units over ``warn``), not itself."""


class StepLink(BaseModel):
    """The training step's link: the gradient the optimizer gets against the gradient of J.

    Backprop (the finite-difference check) can be right while the step is wrong: an
    accumulation normalization, a missing ``zero_grad``, a hook that changes ``.grad``,
    a loss divided twice. This compares the trainer's ``.grad`` (before clipping) with
    the float64 autograd gradient of the step's objective over every micro-batch, the
    dropout draws replayed as they happened: a gradient-to-gradient comparison, no
    finite differences. Its tolerances follow the training precision.
    """

    model_config = _MODEL_CONFIG

    ratio: float
    """||g_opt - g_J|| / (||g_opt|| + ||g_J||) over every trainable tensor."""
    status: Status
    warn: float
    threshold: float
    scale: float
    """The least-squares factor g_opt ~ scale * g_J (1 when the step is right)."""
    tensors: dict[str, float]
    """Each tensor's own ratio."""
    worst_tensor: str | None = None
    micro_batches: int = 1
    clip_factor: float = 1.0
    """The factor the trainer's clipping applied to ``.grad`` (undone before comparing)."""
    explanation: str = ""
    """What the disagreement looks like, in words (``"the optimizer's gradient is 2x
    ...: loss divided twice?"``); empty when the link holds."""


SuspectKind = Literal["custom autograd.Function", "leaf", "glue", "outside"]
"""Where in a module the bug is: its own backward (a custom ``autograd.Function`` named in
``functions``, or another leaf op), the glue code of its own forward (every submodule
call passed), or outside every module (the loss function's code, a penalty)."""
LocalStatus = Literal["ok", "fail", "unreached", "unchecked"]
"""A module call's local verdict; ``unreached``: no gradient arrived at its outputs (no
backward to check); ``unchecked``: it could not be called again on its own (``note``)."""
Side = Literal["input", "parameter", "both"]


class ModuleVerdict(BaseModel):
    """The local check of one module call: its backward against its forward's derivative."""

    model_config = _MODEL_CONFIG

    module: str
    """The module's path in the model (``"model.layers.0.mlp"``; ``""`` the model itself)."""
    class_name: str
    call: int = 0
    """Which call of the module (0 for the first), when it ran several times in J."""
    calls: int = 1
    status: LocalStatus = "ok"
    input_ratio: float | None = None
    """|numeric - analytic| / (|numeric| + |analytic|) of <g, f> along a random direction in
    the inputs; None when no input carries a gradient."""
    parameter_ratio: float | None = None
    input_failed: bool = False
    parameter_failed: bool = False
    note: str | None = None


class ModuleSuspect(BaseModel):
    """The module where the bug is: a failing call whose checked submodule calls all pass."""

    model_config = _MODEL_CONFIG

    module: str
    class_name: str
    kind: SuspectKind
    functions: list[str] = []
    """The custom ``autograd.Function``s in the module's own backward graph."""
    ratio: float
    """The failing side's local ratio (the larger, when both fail)."""
    side: Side
    input_ratio: float | None = None
    parameter_ratio: float | None = None
    call: int = 0
    calls: int = 1

    def describe(self) -> str:
        """In words: ``the backward of m (GELUTanh, a custom autograd.Function ...): ...``."""
        if self.kind == "outside":
            return (
                "the loss function's own code, outside the model's modules (every module "
                "passes its local check): a hand-written loss or penalty gradient?"
            )
        name = self.module or "the model itself"
        which = f", call {self.call + 1} of {self.calls}" if self.calls > 1 else ""
        what = {
            "custom autograd.Function": "a custom autograd.Function"
            + (f" {', '.join(self.functions)}" if self.functions else ""),
            "leaf": "a module without submodules",
            "glue": "its own forward, outside its submodules, which all pass",
        }[self.kind]
        part = "the forward code of" if self.kind == "glue" else "the backward of"
        gradient = {
            "input": "its input gradient",
            "parameter": "its parameter gradient",
            "both": "its input and parameter gradients each",
        }[self.side]
        return (
            f"{part} {name} ({self.class_name}{which}, {what}): {gradient} differs from the "
            f"derivative of its forward (local ratio {self.ratio:.3g})"
        )


class Localization(BaseModel):
    """Where a failing check's bug is, from module-local checks at the step's activations."""

    model_config = _MODEL_CONFIG

    suspects: list[ModuleSuspect]
    modules: list[ModuleVerdict]
    """Every module call the search checked, in the order it checked them."""
    evaluations: int
    """Module forward passes the search ran (each far cheaper than J)."""
    checks: int
    seconds: float
    threshold: float
    notes: list[str] = []


class Coverage(BaseModel):
    """What a module-local check (``mode="local"``) covered: blocks rotate across checks."""

    model_config = _MODEL_CONFIG

    modules: list[str]
    """The blocks checked at this step (module paths; "" is the model itself)."""
    blocks: int
    """The blocks the model is divided into (over ``blocks / per_check`` checks, all)."""
    per_check: int
    """Blocks a check covers as configured (a budget may cover fewer)."""
    examples: int | None = None
    """Examples of the batch the local checks ran on (None: all of it)."""


class CheckResult(BaseModel):
    """The outcome of one gradient check.

    ``ratio`` is ||numeric - analytic|| / (||numeric|| + ||analytic||) over the
    checked components (0 when both norms are 0). ``status`` is the worse of the
    global verdict and the per-tensor verdicts. In directional mode each "component"
    is one tensor's directional derivative, and ``checked`` also counts the
    components sampled to localize a flagged tensor.

    A check that could not run (an exception inside it, recorded by
    `gradwatch.GradWatch.run_check`) has ``status="error"``, the exception in ``error``,
    the part of gradwatch that was running in ``error_source``, ``ratio`` and ``loss``
    NaN, no tensors or components, and ``loss_evals=0``.
    """

    model_config = _MODEL_CONFIG

    ratio: float
    status: Status
    tensors: dict[str, TensorResult]
    worst: list[Component]
    eps: float
    eps_policy: str
    checked: int
    size: int
    loss: float
    loss_evals: int
    seconds: float
    regularization: dict[str, float]
    step: int | None = None
    mode: Mode = "full"
    dtype: str = "float64"
    warn: float = 1e-5
    threshold: float = 1e-3
    seed: int = 0
    notes: list[str] = []
    verdict: str | None = None
    """Which rule set ``status`` (global ratio or a tensor's own ratio), with its number,
    e.g. ``"fail by the per-tensor rule: act2.beta (ratio 0.0476) >= threshold 0.001; the
    global ratio 0.0004 is below it ..."``. With ``rule="step"`` (the training step's link
    failed while backprop passed) it is backprop's sentence; the link's numbers are in
    ``step_link``. None in reports written before it existed."""
    rule: Rule | None = None
    """The rule behind ``verdict``, as data; ``rule_ratio`` is its number (the global
    ratio, or the largest flagged tensor's ratio). None in reports written before it."""
    rule_ratio: float | None = None
    below_resolution: bool = False
    """The whole gradient is below what J's finite differences resolve (at or near an
    optimum): the ratio is judged against that resolution, never noise over noise."""
    resolution: float | None = None
    """The denominator floor the ratio used: ``NOISE_UNITS`` times the roundoff of the
    numeric gradient (eps_J |J| / h per component) over ``warn``."""
    rounding_step: float | None = None
    """When J's values are whole multiples of a step coarser than its dtype (J computed
    in float32 or quantized), that step; the resolution follows it."""
    non_finite: str | None = None
    """What was not finite at a due step (``"gradient in tensor W1 (2 of 12 entries,
    first [0, 3]: nan)"``); the check then fails without a ratio (``status="fail"``)."""
    error: str | None = None
    """The exception (``"RuntimeError: mixed dtype (CPU)"``) when ``status="error"``."""
    error_source: str | None = None
    """Which part of gradwatch raised it (``"gradwatch.check"``) when ``status="error"``."""
    step_link: StepLink | None = None
    """The training step's link (the optimizer's gradient against the gradient of J),
    when a framework callback or ``after_backward(step_check=True)`` compared it; its
    failure fails the check."""
    localization: Localization | None = None
    """Where the bug is (module-local checks), when a failing check of a torch model
    searched its modules; the per-tensor ratios stay measurements, never a pointer."""
    coverage: Coverage | None = None
    """The blocks a module-local check (``mode="local"``) covered at this step."""

    @property
    def failed(self) -> bool:
        """True when this check should raise an alert."""
        return self.status == "fail"
