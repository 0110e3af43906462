"""gradwatch's full check against ``torch.autograd.gradcheck`` on the same float64 model.

    python -m benchmarks.gradcheck_compare [--repeats 3] [--threads 1] [--clock cpu]

The about-5k-parameter tanh MLP of `benchmarks.torch_speed`, float64, on 16
examples, with the scalar cross-entropy as the output and the parameters as
gradcheck's inputs (``functional_call``). Both check every component with
two-sided differences; the times are interleaved and the medians of the ratios
shown: gradwatch's full check (batched, the default, and sequential) / gradcheck.

Then the same model with a planted bug (a tanh whose custom backward forgets to
square: ``grad * (1 - y)``): gradcheck's error message against gradwatch's worst
components (tensor and entry).
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import torch
from gradwatch.integrations.torch import check_module
from torch import nn
from torch.autograd.gradcheck import GradcheckError

from benchmarks import torch_speed
from benchmarks.torch_speed import HIDDEN, Batch, cross_entropy, make_batch, mlp, timed


class WrongTanh(torch.autograd.Function):
    """tanh whose backward forgets to square: grad * (1 - y) instead of grad * (1 - y^2)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (y,) = ctx.saved_tensors
        return grad * (1 - y)


class WrongTanhModule(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result: torch.Tensor = WrongTanh.apply(x)
        return result


def buggy_mlp(hidden: int) -> nn.Sequential:
    """`mlp` with the first tanh replaced by `WrongTanh`: 0.weight and 0.bias get wrong grads."""
    model = mlp(hidden)
    model[1] = WrongTanhModule()
    return model


def run_gradcheck(model: nn.Module, batch: Batch) -> tuple[bool, str]:
    """gradcheck of the scalar loss as a function of every parameter (float64)."""
    float64 = model.to(torch.float64)
    names = [name for name, _ in float64.named_parameters()]
    inputs = tuple(p.detach().clone().requires_grad_(True) for p in float64.parameters())
    x, y = batch[0].to(torch.float64), batch[1]

    def loss(*params: torch.Tensor) -> torch.Tensor:
        logits = torch.func.functional_call(float64, dict(zip(names, params, strict=True)), (x,))
        return nn.functional.cross_entropy(logits, y)

    try:
        return bool(torch.autograd.gradcheck(loss, inputs)), ""
    except GradcheckError as error:
        return False, str(error)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs; medians shown")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu", help="what is timed")
    args = parser.parse_args()
    torch_speed.configure(args.threads, args.clock)
    hidden, batch = HIDDEN["5k"], make_batch()
    n = sum(p.numel() for p in mlp(hidden).parameters())
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.clock} time, n={n}")

    check_module(mlp(hidden), cross_entropy, batch, sample=200)  # warm up vmap
    gradcheck_s, batched_s, sequential_s = [], [], []
    for _ in range(args.repeats):
        seconds, (passed, _) = timed(lambda: run_gradcheck(mlp(hidden), batch))
        assert passed
        gradcheck_s.append(seconds)
        seconds, result = timed(lambda: check_module(mlp(hidden), cross_entropy, batch))
        assert result.status == "ok" and result.checked == n
        batched_s.append(seconds)
        seconds, result = timed(
            lambda: check_module(mlp(hidden), cross_entropy, batch, batched=False)
        )
        assert result.status == "ok" and result.checked == n
        sequential_s.append(seconds)
    batched_ratio = statistics.median(b / g for b, g in zip(batched_s, gradcheck_s, strict=True))
    sequential_ratio = statistics.median(
        s / g for s, g in zip(sequential_s, gradcheck_s, strict=True)
    )
    print(
        f"correct model, full check: gradcheck {statistics.median(gradcheck_s):.2f} s, "
        f"gradwatch batched {statistics.median(batched_s):.2f} s "
        f"(gradwatch/gradcheck = {batched_ratio:.3f}), "
        f"gradwatch sequential {statistics.median(sequential_s):.2f} s "
        f"(gradwatch/gradcheck = {sequential_ratio:.3f})"
    )

    print("\nplanted bug (first tanh's backward forgets to square):")
    passed, message = run_gradcheck(buggy_mlp(hidden), batch)
    assert not passed
    lines = message.strip().splitlines()
    print("  gradcheck raises GradcheckError (input 0 is the first parameter; no entry named):")
    print("\n".join(f"    | {line[:110]}" for line in lines))
    result = check_module(buggy_mlp(hidden), cross_entropy, batch, top_k=3)
    failing = [name for name, verdict in result.tensors.items() if verdict.status == "fail"]
    print(
        f"  gradwatch: status {result.status}, ratio {result.ratio:.3g}, failing tensors {failing}"
    )
    for component in result.worst:
        print(
            f"    {component.name:>16}  analytic {component.analytic:+.6e}  "
            f"numeric {component.numeric:+.6e}  diagnosis {component.diagnosis}"
        )
    assert result.status == "fail" and set(failing) == {"0.weight", "0.bias"}


if __name__ == "__main__":
    main()
