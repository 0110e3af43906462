"""Directional detection on a model with 100+ parameter tensors, then sampled localization.

    python -m benchmarks.directional

A deep narrow torch MLP (``BLOCKS`` blocks, 4 tensors each, plus a head): blocks
alternate Linear -> LayerNorm -> tanh and Linear -> BatchNorm1d -> tanh, so every
other Linear bias sits right before a BatchNorm and has a true gradient of about 0
(docs/design.md#near-zero: it must not alarm). ``--bug`` plants a wrong backward in one layer: a
custom ``autograd.Function`` whose weight gradient is off in one entry.

For the correct and the planted model it prints, per mode (``"directional"``,
``"auto"``): loss evaluations used (against 2 per tensor), seconds, status, which
tensors failed, the worst component, and whether the planted tensor / entry was found
(and, on the correct model, whether anything alarmed).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from gradwatch.integrations.torch import check_module
from torch import nn

BLOCKS = 30
WIDTH = 8
BATCH = 16
PLANTED_BLOCK = 17
PLANTED_ENTRY = (2, 5)


class OffByOneEntry(torch.autograd.Function):
    """y = x W^T + b whose backward adds a wrong term to one entry of the weight gradient."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return x @ weight.t() + bias

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x, weight = ctx.saved_tensors
        grad_weight = grad_output.t() @ x
        wrong = grad_weight.clone()
        wrong[PLANTED_ENTRY] += 0.5 * grad_weight.norm() + 1e-3  # the planted bug
        return grad_output @ weight, wrong, grad_output.sum(0)


class PlantedLinear(nn.Linear):
    """An ``nn.Linear`` computed through `OffByOneEntry` (correct forward, wrong backward)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return OffByOneEntry.apply(x, self.weight, self.bias)  # type: ignore[no-untyped-call,no-any-return]


def build_model(bug: bool = False, seed: int = 0) -> nn.Sequential:
    """``BLOCKS`` blocks of 4 tensors each (Linear weight/bias, norm weight/bias) plus a head."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for block in range(BLOCKS):
        linear_type = PlantedLinear if bug and block == PLANTED_BLOCK else nn.Linear
        layers.append(linear_type(WIDTH, WIDTH))
        layers.append(nn.LayerNorm(WIDTH) if block % 2 == 0 else nn.BatchNorm1d(WIDTH))
        layers.append(nn.Tanh())
    layers.append(nn.Linear(WIDTH, 1))
    model = nn.Sequential(*layers)
    model.train()  # BatchNorm normalizes by batch statistics: the bias before it is ~0
    return model


def planted_tensor() -> str:
    """The name of the weight whose backward is wrong."""
    return f"{3 * PLANTED_BLOCK}.weight"


def near_zero_tensors() -> list[str]:
    """The Linear biases right before a BatchNorm: their true gradient is about 0."""
    return [f"{3 * block}.bias" for block in range(BLOCKS) if block % 2 == 1]


def make_batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, WIDTH, generator=generator)
    y = torch.randn(BATCH, 1, generator=generator)
    return x, y


def mse(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="check seeds (random directions)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    batch = make_batch()
    tensors = len(list(build_model().parameters()))
    size = sum(p.numel() for p in build_model().parameters())
    print(
        f"model: {BLOCKS} blocks, {tensors} tensors, {size} parameters; planted "
        f"{planted_tensor()}[{PLANTED_ENTRY[0]}, {PLANTED_ENTRY[1]}]; "
        f"{len(near_zero_tensors())} biases before BatchNorm"
    )
    print(
        "model    mode         seed  evals  (2/tensor)  seconds  status  failed tensors"
        "              worst component         found"
    )
    for bug in (False, True):
        model = build_model(bug=bug)
        for sample in ("directional", "auto"):
            for seed in range(args.seeds):
                started = time.perf_counter()
                result = check_module(model, mse, batch, sample=sample, seed=seed)
                seconds = time.perf_counter() - started
                failed = sorted(n for n, t in result.tensors.items() if t.status == "fail")
                worst = result.worst[0].name if result.worst else "-"
                if bug:
                    tensor_found = failed == [planted_tensor()]
                    entry = f"{planted_tensor()}[{PLANTED_ENTRY[0]}, {PLANTED_ENTRY[1]}]"
                    entry_found = worst == entry
                    found = f"tensor={'yes' if tensor_found else 'NO'}"
                    if sample == "auto":
                        found += f" entry={'yes' if entry_found else 'NO'}"
                else:
                    found = "no alarm" if result.status != "fail" else "FALSE ALARM"
                print(
                    f"{'planted' if bug else 'correct':8} {sample:12} {seed:4}  "
                    f"{result.loss_evals:5}  {2 * tensors + 2:10}  {seconds:7.2f}  "
                    f"{result.status:6}  {', '.join(failed) or '-':26}  {worst:22}  {found}"
                )


if __name__ == "__main__":
    main()
