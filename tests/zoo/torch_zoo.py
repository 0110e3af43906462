"""PyTorch zoo: custom ``autograd.Function`` backwards, hand-written losses and penalties.

Every model is tiny and float32 (``check_module`` checks a float64 shadow); each
``build(bug)`` returns a fresh `TorchProblem` (or a `Training`), ``bug=False`` being
the correct twin. Parameter names are ``model.named_parameters()`` names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
from torch import nn
from torch.nn import functional as F

from tests.zoo.registry import Hook, TorchProblem, Training, ZooEntry

Tensor = torch.Tensor


# --------------------------------------------------------------------------- custom Functions


class LinearFunction(torch.autograd.Function):
    """``x @ W.T + b`` with a hand-written backward; ``bug`` plants one error."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor, bug: str | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.bug = bug
        return x @ weight.t() + bias

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        grad_weight = grad.t() @ x
        grad_bias = grad.sum(0)
        if ctx.bug == "transposed":
            grad_weight = x.t() @ grad  # (in, out): square, so the shape fits
        if ctx.bug == "bias_mean":
            grad_bias = grad.mean(0)
        if ctx.bug == "last_row":
            grad_weight[-1] = 0.0  # a loop over output units that stops one short
        return grad @ weight, grad_weight, grad_bias, None


class CustomLinear(nn.Module):
    def __init__(self, fan_in: int, fan_out: int, bug: str | None = None) -> None:
        super().__init__()
        reference = nn.Linear(fan_in, fan_out)
        self.weight = nn.Parameter(reference.weight.detach().clone())
        self.bias = nn.Parameter(reference.bias.detach().clone())
        self.bug = bug

    def forward(self, x: Tensor) -> Tensor:
        return LinearFunction.apply(x, self.weight, self.bias, self.bug)


class ReLUFunction(torch.autograd.Function):
    """ReLU; the bug takes the mask from the incoming gradient instead of the input."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, bug: bool) -> Tensor:
        ctx.save_for_backward(x)
        ctx.bug = bug
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        (x,) = ctx.saved_tensors
        mask = grad > 0 if ctx.bug else x > 0
        return grad * mask, None


class SoftsignFunction(torch.autograd.Function):
    """x / (1 + |x|); the bug treats |x| > 3 as saturated (gradient 0): wrong for a few."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, bug: bool) -> Tensor:
        ctx.save_for_backward(x)
        ctx.bug = bug
        return x / (1 + x.abs())

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        (x,) = ctx.saved_tensors
        slope = 1 / (1 + x.abs()) ** 2
        if ctx.bug:
            slope = torch.where(x.abs() > 3, torch.zeros_like(slope), slope)
        return grad * slope, None


class StashedSquare(torch.autograd.Function):
    """x^2 that keeps its input on ``ctx`` (not ``save_for_backward``): no version check."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.stashed = x
        return x * x

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return 2 * ctx.stashed * grad


class LayerNormFunction(torch.autograd.Function):
    """Layer norm over the last dim, no affine; the bug drops the xhat*mean(g*xhat) term."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, bug: bool) -> Tensor:
        centered = x - x.mean(-1, keepdim=True)
        inv_std = torch.rsqrt(centered.pow(2).mean(-1, keepdim=True) + 1e-5)
        xhat = centered * inv_std
        ctx.save_for_backward(xhat, inv_std)
        ctx.bug = bug
        return xhat

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        xhat, inv_std = ctx.saved_tensors
        inner = grad - grad.mean(-1, keepdim=True)
        if not ctx.bug:
            inner = inner - xhat * (grad * xhat).mean(-1, keepdim=True)
        return inv_std * inner, None


class EmbeddingFunction(torch.autograd.Function):
    """Row lookup; the bug writes the gradient with ``index_put`` (no accumulate)."""

    @staticmethod
    def forward(ctx: Any, weight: Tensor, indices: Tensor, bug: bool) -> Tensor:
        ctx.save_for_backward(indices)
        ctx.shape, ctx.bug = weight.shape, bug
        return weight[indices]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        (indices,) = ctx.saved_tensors
        flat_indices, flat_grad = indices.reshape(-1), grad.reshape(-1, ctx.shape[1])
        grad_weight = grad.new_zeros(ctx.shape)
        grad_weight.index_put_((flat_indices,), flat_grad, accumulate=not ctx.bug)
        return grad_weight, None, None


class LogSumExpFunction(torch.autograd.Function):
    """logsumexp over dim 1; the bug takes the softmax over dim 0 (the batch)."""

    @staticmethod
    def forward(ctx: Any, z: Tensor, bug: bool) -> Tensor:
        ctx.save_for_backward(z)
        ctx.bug = bug
        return torch.logsumexp(z, dim=1)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        (z,) = ctx.saved_tensors
        probs = torch.softmax(z, dim=0 if ctx.bug else 1)
        return grad[:, None] * probs, None


class HuberFunction(torch.autograd.Function):
    """Mean Huber loss (delta=1); the bug drops the sign in the linear region."""

    @staticmethod
    def forward(ctx: Any, prediction: Tensor, target: Tensor, bug: bool) -> Tensor:
        residual = prediction - target
        ctx.save_for_backward(residual)
        ctx.bug = bug
        small = residual.abs() <= 1
        return torch.where(small, 0.5 * residual**2, residual.abs() - 0.5).mean()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        (residual,) = ctx.saved_tensors
        linear = torch.ones_like(residual) if ctx.bug else residual.sign()
        slope = torch.where(residual.abs() <= 1, residual, linear)
        return grad * slope / residual.numel(), None, None


class MSEFunction(torch.autograd.Function):
    """Mean squared error; the bug forgets the 1/N of the mean in the backward."""

    @staticmethod
    def forward(ctx: Any, prediction: Tensor, target: Tensor, bug: bool) -> Tensor:
        residual = prediction - target
        ctx.save_for_backward(residual)
        ctx.bug = bug
        return residual.pow(2).mean()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        (residual,) = ctx.saved_tensors
        scale = 1.0 if ctx.bug else 1.0 / residual.numel()
        return grad * 2 * residual * scale, None, None


class L2PenaltyFunction(torch.autograd.Function):
    """lambd/(2m) * ||W||^2; the bug's backward is lambd/(2m) * W instead of lambd/m * W."""

    @staticmethod
    def forward(ctx: Any, weight: Tensor, coefficient: float, bug: bool) -> Tensor:
        ctx.save_for_backward(weight)
        ctx.coefficient, ctx.bug = coefficient, bug
        return coefficient / 2 * weight.pow(2).sum()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        (weight,) = ctx.saved_tensors
        factor = ctx.coefficient / 2 if ctx.bug else ctx.coefficient
        return grad * factor * weight, None, None


class SinFunction(torch.autograd.Function):
    """sin(x); the bug's backward is the small-angle cos(x) ~ 1 - x^2/2."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, bug: bool) -> Tensor:
        ctx.save_for_backward(x)
        ctx.bug = bug
        return torch.sin(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        (x,) = ctx.saved_tensors
        slope = 1 - x**2 / 2 if ctx.bug else torch.cos(x)
        return grad * slope, None


# --------------------------------------------------------------------------- models


def _activation(function: Any, bug: bool) -> Callable[[Tensor], Tensor]:
    """A custom Function as an activation with its ``bug`` flag bound."""

    def apply(x: Tensor) -> Tensor:
        return function.apply(x, bug)

    return apply


class ThreeLayer(nn.Module):
    """inp -> activation -> mid -> activation -> out, with pluggable pieces."""

    def __init__(
        self,
        sizes: tuple[int, int, int, int] = (6, 12, 12, 3),
        *,
        mid: nn.Module | None = None,
        activation: Callable[[Tensor], Tensor] = torch.tanh,
        seed: int = 0,
    ) -> None:
        super().__init__()
        torch.manual_seed(seed)
        features, hidden, hidden2, outputs = sizes
        self.inp = nn.Linear(features, hidden)
        self.mid = mid if mid is not None else nn.Linear(hidden, hidden2)
        self.out = nn.Linear(hidden2, outputs)
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.activation(self.mid(self.activation(self.inp(x)))))


def _classification_batch(
    n: int = 16, features: int = 6, classes: int = 3, scale: float = 1.0, seed: int = 0
) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = scale * torch.randn(n, features, generator=generator)
    return x, torch.randint(0, classes, (n,), generator=generator)


def cross_entropy(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def custom_linear_net(bug: str | None) -> TorchProblem:
    """The middle layer is a `CustomLinear` (square 12x12)."""
    torch.manual_seed(0)
    model = ThreeLayer(mid=CustomLinear(12, 12, bug))
    return TorchProblem(model, cross_entropy, _classification_batch())


def custom_relu_net(bug: bool) -> TorchProblem:
    model = ThreeLayer(activation=_activation(ReLUFunction, bug))
    return TorchProblem(model, cross_entropy, _classification_batch())


def softsign_net(bug: bool) -> TorchProblem:
    """Inputs scaled so that a handful of the 2x16x12 pre-activations exceed 3."""
    model = ThreeLayer(activation=_activation(SoftsignFunction, bug))
    return TorchProblem(model, cross_entropy, _classification_batch(scale=3.0))


class Residual(nn.Module):
    """h = inp(x); y = h + mid(tanh(h)); the bug cuts the skip path with ``.detach()``."""

    def __init__(self, bug: bool) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.inp = nn.Linear(6, 12)
        self.mid = nn.Linear(12, 12)
        self.out = nn.Linear(12, 3)
        self.bug = bug

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        skip = h.detach() if self.bug else h
        return self.out(torch.tanh(skip + self.mid(torch.tanh(h))))


class InPlace(nn.Module):
    """s = StashedSquare(h); then ``h.relu_()`` in place (the bug) corrupts the stashed h."""

    def __init__(self, bug: bool) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.inp = nn.Linear(6, 12)
        self.out = nn.Linear(24, 3)
        self.bug = bug

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        squared = StashedSquare.apply(h)
        rectified = h.relu_() if self.bug else torch.relu(h)
        return self.out(torch.cat([0.3 * squared, rectified], dim=1))


class LayerNormNet(nn.Module):
    """inp -> custom LayerNorm -> tanh -> out."""

    def __init__(self, bug: bool) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.inp = nn.Linear(6, 12)
        self.out = nn.Linear(12, 3)
        self.bug = bug

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(LayerNormFunction.apply(self.inp(x), self.bug)))


class BagOfEmbeddings(nn.Module):
    """Mean of token embeddings (a custom Function) -> out; tokens repeat in the batch."""

    def __init__(self, bug: bool, vocab: int = 20, dim: int = 8) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.emb = nn.Parameter(0.5 * torch.randn(vocab, dim))
        self.out = nn.Linear(dim, 3)
        self.bug = bug

    def forward(self, tokens: Tensor) -> Tensor:
        return self.out(EmbeddingFunction.apply(self.emb, tokens, self.bug).mean(1))


def _token_batch(n: int = 16, length: int = 4, vocab: int = 20) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, vocab, (n, length), generator=generator)
    return tokens, torch.randint(0, 3, (n,), generator=generator)


def lse_cross_entropy(bug: bool) -> Callable[[nn.Module, Any], Tensor]:
    def loss_fn(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        logits = model(x)
        lse = LogSumExpFunction.apply(logits, bug)
        return (lse - logits.gather(1, y[:, None]).squeeze(1)).mean()

    return loss_fn


def _regression_batch(n: int = 16, scale: float = 2.0) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(6)
    x = torch.randn(n, 6, generator=generator)
    return x, scale * torch.randn(n, 2, generator=generator)


def huber(bug: bool) -> Callable[[nn.Module, Any], Tensor]:
    def loss_fn(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return HuberFunction.apply(model(x), y, bug)

    return loss_fn


def mse(bug: bool) -> Callable[[nn.Module, Any], Tensor]:
    def loss_fn(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return MSEFunction.apply(model(x), y, bug)

    return loss_fn


def l2_penalty(bug: bool, coefficient: float = 0.7 / 16) -> Callable[[nn.Module], Tensor]:
    """lambd/(2m) * sum ||W||^2 over the weight matrices (lambd = 0.7, m = 16)."""

    def penalty(model: nn.Module) -> Tensor:
        layers = cast(list[nn.Linear], [model.inp, model.mid, model.out])
        total = torch.zeros((), dtype=layers[0].weight.dtype)
        for layer in layers:
            total = total + L2PenaltyFunction.apply(layer.weight, coefficient, bug)
        return total

    return penalty


def large_net(bug: str | None) -> TorchProblem:
    """About 17k parameters: above the 2000 of a full ``sample="auto"`` check."""
    torch.manual_seed(7)
    model = ThreeLayer((32, 96, 128, 10), mid=CustomLinear(96, 128, bug), seed=7)
    batch = _classification_batch(n=32, features=32, classes=10, seed=7)
    return TorchProblem(model, cross_entropy, batch)


def sin_training(bug: bool, *, steps: int = 100, every: int = 20) -> Training:
    """A sin-activation regressor trained from a small init with plain SGD.

    The backward's cos(x) ~ 1 - x^2/2 is exact to O(x^4) at the init and wrong once
    training has grown the pre-activations.
    """

    def run(hook: Hook) -> None:
        torch.manual_seed(8)
        model = ThreeLayer(
            (4, 16, 16, 1),
            activation=_activation(SinFunction, bug),
            seed=8,
        )
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0.1)
        generator = torch.Generator().manual_seed(8)
        x = torch.randn(32, 4, generator=generator)
        y = torch.sin(3 * x[:, :1]) + x[:, 1:2] ** 2

        def loss_fn(net: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
            inputs, targets = batch
            return F.mse_loss(net(inputs), targets)

        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for step in range(steps):
            optimizer.zero_grad()
            loss_fn(model, (x, y)).backward()
            hook(step, TorchProblem(model, loss_fn, (x, y)))
            optimizer.step()

    return Training(framework="torch", run=run, every=every, steps=steps)


# --------------------------------------------------------------------------- correct models


def float32_mlp(_: bool) -> TorchProblem:
    return TorchProblem(ThreeLayer(activation=torch.relu), cross_entropy, _classification_batch())


def dropout_mlp(_: bool) -> TorchProblem:
    torch.manual_seed(9)
    model = nn.Sequential(
        nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 16), nn.Tanh(),
        nn.Dropout(0.3), nn.Linear(16, 3),
    )  # fmt: skip
    return TorchProblem(model.train(), cross_entropy, _classification_batch())


def batchnorm_mlp(_: bool) -> TorchProblem:
    """Linear (with a bias: its true gradient is ~0) -> BatchNorm1d in train mode."""
    torch.manual_seed(10)
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3)).train()
    return TorchProblem(model, cross_entropy, _classification_batch())


def relu_maxpool_cnn(_: bool) -> TorchProblem:
    torch.manual_seed(11)
    model = nn.Sequential(
        nn.Conv2d(1, 6, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 8, 3), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, 3),
    )  # fmt: skip
    generator = torch.Generator().manual_seed(11)
    x = torch.randn(8, 1, 10, 10, generator=generator)
    return TorchProblem(model, cross_entropy, (x, torch.randint(0, 3, (8,), generator=generator)))


class TiedLanguageModel(nn.Module):
    """Embedding whose weight is also the output projection (tied weights)."""

    def __init__(self, vocab: int = 24, dim: int = 12) -> None:
        super().__init__()
        torch.manual_seed(12)
        self.emb = nn.Embedding(vocab, dim)
        self.hidden = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(torch.tanh(self.hidden(self.emb(tokens).mean(1))))


def tied_weights(_: bool) -> TorchProblem:
    generator = torch.Generator().manual_seed(12)
    tokens = torch.randint(0, 24, (16, 5), generator=generator)
    return TorchProblem(
        TiedLanguageModel(),
        cross_entropy,
        (tokens, torch.randint(0, 24, (16,), generator=generator)),
    )


def frozen_layer(_: bool) -> TorchProblem:
    model = ThreeLayer(seed=13)
    model.inp.requires_grad_(False)
    return TorchProblem(model, cross_entropy, _classification_batch())


class AllCustom(nn.Module):
    """Every custom Function of the zoo with its correct backward, in one net."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(14)
        self.emb = nn.Parameter(0.5 * torch.randn(20, 6))
        self.inp = CustomLinear(6, 12)
        self.mid = CustomLinear(12, 12)
        self.out = nn.Linear(12, 3)

    def forward(self, tokens: Tensor) -> Tensor:
        h = EmbeddingFunction.apply(self.emb, tokens, False).mean(1)
        h = LayerNormFunction.apply(self.inp(2 * h), False)
        h = SoftsignFunction.apply(
            ReLUFunction.apply(h, False) + SinFunction.apply(h, False), False
        )
        return self.out(StashedSquare.apply(self.mid(h)))


def all_custom(_: bool) -> TorchProblem:
    return TorchProblem(AllCustom(), lse_cross_entropy(False), _token_batch())


class PreNormBlock(nn.Module):
    """x + W2 GELU(W1 LayerNorm(x)), then a head: built-in layers only."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(15)
        self.inp = nn.Linear(6, 16)
        self.norm = nn.LayerNorm(16)
        self.up = nn.Linear(16, 32)
        self.down = nn.Linear(32, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        h = h + self.down(F.gelu(self.up(self.norm(h))))
        return self.head(h)


def prenorm_block(_: bool) -> TorchProblem:
    return TorchProblem(PreNormBlock(), cross_entropy, _classification_batch())


# --------------------------------------------------------------------------- the entries

UPSTREAM = ("inp.weight", "inp.bias")


def _bug(name: str, description: str, build: Callable[[bool], Any], *buggy: str) -> ZooEntry:
    return ZooEntry(name, "bug", "torch", description, build, buggy)


def _correct(name: str, description: str, build: Callable[[bool], Any]) -> ZooEntry:
    return ZooEntry(name, "correct", "torch", description, build)


def _with_loss(
    model: Callable[[], nn.Module],
    loss: Callable[[bool], Callable[[nn.Module, Any], Tensor]],
    batch: Callable[[], Any],
) -> Callable[[bool], TorchProblem]:
    return lambda bug: TorchProblem(model(), loss(bug), batch())


TORCH_ENTRIES: list[ZooEntry] = [
    _bug(
        "pt_fn_transposed_weight",
        "custom Linear backward: grad_weight = x.T @ g (transposed, square 12x12)",
        lambda bug: custom_linear_net("transposed" if bug else None),
        "mid.weight",
    ),
    _bug(
        "pt_fn_bias_mean",
        "custom Linear backward: grad_bias = g.mean(0) instead of g.sum(0)",
        lambda bug: custom_linear_net("bias_mean" if bug else None),
        "mid.bias",
    ),
    _bug(
        "pt_fn_relu_mask_from_grad",
        "custom ReLU backward masks with grad > 0 instead of input > 0",
        custom_relu_net,
        "inp.weight",
        "inp.bias",
        "mid.weight",
        "mid.bias",
    ),
    _bug(
        "pt_fn_softsign_few_entries",
        "custom softsign backward returns 0 for |x| > 3 (a few of 384 pre-activations)",
        softsign_net,
        *UPSTREAM,
        "mid.weight",
        "mid.bias",
    ),
    _bug(
        "pt_detach_residual",
        "residual skip path cut with h.detach()",
        lambda bug: TorchProblem(Residual(bug), cross_entropy, _classification_batch()),
        *UPSTREAM,
    ),
    _bug(
        "pt_inplace_saved_tensor",
        "h.relu_() after a custom Function stashed h on ctx (no version check)",
        lambda bug: TorchProblem(InPlace(bug), cross_entropy, _classification_batch()),
        *UPSTREAM,
    ),
    _bug(
        "pt_layernorm_missing_term",
        "custom LayerNorm backward without the xhat*mean(g*xhat) term",
        lambda bug: TorchProblem(LayerNormNet(bug), cross_entropy, _classification_batch()),
        *UPSTREAM,
    ),
    _bug(
        "pt_embedding_no_accumulate",
        "custom embedding backward: index_put_ without accumulate (repeated tokens)",
        lambda bug: TorchProblem(BagOfEmbeddings(bug), cross_entropy, _token_batch()),
        "emb",
    ),
    _bug(
        "pt_logsumexp_wrong_dim",
        "hand-written cross-entropy: logsumexp backward softmax over the batch dim",
        _with_loss(ThreeLayer, lse_cross_entropy, _classification_batch),
        "out.weight",
        "out.bias",
        "mid.weight",
        "mid.bias",
        *UPSTREAM,
    ),
    _bug(
        "pt_huber_sign",
        "hand-written Huber loss: linear-region slope +1 instead of sign(r)",
        _with_loss(lambda: ThreeLayer((6, 12, 12, 2)), huber, _regression_batch),
        "out.weight",
        "out.bias",
        "mid.weight",
        "mid.bias",
        *UPSTREAM,
    ),
    _bug(
        "pt_mse_missing_mean",
        "hand-written MSE backward without the 1/N of the mean",
        _with_loss(lambda: ThreeLayer((6, 12, 12, 2)), mse, _regression_batch),
        "out.weight",
        "out.bias",
        "mid.weight",
        "mid.bias",
        *UPSTREAM,
    ),
    _bug(
        "pt_penalty_half",
        "custom L2 penalty: backward lambd/(2m)*W instead of lambd/m*W",
        lambda bug: TorchProblem(
            ThreeLayer(), cross_entropy, _classification_batch(), {"l2": l2_penalty(bug)}
        ),
        "inp.weight",
        "mid.weight",
        "out.weight",
    ),
    _bug(
        "pt_large_last_row_17k",
        "17k params: custom Linear grad_weight leaves its last row at zero (96 of 17k)",
        lambda bug: large_net("last_row" if bug else None),
        "mid.weight",
    ),
    _bug(
        "pt_late_sin_small_angle",
        "sin backward as 1 - x^2/2: exact to O(x^4) at a small init; "
        "GradWatch(every=20) over 100 SGD steps",
        sin_training,
        "inp.weight",
        "inp.bias",
        "mid.weight",
        "mid.bias",
    ),
    _correct("pt_float32_relu_mlp", "float32 ReLU MLP (checked on a float64 shadow)", float32_mlp),
    _correct("pt_dropout", "two Dropout(0.3) layers in train mode", dropout_mlp),
    _correct(
        "pt_batchnorm_train",
        "Linear bias right before BatchNorm1d (true gradient ~0), train mode",
        batchnorm_mlp,
    ),
    _correct("pt_cnn_relu_maxpool", "conv + ReLU + MaxPool2d kinks", relu_maxpool_cnn),
    _correct(
        "pt_large_17k",
        "17k-param MLP: sample='auto' detects per tensor by random directions",
        lambda bug: large_net(None),
    ),
    _correct("pt_tied_weights", "embedding tied to the output projection", tied_weights),
    _correct("pt_frozen_layer", "first layer requires_grad=False", frozen_layer),
    _correct(
        "pt_custom_functions_ok",
        "every custom Function of the zoo with its correct backward",
        all_custom,
    ),
    _correct("pt_prenorm_gelu_block", "LayerNorm + GELU residual block", prenorm_block),
]
