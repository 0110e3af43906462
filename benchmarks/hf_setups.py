"""The second architecture sweep: tiny models and training setups that stress a float64 replay.

``python -m benchmarks.architectures --set 2`` trains each of ``SETUPS`` with the real
``transformers.Trainer`` (its own defaults, plus the training arguments a setup names)
and ``GradWatch(every=1)``. None of them is in the first set (`benchmarks.hf_models`):
they were chosen for what makes a float64 replay of a float32 step hard:

* random draws other than dropout: stochastic depth (drop path: Swin, ConvNeXt,
  SegFormer, BEiT, DINOv2, PoolFormer), layerdrop (Wav2Vec2, HuBERT, Data2Vec-Audio CTC),
  router jitter (SwitchTransformers, Mixtral);
* gradient checkpointing (Llama, BERT), label smoothing (Llama, BERT), bf16 autocast
  (Llama, BERT), LoRA adapters with dropout (peft, where installed);
* CTC audio, hierarchical vision, BatchNorm (ResNet), a state-space model (Mamba).

Every model is built from a tiny config (nothing downloaded) with synthetic data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers
from torch import nn

from benchmarks.hf_models import (
    DECODER,
    ENCODER,
    EXAMPLES,
    IMAGE_SIZE,
    NUM_LABELS,
    Architecture,
    Examples,
    causal_lm_examples,
    classification_examples,
    image_examples,
    masked_lm_examples,
    seq2seq_examples,
)

__all__ = ["SETUPS", "Setup"]

AUDIO_SAMPLES = 400
"""Raw audio length: two strided convolutions (stride 4) leave 24 frames for CTC."""
CTC_VOCAB = 20


@dataclass(frozen=True)
class Setup(Architecture):
    """One row of the second sweep: an `Architecture` and how the Trainer trains it."""

    arguments: dict[str, Any] = field(default_factory=dict)
    """`TrainingArguments` fields set on top of the sweep's (bf16, label smoothing...)."""
    stresses: str = ""


def _model(model_class: str, data: Callable[[Any, int], Examples], **options: Any) -> Any:
    def make(seed: int) -> tuple[nn.Module, Examples]:
        model_type = getattr(transformers, model_class)
        config = model_type.config_class(**options)
        torch.manual_seed(seed)
        model: nn.Module = model_type(config).float()
        return model, data(config, seed)

    return make


def _image(config: Any, seed: int) -> Examples:
    return image_examples(seed)


def _segmentation(config: Any, seed: int) -> Examples:
    """Random images, each pixel labelled by the sign pattern of its colour."""
    pixels = image_examples(seed).tensors["pixel_values"]
    labels = (pixels[:, 0] > 0).long() + (pixels[:, 1] > 0).long()
    return Examples({"pixel_values": pixels, "labels": labels})


def _ctc(config: Any, seed: int) -> Examples:
    """Raw audio and transcripts of 2 to 4 characters, padded with -100."""
    generator = torch.Generator().manual_seed(seed)
    audio = torch.randn(EXAMPLES, AUDIO_SAMPLES, generator=generator)
    labels = torch.randint(1, CTC_VOCAB, (EXAMPLES, 4), generator=generator)
    lengths = torch.randint(2, 5, (EXAMPLES,), generator=generator)
    labels = labels.masked_fill(torch.arange(4) >= lengths[:, None], -100)
    return Examples({"input_values": audio, "labels": labels})


def _causal(config: Any, seed: int) -> Examples:
    return causal_lm_examples(config.pad_token_id, seed)


def _masked(config: Any, seed: int) -> Examples:
    return masked_lm_examples(config.pad_token_id or 0, seed)


def _classify(config: Any, seed: int) -> Examples:
    return classification_examples(config.pad_token_id or 0, seed)


def _seq2seq(config: Any, seed: int) -> Examples:
    return seq2seq_examples(config.pad_token_id, seed)


def _lora(base: Callable[[int], tuple[nn.Module, Examples]]) -> Any:
    """``base`` with peft LoRA adapters (rank 4, dropout 0.1) on the attention projections."""

    def make(seed: int) -> tuple[nn.Module, Examples]:
        import peft  # optional: the row is skipped where peft is not installed

        model, data = base(seed)
        config = peft.LoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"]
        )
        torch.manual_seed(seed + 1)
        return peft.get_peft_model(model, config), data

    return make


VISION = {"image_size": IMAGE_SIZE, "num_channels": 3, "num_labels": NUM_LABELS}
STAGES = {"hidden_sizes": [8, 16], "depths": [1, 1]}
CTC = {
    "vocab_size": CTC_VOCAB,
    "hidden_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 32,
    "conv_dim": (8, 8),
    "conv_stride": (4, 4),
    "conv_kernel": (8, 8),
    "num_conv_pos_embeddings": 4,
    "num_conv_pos_embedding_groups": 2,
    "mask_time_prob": 0.0,
    "pad_token_id": 0,
    "ctc_loss_reduction": "mean",
    "layerdrop": 0.3,
}
VIT_LIKE = {
    **VISION,
    "patch_size": 4,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
}
DROP_PATH = "stochastic depth"
CAUSAL = "causal LM"
LLAMA = _model("LlamaForCausalLM", _causal, **DECODER)
BERT = _model("BertForMaskedLM", _masked, **ENCODER)

_ALL = [
    Setup(
        "swin",
        "SwinForImageClassification",
        "hierarchical vision",
        _model(
            "SwinForImageClassification",
            _image,
            **VISION,
            patch_size=2,
            embed_dim=8,
            depths=[1, 1],
            num_heads=[1, 2],
            window_size=2,
            drop_path_rate=0.2,
        ),
        stresses=DROP_PATH,
    ),
    Setup(
        "convnext",
        "ConvNextForImageClassification",
        "hierarchical vision",
        _model(
            "ConvNextForImageClassification",
            _image,
            **VISION,
            **STAGES,
            num_stages=2,
            patch_size=2,
            drop_path_rate=0.2,
        ),
        stresses=f"{DROP_PATH}, layer scale",
    ),
    Setup(
        "convnextv2",
        "ConvNextV2ForImageClassification",
        "hierarchical vision",
        _model(
            "ConvNextV2ForImageClassification",
            _image,
            **VISION,
            **STAGES,
            num_stages=2,
            patch_size=2,
            drop_path_rate=0.2,
        ),
        stresses=f"{DROP_PATH}, global response norm",
    ),
    Setup(
        "segformer",
        "SegformerForSemanticSegmentation",
        "semantic segmentation",
        _model(
            "SegformerForSemanticSegmentation",
            _segmentation,
            num_channels=3,
            num_labels=NUM_LABELS,
            num_encoder_blocks=2,
            depths=[1, 1],
            sr_ratios=[2, 1],
            hidden_sizes=[8, 16],
            patch_sizes=[3, 3],
            strides=[2, 2],
            num_attention_heads=[1, 2],
            mlp_ratios=[2, 2],
            decoder_hidden_size=16,
            drop_path_rate=0.2,
        ),
        stresses=f"{DROP_PATH}, upsampled logits",
    ),
    Setup(
        "beit",
        "BeitForImageClassification",
        "image classifier",
        _model(
            "BeitForImageClassification",
            _image,
            **VIT_LIKE,
            drop_path_rate=0.2,
            layer_scale_init_value=0.1,
            use_mean_pooling=True,
        ),
        stresses=f"{DROP_PATH}, layer scale, relative positions",
    ),
    Setup(
        "dinov2",
        "Dinov2ForImageClassification",
        "image classifier",
        _model("Dinov2ForImageClassification", _image, **VIT_LIKE, drop_path_rate=0.2),
        stresses=f"{DROP_PATH}, layer scale",
    ),
    Setup(
        "poolformer",
        "PoolFormerForImageClassification",
        "hierarchical vision",
        _model(
            "PoolFormerForImageClassification",
            _image,
            **VISION,
            **STAGES,
            num_encoder_blocks=2,
            patch_sizes=[3, 3],
            strides=[2, 2],
            padding=[1, 1],
            drop_path_rate=0.2,
        ),
        stresses=f"{DROP_PATH}, group norm",
    ),
    Setup(
        "resnet",
        "ResNetForImageClassification",
        "image classifier",
        _model(
            "ResNetForImageClassification",
            _image,
            num_channels=3,
            num_labels=NUM_LABELS,
            embedding_size=8,
            **STAGES,
        ),
        stresses="BatchNorm in train mode (running statistics)",
    ),
    Setup(
        "wav2vec2-ctc",
        "Wav2Vec2ForCTC",
        "CTC audio",
        _model("Wav2Vec2ForCTC", _ctc, **CTC),
        stresses="layerdrop, CTC loss",
    ),
    Setup(
        "hubert-ctc",
        "HubertForCTC",
        "CTC audio",
        _model("HubertForCTC", _ctc, **CTC),
        stresses="layerdrop, CTC loss",
    ),
    Setup(
        "data2vec-audio-ctc",
        "Data2VecAudioForCTC",
        "CTC audio",
        _model(
            "Data2VecAudioForCTC",
            _ctc,
            **{**CTC, "num_conv_pos_embeddings": 2, "num_conv_pos_embedding_groups": 2},
        ),
        stresses="layerdrop, CTC loss",
    ),
    Setup(
        "switch-transformers",
        "SwitchTransformersForConditionalGeneration",
        "MoE seq2seq",
        _model(
            "SwitchTransformersForConditionalGeneration",
            _seq2seq,
            vocab_size=100,
            d_model=16,
            d_kv=8,
            d_ff=32,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=2,
            num_experts=4,
            expert_capacity=8,
            router_jitter_noise=0.1,
            encoder_sparse_step=1,
            decoder_sparse_step=1,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        ),
        stresses="router jitter (uniform_ on the hidden states), expert capacity",
    ),
    Setup(
        "mixtral-jitter",
        "MixtralForCausalLM",
        "MoE causal LM",
        _model(
            "MixtralForCausalLM",
            _causal,
            **{**DECODER, "intermediate_size": 32},
            num_local_experts=4,
            num_experts_per_tok=2,
            router_jitter_noise=0.1,
            output_router_logits=False,
        ),
        stresses="router jitter",
    ),
    Setup(
        "llama-checkpointing",
        "LlamaForCausalLM",
        CAUSAL,
        LLAMA,
        {"gradient_checkpointing": True},
        "gradient checkpointing (RMSNorm's float32 cast in the recompute)",
    ),
    Setup(
        "bert-checkpointing",
        "BertForMaskedLM",
        "masked LM",
        BERT,
        {"gradient_checkpointing": True},
        "gradient checkpointing with dropout",
    ),
    Setup(
        "llama-label-smoothing",
        "LlamaForCausalLM",
        CAUSAL,
        LLAMA,
        {"label_smoothing_factor": 0.1},
        "label smoothing (the Trainer pops the labels)",
    ),
    Setup(
        "bert-label-smoothing",
        "BertForMaskedLM",
        "masked LM",
        BERT,
        {"label_smoothing_factor": 0.1},
        "label smoothing with dropout",
    ),
    Setup(
        "llama-bf16",
        "LlamaForCausalLM",
        CAUSAL,
        LLAMA,
        {"bf16": True},
        "bf16 autocast (entered inside the wrapped forward)",
    ),
    Setup(
        "bert-bf16",
        "BertForMaskedLM",
        "masked LM",
        BERT,
        {"bf16": True},
        "bf16 autocast with dropout",
    ),
    Setup(
        "gpt2-accumulation-smoothing",
        "GPT2LMHeadModel",
        CAUSAL,
        _model(
            "GPT2LMHeadModel",
            _causal,
            vocab_size=100,
            n_positions=16,
            n_embd=32,
            n_layer=2,
            n_head=2,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ),
        {"label_smoothing_factor": 0.1, "gradient_accumulation_steps": 2},
        "label smoothing under gradient accumulation, dropout",
    ),
    Setup(
        "llama-lora",
        "PeftModelForCausalLM",
        "LoRA adapters",
        _lora(LLAMA),
        {},
        "peft LoRA (frozen base, adapter dropout)",
    ),
    Setup(
        "mamba",
        "MambaForCausalLM",
        "state-space LM",
        _model(
            "MambaForCausalLM",
            _causal,
            vocab_size=100,
            hidden_size=16,
            state_size=4,
            num_hidden_layers=2,
            expand=2,
            conv_kernel=2,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            use_mambapy=False,
        ),
        stresses="selective scan (the slow path on the CPU)",
    ),
    Setup(
        "bert-cls-smoothing",
        "BertForSequenceClassification",
        "classifier",
        _model("BertForSequenceClassification", _classify, **ENCODER, num_labels=NUM_LABELS),
        {"label_smoothing_factor": 0.1},
        "label smoothing on a classifier (labels not shifted), dropout",
    ),
]
SETUPS: dict[str, Setup] = {setup.name: setup for setup in _ALL}
