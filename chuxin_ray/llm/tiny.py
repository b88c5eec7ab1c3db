"""A tiny random causal LM with a chat template, built from a config: the CPU service in tests and
the laptop demo. It writes nonsense, but through exactly the code a real model goes through."""

from __future__ import annotations

from pathlib import Path

import torch

# ChatML-like, with the tokenizer's own special tokens (the demo WordPiece tokenizer has no
# <|im_start|>) and Chinese role names (its vocabulary, trained on Chinese text, has no "user").
CHAT_TEMPLATE = (
    "{% set names = {'system': '系统', 'user': '用户', 'assistant': '助手'} %}"
    "{% for message in messages %}"
    "{{ bos_token }}{{ names[message['role']] }}\n{{ message['content'] }}{{ eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ bos_token }}助手\n{% endif %}"
)


def build_tiny_causal_lm(
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    seed: int = 0,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 2,
    max_position: int = 1024,
    initializer_range: float = 0.2,
) -> Path:
    """A Qwen2-architecture LM sized to the tokenizer, randomly initialised with `seed`, saved with the
    tokenizer (and CHAT_TEMPLATE when it has none) so `from_pretrained(out_dir)` loads both.
    ~2 x 12 x hidden^2 parameters besides the (vocab, hidden) embedding. initializer_range 0.2, not
    Qwen2's 0.02: at 0.02 the logits are so flat that greedy decoding repeats one token (<unk>)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    if tok.chat_template is None:
        tok.chat_template = CHAT_TEMPLATE
    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=1,  # grouped-query attention, as Qwen2 ships
        max_position_embeddings=max_position,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
        initializer_range=initializer_range,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    out = Path(out_dir)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out
