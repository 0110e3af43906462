"""Realistic backprop bugs planted in the tiny `transformers` models of `hf_models`.

Each `PlantedBug` changes how one module backpropagates, never what it computes: the
forward (and so the loss) is the unmodified model's, but the gradient that autograd
returns is not the gradient of that forward. ``module`` names where the bug lives; a
checker localizes it when the tensor it blames is under that module.

The bugs are the classics of hand-written backward passes:

* ``gpt2-gelu``: a tanh-GELU whose derivative forgets the product rule.
* ``llama-detached-attention``: an attention output ``.detach()``-ed before the residual add.
* ``mistral-rmsnorm``: an RMSNorm whose weight gradient uses the raw input, not the
  normalized one.
* ``qwen2-inplace-silu``: a memory-saving in-place SiLU that saves its input for
  backward and then overwrites it with the output.
* ``gpt-neox-embedding``: an embedding backward that assigns rows instead of
  accumulating them (a token repeated in the batch keeps one contribution).
* ``bert-layernorm``: a LayerNorm weight gradient averaged over the tokens instead of summed.
* ``vit-position-embedding``: a broadcast add whose backward keeps the first image's
  gradient instead of summing over the batch.

Modules are patched by swapping their class for a subclass (or by replacing a
stateless activation), so parameter names are unchanged and ``copy.deepcopy`` of the
model (a checker's float64 copy) keeps the bug.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import Function

from benchmarks.hf_models import ARCHITECTURES, Examples

__all__ = ["BUGS", "PlantedBug", "gradient_errors", "under"]


@dataclass(frozen=True)
class PlantedBug:
    """A backprop bug in one module of one architecture of `hf_models.ARCHITECTURES`."""

    name: str
    architecture: str
    module: str
    """Where the bug is: a correct alert names a tensor under this module."""
    description: str
    plant: Callable[[nn.Module], None]

    def build(self, seed: int = 0) -> tuple[nn.Module, Examples]:
        """The architecture's model with the bug planted, and its examples."""
        model, data = ARCHITECTURES[self.architecture].build(seed)
        self.plant(model)
        return model, data


def under(tensor: str | None, module: str) -> bool:
    """True when ``tensor`` (a parameter name) is ``module`` itself or inside it."""
    return tensor is not None and (tensor == module or tensor.startswith(module + "."))


def points_at(pointer: str | None, planted: str) -> bool:
    """True when an alert's ``pointer`` (a module path or a tensor name) is the planted
    module or tensor, inside it, or the module one level above it (the module that owns a
    planted tensor, or the parent whose forward's glue holds the bug)."""
    if pointer is None:
        return False
    return under(pointer, planted) or planted.rpartition(".")[0] == pointer


def _swap_class(module: nn.Module, mixin: type, label: str) -> None:
    """Give ``module`` the class ``(mixin, type(module))``: the mixin's forward wins."""
    base = type(module)
    module.__class__ = type(f"{label}{base.__name__}", (mixin, base), {})


# -- (a) activation derivatives ----------------------------------------------------------

_TANH_SCALE = math.sqrt(2.0 / math.pi)


class TanhGELUNoProductRule(Function):
    """GPT-2's GELU; the backward differentiates 0.5·(1 + tanh(u)) but not the factor x."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return 0.5 * x * (1.0 + torch.tanh(_TANH_SCALE * (x + 0.044715 * torch.pow(x, 3.0))))

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        tanh = torch.tanh(_TANH_SCALE * (x + 0.044715 * torch.pow(x, 3.0)))
        return grad_output * 0.5 * (1.0 + tanh)  # missing + 0.5·x·(1 − tanh²)·u'


class BuggyTanhGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return TanhGELUNoProductRule.apply(x)  # type: ignore[no-any-return, no-untyped-call]


class InplaceSiLU(Function):
    """SiLU computed in place to save memory; backward reads the overwritten input."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.mark_dirty(x)
        ctx.save_for_backward(x)  # saved, then overwritten with silu(x) just below
        return x.mul_(torch.sigmoid(x))

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> torch.Tensor:
        x: torch.Tensor = ctx.saved_tensors[0]  # holds silu(x) now, not x
        sigmoid = torch.sigmoid(x)
        return grad_output * sigmoid * (1.0 + x * (1.0 - sigmoid))


class BuggyInplaceSiLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return InplaceSiLU.apply(x)  # type: ignore[no-any-return, no-untyped-call]


# -- (b) a detached residual branch ------------------------------------------------------


class _DetachedOutput:
    """The module's output (first item of a tuple) cut from the graph."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        output = super().forward(*args, **kwargs)  # type: ignore[misc]
        if isinstance(output, tuple):
            return (output[0].detach(), *output[1:])
        return output.detach()


# -- (c) norms with a wrong weight gradient ------------------------------------------------


class RMSNormRawWeightGradient(Function):
    """y = w · x / rms(x); the weight gradient uses x where it needs x / rms(x)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        variance = x.pow(2).mean(-1, keepdim=True)
        inverse_rms = torch.rsqrt(variance + eps)
        ctx.save_for_backward(x, weight, inverse_rms)
        return weight * (x * inverse_rms)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, inverse_rms = ctx.saved_tensors
        normed = x * inverse_rms
        grad_normed = grad_output * weight
        projection = (grad_normed * normed).mean(-1, keepdim=True)
        grad_x = inverse_rms * (grad_normed - normed * projection)
        rows = grad_output.reshape(-1, weight.numel())
        grad_weight = (rows * x.reshape(-1, weight.numel())).sum(0)  # should be normed
        return grad_x, grad_weight, None


class _RMSNormRawWeight:
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return RMSNormRawWeightGradient.apply(  # type: ignore[no-any-return, no-untyped-call]
            hidden_states,
            self.weight,  # type: ignore[attr-defined]
            self.variance_epsilon,  # type: ignore[attr-defined]
        )


class LayerNormMeanWeightGradient(Function):
    """nn.LayerNorm's forward; the weight gradient is averaged over tokens, not summed."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        return F.layer_norm(x, weight.shape, weight, bias, eps)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        mean = x.mean(-1, keepdim=True)
        inverse_std = torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + ctx.eps)
        normed = (x - mean) * inverse_std
        grad_normed = grad_output * weight
        grad_x = inverse_std * (
            grad_normed
            - grad_normed.mean(-1, keepdim=True)
            - normed * (grad_normed * normed).mean(-1, keepdim=True)
        )
        rows = grad_output.reshape(-1, weight.numel())
        grad_weight = (rows * normed.reshape(-1, weight.numel())).mean(0)  # should be sum
        return grad_x, grad_weight, rows.sum(0), None


class _LayerNormMeanWeight:
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return LayerNormMeanWeightGradient.apply(  # type: ignore[no-any-return, no-untyped-call]
            x,
            self.weight,  # type: ignore[attr-defined]
            self.bias,  # type: ignore[attr-defined]
            self.eps,  # type: ignore[attr-defined]
        )


# -- (e) embeddings ---------------------------------------------------------------------------


class EmbeddingAssignedRows(Function):
    """A lookup whose backward assigns each token's gradient to its row (no accumulation)."""

    @staticmethod
    def forward(ctx: Any, ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(ids)
        ctx.rows = weight.shape[0]
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (ids,) = ctx.saved_tensors
        width = grad_output.shape[-1]
        grad_weight = grad_output.new_zeros(ctx.rows, width)
        grad_weight[ids.reshape(-1)] = grad_output.reshape(-1, width)  # should be index_add_
        return None, grad_weight


class _EmbeddingAssignedRows:
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return EmbeddingAssignedRows.apply(ids, self.weight)  # type: ignore[attr-defined, no-any-return, no-untyped-call]


class BroadcastAddFirstRow(Function):
    """x + p with p broadcast over the batch; backward keeps the first example's gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return x + positions

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return grad_output, grad_output[:1]  # should be grad_output.sum(0, keepdim=True)


class _ViTPositionsFirstRow:
    """ViTEmbeddings.forward (no masking, no interpolation) through `BroadcastAddFirstRow`."""

    def forward(self, pixel_values: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        module: Any = self
        embeddings = module.patch_embeddings(pixel_values)
        cls_tokens = module.cls_token.expand(pixel_values.shape[0], -1, -1)
        embeddings = torch.cat((cls_tokens, embeddings), dim=1)
        positions = module.position_embeddings
        embeddings = BroadcastAddFirstRow.apply(embeddings, positions)  # type: ignore[no-untyped-call]
        return module.dropout(embeddings)  # type: ignore[no-any-return]


# -- the registry -----------------------------------------------------------------------------


def _replace(path: str, make: Callable[[], nn.Module]) -> Callable[[nn.Module], None]:
    def plant(model: nn.Module) -> None:
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent), child, make())

    return plant


def _subclass(path: str, mixin: type, label: str) -> Callable[[nn.Module], None]:
    def plant(model: nn.Module) -> None:
        _swap_class(model.get_submodule(path), mixin, label)

    return plant


BUGS: dict[str, PlantedBug] = {
    bug.name: bug
    for bug in [
        PlantedBug(
            "gpt2-gelu",
            "gpt2",
            "transformer.h.1",
            "layer 1 GELU: derivative of 0.5·x·(1 + tanh u) without the product rule's x term",
            _replace("transformer.h.1.mlp.act", BuggyTanhGELU),
        ),
        PlantedBug(
            "llama-detached-attention",
            "llama",
            "model.layers.1",
            "layer 1 attention output .detach()-ed before the residual add",
            _subclass("model.layers.1.self_attn", _DetachedOutput, "Detached"),
        ),
        PlantedBug(
            "mistral-rmsnorm",
            "mistral",
            "model.layers.1.post_attention_layernorm",
            "layer 1 RMSNorm weight gradient from the raw input instead of the normalized one",
            _subclass("model.layers.1.post_attention_layernorm", _RMSNormRawWeight, "Buggy"),
        ),
        PlantedBug(
            "qwen2-inplace-silu",
            "qwen2",
            "model.layers.1",
            "layer 1 in-place SiLU: the input saved for backward is overwritten by the output",
            _replace("model.layers.1.mlp.act_fn", BuggyInplaceSiLU),
        ),
        PlantedBug(
            "gpt-neox-embedding",
            "gpt-neox",
            "gpt_neox.embed_in",
            "token embedding backward assigns rows instead of accumulating repeated tokens",
            _subclass("gpt_neox.embed_in", _EmbeddingAssignedRows, "Buggy"),
        ),
        PlantedBug(
            "bert-layernorm",
            "bert-cls",
            "bert.encoder.layer.1.output.LayerNorm",
            "layer 1 output LayerNorm weight gradient averaged over tokens instead of summed",
            _subclass("bert.encoder.layer.1.output.LayerNorm", _LayerNormMeanWeight, "Buggy"),
        ),
        PlantedBug(
            "vit-position-embedding",
            "vit",
            "vit.embeddings.position_embeddings",
            "position embedding gradient from the first image only, not summed over the batch",
            _subclass("vit.embeddings", _ViTPositionsFirstRow, "Buggy"),
        ),
    ]
}


def gradient_errors(
    bug: PlantedBug, seed: int = 0, examples: int = 4
) -> tuple[float, dict[str, float]]:
    """What the bug does, against torch autograd on the unmodified model (float64, eval mode).

    Returns the relative difference of the loss (0 when the forward is unchanged) and,
    per parameter, ``‖g_bug − g_true‖ / (‖g_bug‖ + ‖g_true‖)``, the denominator floored
    at 1e-6 of the whole true gradient's norm: a tensor whose true gradient is about 0
    (a key bias before a softmax) would otherwise compare rounding noise with itself.
    """
    clean, data = ARCHITECTURES[bug.architecture].build(seed)
    planted, _ = bug.build(seed)
    batch = {key: torch.stack([data[i][key] for i in range(examples)]) for key in data[0]}
    batch = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
    losses, gradients = [], []
    for model in (clean, planted):
        model.double().eval()
        loss = model(**batch).loss
        loss.backward()
        losses.append(loss.item())
        gradients.append(
            {
                n: p.grad if p.grad is not None else torch.zeros_like(p)
                for n, p in model.named_parameters()
            }
        )
    floor = 1e-6 * float(torch.cat([g.reshape(-1) for g in gradients[0].values()]).norm())
    errors = {}
    for name, true in gradients[0].items():
        wrong = gradients[1][name]
        scale = max(float(true.norm() + wrong.norm()), floor)
        errors[name] = float((true - wrong).norm()) / scale if scale > 0 else 0.0
    return abs(losses[1] - losses[0]) / abs(losses[0]), errors
