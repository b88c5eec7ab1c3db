"""Tiny masked-LMs built from a config with a fixed seed: for tests and the laptop demo, never downloaded."""

from __future__ import annotations

import torch
from transformers import AutoModelForMaskedLM, PretrainedConfig, PreTrainedModel, XLMRobertaConfig


def tiny_xlmr_config(
    vocab_size: int,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 2,
    intermediate: int = 64,
    max_position: int = 514,
    pad_token_id: int = 1,
    bos_token_id: int = 0,
    eos_token_id: int = 2,
    dropout: float = 0.1,
    **overrides: object,
) -> XLMRobertaConfig:
    """An XLM-R config of any size; the defaults give ~18k parameters besides the embedding tables.

    max_position = 514 because XLM-R numbers positions from pad_token_id + 1 = 2, so 512 tokens need 514
    rows (the real xlm-roberta/bge-m3 value is 8194 for 8192 tokens). Ids follow XLM-R: <s>=0, <pad>=1,
    </s>=2. `overrides` go straight to XLMRobertaConfig (e.g. attn_implementation, initializer_range).
    """
    if hidden % heads:
        raise ValueError(f"hidden={hidden} must be divisible by heads={heads}")
    return XLMRobertaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        max_position_embeddings=max_position,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        type_vocab_size=1,  # XLM-R has one segment type
        **overrides,
    )


def build_tiny_masked_lm(config: PretrainedConfig, seed: int = 0) -> PreTrainedModel:
    """A randomly initialised masked-LM for any masked-LM config (XLM-R, BERT, ...), identical for one seed.

    The global RNG is forked, so building a model does not move the caller's random stream.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForMaskedLM.from_config(config)
    return model


def token_positions(config: PretrainedConfig) -> int:
    """Tokens an encoder can embed: XLM-R/RoBERTa number positions from pad_token_id + 1 (514 rows serve
    512 tokens, bge-m3's 8194 serve 8192); BERT from 0."""
    offset = config.pad_token_id + 1 if config.model_type in ("xlm-roberta", "roberta") else 0
    return config.max_position_embeddings - offset
