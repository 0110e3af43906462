"""One block's module-local check, on a float64 copy of that block only.

`check_block` takes a block call captured by `gradwatch.integrations._local.block_pass`,
cuts its inputs and output cotangents to a few examples (`LOCAL_EXAMPLES`), makes a
vocabulary-sized embedding or head small (`COMPACT_ROWS`), copies the block to float64
and runs the adjoint test of `LocalChecker` on it, searching down to the wrong module
when it fails. The adjoint test holds for any input and any cotangent, so neither cut
can make a false alarm; they make the float64 work a fraction of the batch's.
"""

from __future__ import annotations

from copy import deepcopy as copy_module
from typing import Any

import torch
from gradwatch.integrations._local.adjoint import LocalChecker
from gradwatch.integrations._local.capture import (
    ModuleCall,
    fresh_arguments,
    tensor_leaves,
)
from gradwatch.integrations._local.search import captured_and_searched
from gradwatch.integrations._shadow.mode import ShadowMode
from gradwatch.integrations._shadow.model import Shadow
from torch import nn

from gradwatch.result import ModuleSuspect, ModuleVerdict

__all__ = ["COMPACT_ROWS", "LOCAL_EXAMPLES", "MAX_CALLS_PER_BLOCK", "check_block"]

LOCAL_EXAMPLES = 2
"""Examples of the captured batch a block's local check runs on (tensors whose leading
size is the batch's are sliced). The adjoint test holds for any input, so fewer examples
cannot make a false alarm; they make the float64 work (and its memory: a language
model's head outputs batch x sequence x vocabulary) a fraction of the batch's."""

COMPACT_ROWS = 1024
"""A vocabulary-sized embedding or head is checked on at most about this many rows (see
`_compact`)."""

MAX_CALLS_PER_BLOCK = 60
"""Module calls the search inside one failing block checks at most."""


def check_block(
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

    checker = LocalChecker(mode, threshold, seed)
    _, suspects, verdicts, notes = captured_and_searched(
        shadow.module, backward, mode, checker, MAX_CALLS_PER_BLOCK
    )
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
