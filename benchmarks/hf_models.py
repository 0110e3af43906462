"""Tiny `transformers` architectures built from configs in code, each with synthetic data.

Nothing is downloaded: every model comes from a config (2 layers or fewer, hidden size
32, vocabulary 100, sequences of 16, float32, dropout at the config's defaults) and its
data is random. ``ARCHITECTURES`` maps a name to an `Architecture`; ``build(name)``
returns ``(model, dataset)`` ready for a ``transformers.Trainer``.

The data exercises what real data does: sequences are right-padded with the config's
``pad_token_id`` (so an embedding's ``padding_idx`` matters), the attention mask covers
the padding, and language-model labels are -100 on padding (masked LMs: everywhere
except the masked positions).

>>> model, data = build("llama")
>>> sorted(data[0])
['attention_mask', 'input_ids', 'labels']
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import transformers
from torch import nn

__all__ = [
    "ARCHITECTURES",
    "IGNORE_INDEX",
    "SEQUENCE_LENGTH",
    "VOCAB_SIZE",
    "Architecture",
    "Examples",
    "build",
    "parameter_count",
]

VOCAB_SIZE = 100
SEQUENCE_LENGTH = 16
EXAMPLES = 32
IGNORE_INDEX = -100
FIRST_TOKEN = 5
"""Ids below this are left to special tokens (pad, bos, eos, mask, decoder start)."""
MASK_TOKEN = 4
NUM_LABELS = 3
IMAGE_SIZE = 16
MEL_BINS = 8
AUDIO_FRAMES = 16

Batch = dict[str, torch.Tensor]


class Examples(torch.utils.data.Dataset[Batch]):
    """Examples stored as stacked tensors; item ``i`` is ``{key: tensor[i]}``."""

    def __init__(self, tensors: Batch) -> None:
        sizes = {len(tensor) for tensor in tensors.values()}
        if len(sizes) != 1:
            raise ValueError(f"tensors: expected one length, received {sorted(sizes)}")
        self.tensors = tensors

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, index: int) -> Batch:
        return {key: tensor[index] for key, tensor in self.tensors.items()}


@dataclass(frozen=True)
class Architecture:
    """One swept architecture: its `transformers` class, its task, how to build it."""

    name: str
    model_class: str
    task: str
    make: Callable[[int], tuple[nn.Module, Examples]]

    def build(self, seed: int = 0) -> tuple[nn.Module, Examples]:
        """The model (weights drawn from ``seed``) and its synthetic examples."""
        return self.make(seed)


def parameter_count(model: nn.Module) -> int:
    """Trainable parameters (shared tensors counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# -- synthetic data --------------------------------------------------------------------


def _tokens(generator: torch.Generator, pad: int, length: int = SEQUENCE_LENGTH) -> Batch:
    """Right-padded random token rows (lengths ``length // 2 .. length``) and their mask."""
    ids = torch.randint(FIRST_TOKEN, VOCAB_SIZE, (EXAMPLES, length), generator=generator)
    lengths = torch.randint(length // 2, length + 1, (EXAMPLES,), generator=generator)
    mask = (torch.arange(length) < lengths[:, None]).long()
    return {"input_ids": ids.masked_fill(mask == 0, pad), "attention_mask": mask}


def causal_lm_examples(pad: int, seed: int) -> Examples:
    """Next-token data: labels are the inputs, -100 on padding (the model shifts them)."""
    batch = _tokens(torch.Generator().manual_seed(seed), pad)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
    return Examples({**batch, "labels": labels})


def masked_lm_examples(pad: int, seed: int, mask_token: int = MASK_TOKEN) -> Examples:
    """About 20% of the real tokens replaced by ``mask_token``; labels only there."""
    generator = torch.Generator().manual_seed(seed)
    batch = _tokens(generator, pad)
    real = batch["attention_mask"] == 1
    chosen = (torch.rand(real.shape, generator=generator) < 0.2) & real
    chosen[:, 1] = True  # at least one masked token per row (every row has >= 8 tokens)
    labels = batch["input_ids"].masked_fill(~chosen, IGNORE_INDEX)
    inputs = batch["input_ids"].masked_fill(chosen, mask_token)
    return Examples({**batch, "input_ids": inputs, "labels": labels})


def _target_labels(generator: torch.Generator) -> torch.Tensor:
    target = _tokens(generator, IGNORE_INDEX, length=SEQUENCE_LENGTH // 2)
    return target["input_ids"]


def seq2seq_examples(pad: int, seed: int) -> Examples:
    """Source rows with padding; target labels of up to 8 tokens, -100 on padding."""
    generator = torch.Generator().manual_seed(seed)
    source = _tokens(generator, pad)
    return Examples({**source, "labels": _target_labels(generator)})


def classification_examples(pad: int, seed: int) -> Examples:
    """Padded rows labelled by which third of the vocabulary their first token is in."""
    batch = _tokens(torch.Generator().manual_seed(seed), pad)
    first = batch["input_ids"][:, 0] - FIRST_TOKEN
    labels = (first * NUM_LABELS // (VOCAB_SIZE - FIRST_TOKEN)).clamp(0, NUM_LABELS - 1)
    return Examples({**batch, "labels": labels})


def image_examples(seed: int) -> Examples:
    """Random 3x16x16 images labelled by the sign pattern of their mean colour."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(EXAMPLES, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    labels = (pixels.mean((1, 2, 3)) > 0).long() + (pixels[:, 0].mean((1, 2)) > 0).long()
    return Examples({"pixel_values": pixels, "labels": labels})


def audio_examples(seed: int) -> Examples:
    """Random log-mel features (8 bins x 16 frames) with short padded transcripts."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(EXAMPLES, MEL_BINS, AUDIO_FRAMES, generator=generator)
    return Examples({"input_features": features, "labels": _target_labels(generator)})


# -- the architectures -----------------------------------------------------------------


def _architecture(
    name: str, model_class: str, task: str, data: Callable[[Any, int], Examples], **options: Any
) -> Architecture:
    """``model_class`` (a `transformers` name) built from its own config class with ``options``."""

    def make(seed: int) -> tuple[nn.Module, Examples]:
        model_type = getattr(transformers, model_class)
        config = model_type.config_class(**options)
        torch.manual_seed(seed)
        model: nn.Module = model_type(config).float()
        return model, data(config, seed)

    return Architecture(name, model_class, task, make)


def _causal(config: Any, seed: int) -> Examples:
    return causal_lm_examples(config.pad_token_id, seed)


def _masked(config: Any, seed: int) -> Examples:
    return masked_lm_examples(config.pad_token_id, seed)


def _seq2seq(config: Any, seed: int) -> Examples:
    return seq2seq_examples(config.pad_token_id, seed)


def _classify(config: Any, seed: int) -> Examples:
    return classification_examples(config.pad_token_id, seed)


def _image(config: Any, seed: int) -> Examples:
    return image_examples(seed)


def _audio(config: Any, seed: int) -> Examples:
    return audio_examples(seed)


SPECIAL = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
SMALL = {"vocab_size": VOCAB_SIZE, "hidden_size": 32, "num_hidden_layers": 2}
ATTENTION = {"num_attention_heads": 2, "max_position_embeddings": SEQUENCE_LENGTH}
DECODER = {**SMALL, **ATTENTION, **SPECIAL, "intermediate_size": 64, "num_key_value_heads": 1}
ENCODER = {**SMALL, **ATTENTION, "intermediate_size": 64, "type_vocab_size": 2}
CLASSIFIER = {**ENCODER, "num_labels": NUM_LABELS}
SEQ2SEQ = {
    "vocab_size": VOCAB_SIZE,
    "d_model": 32,
    "encoder_layers": 1,
    "decoder_layers": 1,
    "encoder_attention_heads": 2,
    "decoder_attention_heads": 2,
    "encoder_ffn_dim": 64,
    "decoder_ffn_dim": 64,
}
MOE = {**DECODER, "num_experts_per_tok": 2, "output_router_logits": False}
ROBERTA_POSITIONS = SEQUENCE_LENGTH + 2  # RoBERTa counts positions from padding_idx + 1
CAUSAL, MASKED = "causal LM", "masked LM"

_ALL = [
    _architecture(
        "gpt2",
        "GPT2LMHeadModel",
        CAUSAL,
        _causal,
        **SPECIAL,
        vocab_size=VOCAB_SIZE,
        n_positions=SEQUENCE_LENGTH,
        n_embd=32,
        n_layer=2,
        n_head=2,
    ),
    _architecture("gpt-neox", "GPTNeoXForCausalLM", CAUSAL, _causal, **DECODER),
    _architecture(
        "opt",
        "OPTForCausalLM",
        CAUSAL,
        _causal,
        **SMALL,
        **ATTENTION,
        ffn_dim=64,
        word_embed_proj_dim=32,
    ),
    _architecture("llama", "LlamaForCausalLM", CAUSAL, _causal, **DECODER),
    _architecture("mistral", "MistralForCausalLM", CAUSAL, _causal, **DECODER),
    _architecture("qwen2", "Qwen2ForCausalLM", CAUSAL, _causal, **DECODER),
    _architecture("gemma", "GemmaForCausalLM", CAUSAL, _causal, **DECODER, head_dim=16),
    _architecture("phi", "PhiForCausalLM", CAUSAL, _causal, **DECODER),
    _architecture(
        "falcon",
        "FalconForCausalLM",
        CAUSAL,
        _causal,
        **SMALL,
        **ATTENTION,
        **SPECIAL,
        ffn_hidden_size=64,
    ),
    _architecture("bert-mlm", "BertForMaskedLM", MASKED, _masked, **ENCODER),
    _architecture(
        "roberta-mlm",
        "RobertaForMaskedLM",
        MASKED,
        _masked,
        **{**ENCODER, "max_position_embeddings": ROBERTA_POSITIONS, "type_vocab_size": 1},
    ),
    _architecture(
        "deberta-v2-mlm",
        "DebertaV2ForMaskedLM",
        MASKED,
        _masked,
        **{**ENCODER, "type_vocab_size": 0},
        relative_attention=True,
        position_buckets=8,
        pos_att_type=["p2c", "c2p"],
        position_biased_input=False,
        norm_rel_ebd="layer_norm",
        share_att_key=True,
    ),
    _architecture(
        "t5",
        "T5ForConditionalGeneration",
        "seq2seq",
        _seq2seq,
        vocab_size=VOCAB_SIZE,
        d_model=32,
        d_kv=16,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=1,
        num_heads=2,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    ),
    _architecture(
        "bart",
        "BartForConditionalGeneration",
        "seq2seq",
        _seq2seq,
        **SEQ2SEQ,
        max_position_embeddings=SEQUENCE_LENGTH,
    ),
    _architecture(
        "whisper",
        "WhisperForConditionalGeneration",
        "speech seq2seq",
        _audio,
        **SEQ2SEQ,
        **SPECIAL,
        num_mel_bins=MEL_BINS,
        max_source_positions=AUDIO_FRAMES // 2,
        max_target_positions=SEQUENCE_LENGTH,
        decoder_start_token_id=3,
        suppress_tokens=None,
        begin_suppress_tokens=None,
    ),
    _architecture(
        "bert-cls", "BertForSequenceClassification", "classifier", _classify, **CLASSIFIER
    ),
    _architecture(
        "distilbert-cls",
        "DistilBertForSequenceClassification",
        "classifier",
        _classify,
        vocab_size=VOCAB_SIZE,
        dim=32,
        n_layers=2,
        n_heads=2,
        hidden_dim=64,
        max_position_embeddings=SEQUENCE_LENGTH,
        num_labels=NUM_LABELS,
    ),
    _architecture(
        "albert-cls",
        "AlbertForSequenceClassification",
        "classifier",
        _classify,
        **CLASSIFIER,
        embedding_size=16,
    ),
    _architecture(
        "electra-cls",
        "ElectraForSequenceClassification",
        "classifier",
        _classify,
        **CLASSIFIER,
        embedding_size=16,
    ),
    _architecture(
        "vit",
        "ViTForImageClassification",
        "image classifier",
        _image,
        image_size=IMAGE_SIZE,
        patch_size=4,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=NUM_LABELS,
    ),
    _architecture(
        "mixtral",
        "MixtralForCausalLM",
        "MoE causal LM",
        _causal,
        **{**MOE, "intermediate_size": 32},
        num_local_experts=4,
    ),
    _architecture(
        "qwen2-moe",
        "Qwen2MoeForCausalLM",
        "MoE causal LM",
        _causal,
        **MOE,
        num_experts=4,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
        decoder_sparse_step=1,
    ),
]
ARCHITECTURES: dict[str, Architecture] = {architecture.name: architecture for architecture in _ALL}


def build(name: str, seed: int = 0) -> tuple[nn.Module, Examples]:
    """``ARCHITECTURES[name].build(seed)``, with a clear error for an unknown name."""
    if name not in ARCHITECTURES:
        raise KeyError(f"architecture: expected one of {sorted(ARCHITECTURES)}, received {name!r}")
    return ARCHITECTURES[name].build(seed)
