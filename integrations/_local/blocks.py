"""The module-local mode: a check whose float64 work is one block at a time.

A whole-model check holds a float64 copy of the model (3.4 copies of the parameters at
its peak, 12 training steps of time at 124M). In the module-local mode no such copy
exists:

1. One forward+backward of the step's J on the real model, in its own precision, with
   the step's random draws replayed (`capture_blocks`). It runs on detached views of the
   parameters and on copies of the buffers (``torch.func``'s reparametrization), so it
   never touches ``.grad``, a parameter's hooks, a running statistic, a mode or an RNG.
   It keeps, for each chosen block, its call's inputs and the gradient arriving at its
   outputs (the cotangent), and the gradient of J for the block's parameters.
2. For each chosen block, a float64 copy of that block only and the adjoint test of
   `LocalChecker` (`gradwatch.integrations._local.adjoint`) on a few examples of the
   captured inputs; a failing block is searched down to the module that is wrong.
3. The step link: the optimizer's ``.grad`` of the chosen blocks' parameters against
   the capture pass's gradient of the same J (same precision, same draws).

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
from copy import deepcopy as copy_module
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from gradwatch.integrations._local.adjoint import LOCAL_THRESHOLD, STEPS, LocalChecker
from gradwatch.integrations._local.capture import (
    ModuleCall,
    capture_calls,
    fresh_arguments,
    tensor_leaves,
)
from gradwatch.integrations._local.search import search, suspect_of
from gradwatch.integrations._parallel.ranks import Ranks
from gradwatch.integrations._parallel.sharded import is_sharded
from gradwatch.integrations._shadow.loss import LossFn, scalar_of
from gradwatch.integrations._shadow.mode import ShadowMode
from gradwatch.integrations._shadow.model import (
    RngState,
    Shadow,
    trainable_parameters,
    untouched_globals,
)
from gradwatch.integrations._step import STEP_TOLERANCES, LinkSums, MicroBatch, judged_link
from torch import nn
from torch.nn.utils.stateless import _reparametrize_module

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
    "LOCAL_EXAMPLES",
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

LOCAL_EXAMPLES = 2
"""Examples of the captured batch a block's local check runs on (tensors whose leading
size is the batch's are sliced). The adjoint test holds for any input, so fewer examples
cannot make a false alarm; they make the float64 work (and its memory: a language
model's head outputs batch x sequence x vocabulary) a fraction of the batch's."""

COMPACT_ROWS = 1024
"""A vocabulary-sized embedding or head is checked on at most about this many rows (see
`_compact`)."""

LINK_LARGEST = 4_000_000
"""The step link of a module-local check leaves out a tensor larger than this and than
1/`BLOCK_SHARE` of the parameters (a GPT-2's 38.6M-entry embedding), noted."""

COLLECT_PARAMETERS = 1_000_000
"""A block larger than this (8 MB in float64) is garbage-collected right after its check."""

MAX_CALLS_PER_BLOCK = 60
"""Module calls the search inside one failing block checks at most."""

CALLS_PER_BLOCK = 2
"""Calls of one block (a module called several times) checked at most per check."""


def resolve_mode(
    model: nn.Module, mode: CheckMode, *, precision: str = "float64", analytic: str = "recompute"
) -> Literal["whole", "local"]:
    """Which check runs: ``mode`` as given, or for ``"auto"`` local from
    `AUTO_LOCAL_MIN_PARAMETERS` parameters (whole for a distributed or sharded model, a
    native-precision or ``analytic="live"`` check: the local mode does neither)."""
    checked = checked_mode(mode)
    if checked != "auto":
        return checked
    if precision != "float64" or analytic != "recompute":
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


@dataclass
class _Captured:
    """What the capture pass kept: the chosen blocks' calls and J's gradient for their
    parameters (by name), and J's value."""

    calls: dict[str, list[ModuleCall]]
    gradients: dict[str, torch.Tensor | None]
    loss: float
    left_out: list[str]
    """Parameters of the chosen blocks the step link leaves out (vocabulary-sized)."""


def capture_blocks(
    model: nn.Module,
    loss_fn: LossFn,
    micro_batches: Sequence[MicroBatch],
    blocks: Sequence[str],
) -> _Captured:
    """One forward+backward of J = sum_i w_i loss_fn(model, b_i) in the model's precision,
    keeping the chosen blocks' calls of the last micro-batch (inputs copied, RNG state,
    output cotangents) and J's gradient for their parameters.

    The model's parameters are replaced for the pass by detached views (no ``.grad``
    written, no hook of theirs run) and its buffers by copies (running statistics
    untouched); every RNG, mode and torch setting is put back.
    """
    modules = dict(model.named_modules())
    wanted = {id(modules[path]): path for path in blocks}
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    leaves = {
        name: p.detach().requires_grad_(p.requires_grad) for name, p in model.named_parameters()
    }
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    inside = [name for name in names if any(_inside(name, path) for path in blocks)]
    sizes = dict(model.named_parameters())
    large = max(sum(sizes[n].numel() for n in names) / BLOCK_SHARE, LINK_LARGEST)
    # A vocabulary-sized tensor's gradient (a tied embedding sums two dense ones) would be
    # the capture pass's largest allocation, held with every activation: left out.
    chosen_names = [name for name in inside if sizes[name].numel() <= large]
    left_out = [name for name in inside if name not in chosen_names]
    calls: dict[str, list[ModuleCall]] = {path: [] for path in blocks}
    outputs: list[tuple[ModuleCall, int, torch.Tensor]] = []
    recording = [False]

    def before(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        path = wanted.get(id(module))
        if path is None or not recording[0] or len(calls[path]) >= CALLS_PER_BLOCK:
            return
        found = tensor_leaves((args, kwargs))
        calls[path].append(
            ModuleCall(
                path=path,
                module=module,
                number=len(calls[path]),
                args=fresh_arguments(args),
                kwargs=fresh_arguments(kwargs),
                differentiable=frozenset(
                    i for i, t in enumerate(found) if t.is_floating_point() and t.requires_grad
                ),
                rng=RngState.capture(),
            )
        )

    def after(
        module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> None:
        path = wanted.get(id(module))
        if path is None or not recording[0] or not calls[path] or calls[path][-1].outputs:
            return
        call = calls[path][-1]
        found = tensor_leaves(output)
        call.outputs = len(found)
        for position, tensor in enumerate(found):
            if tensor.is_floating_point() and tensor.requires_grad:
                outputs.append((call, position, tensor))

    handles = []
    for path in blocks:
        handles.append(modules[path].register_forward_pre_hook(before, with_kwargs=True))
        handles.append(modules[path].register_forward_hook(after, with_kwargs=True))
    device = next(iter(leaves.values())).device.type
    total: torch.Tensor | None = None
    try:
        with (
            untouched_globals(model),
            _reparametrize_module(model, {**leaves, **buffers}, tie_weights=True),
            torch.enable_grad(),
        ):
            for index, micro in enumerate(micro_batches):
                if micro.rng is not None:
                    micro.rng.restore()
                recording[0] = index == len(micro_batches) - 1
                autocast = micro.autocast is not None
                with torch.autocast(device, dtype=micro.autocast, enabled=autocast):
                    term = (
                        micro.weight
                        * scalar_of(loss_fn(model, micro.batch), "loss_fn(model, batch)").float()
                    )
                total = term if total is None else total + term
            assert total is not None
            wrt = [tensor for _, _, tensor in outputs] + [leaves[n] for n in chosen_names]
            grads: Sequence[torch.Tensor | None] = [None] * len(wrt)
            if total.requires_grad and wrt:
                grads = torch.autograd.grad(total, wrt, allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    for (call, position, _), grad in zip(outputs, grads, strict=False):
        if grad is not None:
            call.cotangents[position] = grad.detach()
    gradients = dict(zip(chosen_names, grads[len(outputs) :], strict=True))
    for path_calls in calls.values():
        for call in path_calls:
            call.calls = len(path_calls)
    return _Captured(calls, gradients, float(total.detach()), left_out)


def _inside(name: str, path: str) -> bool:
    return path == "" or name == path or name.startswith(path + ".")


def _examples(call: ModuleCall, count: int) -> tuple[Any, Any, dict[int, torch.Tensor], int | None]:
    """The call's arguments (float64, the differentiable ones requiring grad) and
    cotangents (float64), cut to the first ``count`` examples where the batch is larger."""
    found = tensor_leaves((call.args, call.kwargs))
    batch = found[0].shape[0] if found and found[0].dim() > 0 else None
    cut = batch is not None and batch > count

    def slice_(tensor: torch.Tensor) -> torch.Tensor:
        if cut and tensor.dim() > 0 and tensor.shape[0] == batch:
            return tensor[:count]
        return tensor

    def convert(position: int, tensor: torch.Tensor) -> torch.Tensor:
        tensor = slice_(tensor.detach())
        if not tensor.is_floating_point():
            return tensor.clone()
        copied = tensor.to(torch.float64, copy=True)
        return copied.requires_grad_(position in call.differentiable)

    args, kwargs = fresh_arguments((call.args, call.kwargs), convert)
    cotangents = {p: slice_(c).to(torch.float64) for p, c in call.cotangents.items()}
    return args, kwargs, cotangents, count if cut else None


def _check_block(
    call: ModuleCall, seed: int, threshold: float
) -> tuple[list[ModuleSuspect], list[ModuleVerdict], int, list[str], int | None]:
    """The local checks of one captured block call on a float64 copy of that block only:
    the block itself, and when it fails, the search down to the module that is wrong.
    Returns suspects, verdicts (paths from the model), module evaluations, notes and the
    examples checked."""
    args, kwargs, cotangents, examples = _examples(call, LOCAL_EXAMPLES)
    module, args, cotangents, compacted = _compact(call.module, args, cotangents, seed)
    shadow = Shadow(module, "float64")
    mode = ShadowMode(torch.float64, shadow.held_padding_rows(), shadow.native_dtype)

    def backward() -> None:
        call.rng.restore()
        with torch.enable_grad():
            # Copies of the leaves: an in-place op in the block may not write into a leaf.
            fresh, named = fresh_arguments((args, kwargs), lambda _, tensor: tensor.clone())
            with mode:  # forwards only: an autograd error must be raised, not answered
                output = shadow.module(*fresh, **named)
            found = tensor_leaves(output)
            pairs = [
                (found[p], g)
                for p, g in cotangents.items()
                if p < len(found) and found[p].requires_grad
            ]
            if pairs:
                torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])

    with torch.inference_mode(False):
        try:
            tops = capture_calls(shadow.module, backward)
        finally:
            for p in shadow.module.parameters():
                p.grad = None
        checker = LocalChecker(mode, threshold, seed)
        found, verdicts, notes = search(tops, checker, MAX_CALLS_PER_BLOCK)
        suspects = [suspect_of(c, v, mode) for c, v in found]
    prefix = call.path

    def full(path: str) -> str:
        return f"{prefix}.{path}" if prefix and path else prefix or path

    verdicts = [
        v.model_copy(update={"module": full(v.module), "call": call.number, "calls": call.calls})
        if v.module == ""
        else v.model_copy(update={"module": full(v.module)})
        for v in verdicts
    ]
    suspects = [s.model_copy(update={"module": full(s.module)}) for s in suspects]
    if compacted:
        notes = [f"{call.path}: {compacted}", *notes]
    return suspects, verdicts, checker.evaluations[0], notes, examples


def _compact(
    module: nn.Module, args: Any, cotangents: dict[int, torch.Tensor], seed: int
) -> tuple[nn.Module, Any, dict[int, torch.Tensor], str]:
    """A vocabulary-sized block made small, and what was done (\"\" when nothing).

    An embedding keeps the rows its (sliced) input ids use, the ids renumbered; a linear
    layer with more than `COMPACT_ROWS` outputs (a language model's head) keeps that many
    random output rows, its cotangent cut alike. The copy runs the block's own code (its
    class, its forward) on fewer rows: the adjoint test holds for it as for the whole, and
    the float64 copy and the test's directions shrink from the vocabulary's size to these
    rows' (a GPT-2's embedding: 38.6M parameters, 1.5 GB of float64 work at its peak).
    """
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return module, args, cotangents, ""
    if isinstance(module, nn.Embedding) and weight.shape[0] > COMPACT_ROWS:
        ids = args[0] if isinstance(args, tuple) and args else None
        if not isinstance(ids, torch.Tensor) or ids.is_floating_point():
            return module, args, cotangents, ""
        rows = torch.unique(ids)
        copy = _with_rows(module, rows)
        if module.padding_idx is not None:
            kept = (rows == module.padding_idx).nonzero()
            copy.padding_idx = int(kept[0, 0]) if len(kept) else None
        copy.num_embeddings = len(rows)
        args = (torch.searchsorted(rows, ids), *args[1:])
        return (
            copy,
            args,
            cotangents,
            f"checked on the {len(rows)} rows its input uses (of {weight.shape[0]})",
        )
    if isinstance(module, nn.Linear) and weight.shape[0] > COMPACT_ROWS and set(cotangents) <= {0}:
        generator = torch.Generator(device=weight.device).manual_seed(seed)
        rows = torch.randperm(weight.shape[0], generator=generator, device=weight.device)
        rows = rows[:COMPACT_ROWS].sort().values
        copy = _with_rows(module, rows)
        copy.out_features = COMPACT_ROWS
        cut = {p: g.index_select(-1, rows.to(g.device)) for p, g in cotangents.items()}
        return (
            copy,
            args,
            cut,
            f"checked on {COMPACT_ROWS} random output rows (of {weight.shape[0]})",
        )
    return module, args, cotangents, ""


def _with_rows(module: nn.Module, rows: torch.Tensor) -> Any:
    """A copy of ``module`` whose weight (and bias) keep only ``rows`` (the full tensors
    never copied)."""
    memo: dict[int, Any] = {}
    for name in ("weight", "bias"):
        tensor = getattr(module, name, None)
        if isinstance(tensor, torch.Tensor) and tensor.dim() > 0:
            kept = tensor.detach().index_select(0, rows.to(tensor.device)).clone()
            memo[id(tensor)] = nn.Parameter(kept, requires_grad=tensor.requires_grad)
    return copy_module(module, memo)


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
    link = _block_link(model, captured, micro, clip_factor) if step_batches else None
    captured.gradients.clear()
    suspects: list[ModuleSuspect] = []
    verdicts: list[ModuleVerdict] = []
    search_notes: list[str] = []
    evaluations = 0
    examples: int | None = None
    with untouched_globals(model):
        for path in chosen:
            for index, call in enumerate(captured.calls[path]):
                found, checked, spent, more, cut = _check_block(
                    call, seed + 104729 * (done + index), threshold
                )
                suspects += found
                verdicts += checked
                evaluations += spent
                search_notes += more
                examples = cut if cut is not None else examples
                # The block's float64 copy sits in reference cycles (captured calls point
                # at their parents): a large one is freed now, not at a later collection
                # (a full collection costs about 0.1 s: not worth it for a small block).
                if sum(p.numel() for p in call.module.parameters()) > COLLECT_PARAMETERS:
                    gc.collect()
    ratio = max((_largest(v) for v in verdicts), default=0.0)
    failed = bool(suspects) or any(v.status == "fail" for v in verdicts)
    unreached = [p for p in chosen if not captured.calls[p]]
    result_notes = [
        f"module-local check (mode='local'): blocks {', '.join(p or '(model)' for p in chosen)} "
        f"of {len(blocks)}, each on a float64 copy of that block only, at the step's "
        f"activations ({examples or 'all'} example(s)); the blocks rotate, so every block "
        f"is covered once every {math.ceil(len(blocks) / max(len(chosen), 1))} checks; the "
        "loss and the model's own code between blocks are not checked in this mode",
        *notes,
    ]
    if unreached:
        result_notes.append(f"not called in the step's forward: {', '.join(unreached)}")
    if step_batches and captured.left_out:
        result_notes.append(
            "step link: vocabulary-sized tensors left out (their gradient would be the "
            f"check's largest allocation): {', '.join(captured.left_out)}"
        )
    localization = Localization(
        suspects=suspects,
        modules=verdicts,
        evaluations=evaluations,
        checks=len(verdicts),
        seconds=time.perf_counter() - started,
        threshold=threshold,
        notes=search_notes,
    )
    status = "fail" if failed else "ok"
    verdict = (
        f"fail by the module-local rule: {suspects[0].module or '(model)'} local ratio "
        f"{suspects[0].ratio:.3g} >= {threshold:g}"
        if failed and suspects
        else f"{status}: every module call checked passes its local check (largest local "
        f"ratio {ratio:.3g} < {threshold:g})"
    )
    size = sum(p.numel() for p in trainable_parameters(model).values())
    result = CheckResult(
        ratio=ratio,
        status=status,
        tensors={},
        worst=[],
        eps=STEPS[0],
        eps_policy="local: each tensor's RMS x 1e-6, then 1e-7",
        checked=len(verdicts),
        size=size,
        loss=captured.loss,
        loss_evals=evaluations,
        seconds=time.perf_counter() - started,
        regularization={},
        mode="local",
        dtype="float64",
        warn=threshold / 10,
        threshold=threshold,
        seed=seed,
        notes=result_notes,
        verdict=verdict,
        rule="global" if failed else "none",
        rule_ratio=ratio,
        localization=localization,
        coverage=Coverage(
            modules=chosen, blocks=len(blocks), per_check=configured, examples=examples
        ),
    )
    return result, link


CHUNK = 1 << 20
"""Entries of a gradient converted to float64 at a time (the step link's sums)."""


def _dot(first: torch.Tensor | None, second: torch.Tensor | None) -> float:
    """<first, second> in float64, a chunk at a time (never a float64 copy of a whole
    vocabulary-sized gradient); 0 when either is missing."""
    if first is None or second is None:
        return 0.0
    a, b = first.detach().reshape(-1), second.detach().reshape(-1)
    return sum(
        float((a[i : i + CHUNK].double() * b[i : i + CHUNK].double()).sum())
        for i in range(0, a.numel(), CHUNK)
    )


def _distance(got: torch.Tensor | None, want: torch.Tensor | None, clip: float) -> float:
    """||got / clip - want||^2 in float64, a chunk at a time (a missing one is zeros)."""
    if got is None or want is None:
        present = got if got is not None else want
        scale = clip if got is not None else 1.0
        return _dot(present, present) / scale**2 if present is not None else 0.0
    a, b = got.detach().reshape(-1), want.detach().reshape(-1)
    return sum(
        float((a[i : i + CHUNK].double() / clip - b[i : i + CHUNK].double()).square().sum())
        for i in range(0, a.numel(), CHUNK)
    )


def _largest(verdict: ModuleVerdict) -> float:
    ratios = [r for r in (verdict.input_ratio, verdict.parameter_ratio) if r is not None]
    return max(ratios, default=0.0)


def _block_link(
    model: nn.Module,
    captured: _Captured,
    micro: Sequence[MicroBatch],
    clip_factor: float | None,
) -> StepLink:
    """The chosen blocks' ``.grad`` against the capture pass's gradient of J (the same
    precision and draws as training: tolerances of the training dtype)."""
    sources = trainable_parameters(model)
    dtypes = [next(iter(sources.values())).dtype]
    dtypes += [m.autocast for m in micro if m.autocast is not None]
    warn, threshold = max(STEP_TOLERANCES.get(d, STEP_TOLERANCES[torch.float32]) for d in dtypes)
    names = [n for n in captured.gradients if n in sources]
    if clip_factor is None:
        ours = sum(_dot(captured.gradients[n], captured.gradients[n]) for n in names)
        theirs = sum(_dot(sources[n].grad, sources[n].grad) for n in names)
        clip_factor = math.sqrt(theirs / ours) if ours > 0 else 1.0
    sums = LinkSums({}, {}, {}, {})
    for name in names:
        got, want = sources[name].grad, captured.gradients[name]
        if got is not None and got.layout != torch.strided:
            got = got.to_dense()
        gg, ww, gw = _dot(got, got), _dot(want, want), _dot(got, want)
        gg, gw = gg / clip_factor**2, gw / clip_factor
        sums.optimizer[name], sums.objective[name], sums.dot[name] = gg, ww, gw
        sums.difference[name] = _distance(got, want, clip_factor)
    return judged_link(sums, warn, threshold, len(micro), clip_factor)


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
        return result.model_copy(update={"seconds": time.perf_counter() - started})

    return run


def checked_mode(mode: object) -> CheckMode:
    """``mode`` when it is one of `MODES`, else an `OptionError` saying what is expected."""
    if mode not in MODES:
        raise OptionError(f"mode: expected one of {', '.join(map(repr, MODES))}, received {mode!r}")
    return mode
