"""What the torch integration tests share: a batch, its loss, and the planted x**2 bug."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def cross_entropy(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """J of a classifier on one (inputs, labels) batch."""
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def make_batch(n: int = 16, features: int = 5, classes: int = 3, seed: int = 0) -> Any:
    """`n` random inputs and labels, the same for the same seed."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=generator)
    y = torch.randint(0, classes, (n,), generator=generator)
    return x, y


class WrongSquare(torch.autograd.Function):
    """x**2 whose backward forgets the factor 2 (no setup_context: vmap refuses it)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad * x


class VmapWrongSquare(torch.autograd.Function):
    """The same bug with setup_context, so vmap can run it."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x * x

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad * x
