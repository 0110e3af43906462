"""Cost of a failing check: loss evaluations and seconds under ``sample="auto"``.

    OMP_NUM_THREADS=1 python -m benchmarks.failing_check

A tiny GPT-2 (``GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2,
n_positions=16)``, about 30k parameters) with a planted backprop bug, checked by
``check_module(..., sample="auto")``: the status, which tensors failed, the worst
component, loss evaluations and seconds. Bugs:

- ``gelu``: the MLP activation of block 0 is a custom ``autograd.Function`` whose
  backward is 10% too large (every tensor upstream of it gets a wrong gradient);
- ``entry``: one entry of block 1's MLP output weight gets a wrong gradient (a
  gradient hook on the shadow would be lost, so the bug is a custom function).
"""

from __future__ import annotations

import argparse
import time
from typing import Any, cast

import torch
from gradwatch.integrations.torch import check_module
from torch import nn

PLANTED_ENTRY = (3, 7)


class LoudGelu(torch.autograd.Function):
    """GELU (tanh form) whose backward is 10% too large."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return nn.functional.gelu(x, approximate="tanh")

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        with torch.enable_grad():
            y = x.detach().requires_grad_(True)
            (slope,) = torch.autograd.grad(nn.functional.gelu(y, approximate="tanh").sum(), y)
        return 1.1 * grad_output * slope  # type: ignore[no-any-return]


class LoudGeluModule(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return LoudGelu.apply(x)  # type: ignore[no-untyped-call,no-any-return]


class OffByOneEntry(torch.autograd.Function):
    """x @ W + b (GPT-2's Conv1D) whose weight gradient is wrong in one entry."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return x @ weight + bias

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x, weight = ctx.saved_tensors
        flat_x = x.reshape(-1, x.shape[-1])
        flat_g = grad_output.reshape(-1, grad_output.shape[-1])
        grad_weight = flat_x.t() @ flat_g
        wrong = grad_weight.clone()
        wrong[PLANTED_ENTRY] += 0.5 * grad_weight.abs().max()
        return grad_output @ weight.t(), wrong, flat_g.sum(0)


class PlantedConv1D(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.weight = inner.weight
        self.bias = inner.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return OffByOneEntry.apply(x, self.weight, self.bias)  # type: ignore[no-untyped-call,no-any-return]


def build(bug: str | None, seed: int = 0) -> tuple[nn.Module, Any]:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=16)
    config.attn_pdrop = config.embd_pdrop = config.resid_pdrop = 0.0
    model = GPT2LMHeadModel(config)
    if bug == "gelu":
        cast(Any, model.transformer.h[0].mlp).act = LoudGeluModule()
    elif bug == "entry":
        mlp: Any = model.transformer.h[1].mlp
        mlp.c_proj = PlantedConv1D(mlp.c_proj)
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(seed))
    return model, ids


def loss_fn(model: nn.Module, ids: Any) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss  # type: ignore[no-any-return]


def run(bug: str | None, **options: Any) -> dict[str, Any]:
    model, ids = build(bug)
    started = time.perf_counter()
    result = check_module(model, loss_fn, ids, sample="auto", **options)
    seconds = time.perf_counter() - started
    failing = [n for n, t in result.tensors.items() if t.status == "fail"]
    return {
        "bug": bug or "none",
        "params": sum(p.numel() for p in model.parameters()),
        "status": result.status,
        "evals": result.loss_evals,
        "seconds": round(seconds, 1),
        "failing": len(failing),
        "worst": result.worst[0].name if result.worst else None,
        "notes": result.notes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bug", action="append", choices=["none", "gelu", "entry"])
    args = parser.parse_args()
    for bug in args.bug or ["none", "gelu", "entry"]:
        row = run(None if bug == "none" else bug)
        notes = row.pop("notes")
        print(row)
        for note in notes:
            print("   ", note[:200])


if __name__ == "__main__":
    main()
