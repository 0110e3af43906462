"""Planted backprop bugs with their module as the oracle, for the module-local search.

Each `LocalBug` builds a tiny `transformers` model (from a config in code) with one bug
planted, and a batch of 4 examples. ``expected`` is what a correct pointer names: the
planted module, or its immediate parent when the bug is code in the parent's own
forward (a ``.detach()`` on a submodule's output, attention math written in the
attention module's forward). Besides the bugs of `benchmarks.hf_bugs`:

* ``gemma2-gelu``: a tanh-GELU without the product rule in ``layers.0.mlp`` of a Gemma2,
  whose sandwich norms are registered after the MLP (parameter order is not forward
  order);
* ``resnet-batchnorm``: a BatchNorm whose backward drops its mean term, in stage 0 of a
  ResNet (train mode, batch statistics);
* ``llama-softmax``: the attention's softmax (parameter-free math inside the attention
  module's forward) with a backward that forgets to subtract <g, p>;
* ``olmo-layernorm``: OLMo's LayerNorm without an affine part, whose backward drops the
  mean term.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from torch.autograd import Function

from benchmarks.hf_bugs import BUGS, BuggyTanhGELU, _swap_class
from benchmarks.hf_models import Examples, causal_lm_examples, image_examples

__all__ = ["LOCAL_BUGS", "LocalBug", "batch_of", "model_loss"]

Batch = dict[str, torch.Tensor]


def batch_of(data: Examples, examples: int = 4) -> Batch:
    """The first ``examples`` examples stacked into one batch."""
    return {key: torch.stack([data[i][key] for i in range(examples)]) for key in data[0]}


def model_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The model's own loss (HF models compute it from ``labels``)."""
    return model(**batch).loss  # type: ignore[no-any-return]


@dataclass(frozen=True)
class LocalBug:
    """A planted bug and the module a correct pointer names."""

    name: str
    architecture: str
    planted: str
    """The module whose code holds the bug."""
    expected: str
    """The module a correct pointer names (``planted``, or its parent for glue code)."""
    parameter_free: bool
    order_differs: bool
    """Parameter order differs from the forward's order around the bug."""
    make: Callable[[int], tuple[nn.Module, Batch]]

    def build(self, seed: int = 0) -> tuple[nn.Module, Batch]:
        """The model with the bug planted (train mode) and a batch of 4 examples."""
        model, batch = self.make(seed)
        return model.train(), batch


# -- new bugs -------------------------------------------------------------------------------


class BatchNormWithoutMean(Function):
    """BatchNorm2d in train mode; the input gradient drops the mean of the output gradient."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
    ) -> torch.Tensor:
        mean = x.mean((0, 2, 3), keepdim=True)
        inverse_std = torch.rsqrt(x.var((0, 2, 3), unbiased=False, keepdim=True) + eps)
        normed = (x - mean) * inverse_std
        ctx.save_for_backward(normed, inverse_std, weight)
        return normed * weight[None, :, None, None] + bias[None, :, None, None]

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        normed, inverse_std, weight = ctx.saved_tensors
        grad_normed = grad_output * weight[None, :, None, None]
        projection = (grad_normed * normed).mean((0, 2, 3), keepdim=True)
        grad_x = inverse_std * (grad_normed - normed * projection)  # - grad_normed.mean(...)
        grad_weight = (grad_output * normed).sum((0, 2, 3))
        return grad_x, grad_weight, grad_output.sum((0, 2, 3)), None


class _BatchNormWithoutMean:
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        module: Any = self
        return BatchNormWithoutMean.apply(x, module.weight, module.bias, module.eps)  # type: ignore[no-any-return, no-untyped-call]


class LayerNormWithoutMean(Function):
    """A layer norm without affine part; the backward drops the mean of the gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, eps: float) -> torch.Tensor:
        normed = F.layer_norm(x, x.shape[-1:], eps=eps)
        inverse_std = torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + eps)
        ctx.save_for_backward(normed, inverse_std)
        return normed

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        normed, inverse_std = ctx.saved_tensors
        projection = (grad_output * normed).mean(-1, keepdim=True)
        return inverse_std * (grad_output - normed * projection), None  # - grad.mean(-1)


class _LayerNormWithoutMean:
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return LayerNormWithoutMean.apply(hidden_states, 1e-5)  # type: ignore[no-any-return, no-untyped-call]


class SoftmaxWithoutProjection(Function):
    """Softmax over the last dimension; the backward forgets to subtract <g, p>."""

    @staticmethod
    def forward(ctx: Any, scores: torch.Tensor) -> torch.Tensor:
        probabilities = torch.softmax(scores, dim=-1)
        ctx.save_for_backward(probabilities)
        return probabilities

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> torch.Tensor:
        probabilities: torch.Tensor = ctx.saved_tensors[0]
        return probabilities * grad_output  # should be p * (g - (g * p).sum(-1, keepdim=True))


def softmax_bug_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention (grouped key/value heads repeated); layer 0's softmax is the buggy one."""
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    scores = query @ key.transpose(2, 3) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : key.shape[-2]]
    weights: torch.Tensor
    if getattr(module, "layer_idx", 0) == 0:
        weights = SoftmaxWithoutProjection.apply(scores)  # type: ignore[no-untyped-call]
    else:
        weights = torch.softmax(scores, dim=-1)
    output = (weights @ value).transpose(1, 2).contiguous()
    return output, weights


SOFTMAX_BUG_ATTENTION = "gradwatch_softmax_bug"
transformers.AttentionInterface.register(SOFTMAX_BUG_ATTENTION, softmax_bug_attention)


# -- the builders ---------------------------------------------------------------------------

TINY_DECODER = {
    "vocab_size": 100,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "intermediate_size": 64,
    "max_position_embeddings": 16,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def _causal(model_class: str, **options: Any) -> Callable[[int], tuple[nn.Module, Batch]]:
    def make(seed: int) -> tuple[nn.Module, Batch]:
        model_type = getattr(transformers, model_class)
        torch.manual_seed(seed)
        model: nn.Module = model_type(model_type.config_class(**{**TINY_DECODER, **options}))
        return model.float(), batch_of(causal_lm_examples(0, seed))

    return make


def _resnet(seed: int) -> tuple[nn.Module, Batch]:
    config = transformers.ResNetConfig(
        num_channels=3,
        embedding_size=8,
        hidden_sizes=[8, 16],
        depths=[1, 1],
        layer_type="basic",
    )
    config.num_labels = 3
    torch.manual_seed(seed)
    return transformers.ResNetForImageClassification(config), batch_of(image_examples(seed))


def _planted(
    make: Callable[[int], tuple[nn.Module, Batch]], plant: Callable[[nn.Module], None]
) -> Callable[[int], tuple[nn.Module, Batch]]:
    def build(seed: int) -> tuple[nn.Module, Batch]:
        model, batch = make(seed)
        plant(model)
        return model, batch

    return build


def _replace(path: str, make: Callable[[], nn.Module]) -> Callable[[nn.Module], None]:
    def plant(model: nn.Module) -> None:
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent), child, make())

    return plant


def _subclass(path: str, mixin: type) -> Callable[[nn.Module], None]:
    def plant(model: nn.Module) -> None:
        _swap_class(model.get_submodule(path), mixin, "Buggy")

    return plant


def _from_hf_bugs(name: str, expected: str, parameter_free: bool) -> LocalBug:
    bug = BUGS[name]

    def make(seed: int) -> tuple[nn.Module, Batch]:
        model, data = bug.build(seed)
        return model, batch_of(data)

    planted = {"llama-detached-attention": "model.layers.1.self_attn"}.get(name, expected)
    return LocalBug(name, bug.architecture, planted, expected, parameter_free, False, make)


RESNET_NORM = "resnet.encoder.stages.0.layers.0.layer.0.normalization"

LOCAL_BUGS: dict[str, LocalBug] = {
    bug.name: bug
    for bug in [
        _from_hf_bugs("gpt2-gelu", "transformer.h.1.mlp.act", True),
        _from_hf_bugs("llama-detached-attention", "model.layers.1", False),
        _from_hf_bugs("mistral-rmsnorm", "model.layers.1.post_attention_layernorm", False),
        _from_hf_bugs("qwen2-inplace-silu", "model.layers.1.mlp.act_fn", True),
        _from_hf_bugs("gpt-neox-embedding", "gpt_neox.embed_in", False),
        _from_hf_bugs("bert-layernorm", "bert.encoder.layer.1.output.LayerNorm", False),
        _from_hf_bugs("vit-position-embedding", "vit.embeddings", False),
        LocalBug(
            "gemma2-gelu",
            "gemma2",
            "model.layers.0.mlp.act_fn",
            "model.layers.0.mlp.act_fn",
            True,
            True,
            _planted(
                _causal("Gemma2ForCausalLM", head_dim=16),
                _replace("model.layers.0.mlp.act_fn", BuggyTanhGELU),
            ),
        ),
        LocalBug(
            "resnet-batchnorm",
            "resnet",
            RESNET_NORM,
            RESNET_NORM,
            False,
            True,
            _planted(_resnet, _subclass(RESNET_NORM, _BatchNormWithoutMean)),
        ),
        LocalBug(
            "llama-softmax",
            "llama",
            "model.layers.0.self_attn",
            "model.layers.0.self_attn",
            True,
            False,
            _causal("LlamaForCausalLM", attn_implementation=SOFTMAX_BUG_ATTENTION),
        ),
        LocalBug(
            "olmo-layernorm",
            "olmo",
            "model.layers.1.post_attention_layernorm",
            "model.layers.1.post_attention_layernorm",
            True,
            False,
            _planted(
                _causal("OlmoForCausalLM"),
                _subclass("model.layers.1.post_attention_layernorm", _LayerNormWithoutMean),
            ),
        ),
    ]
}
"""Every planted bug, by name."""
