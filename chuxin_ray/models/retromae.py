"""RetroMAE: a masked-LM encoder plus a one-layer enhanced decoder (Xiao et al. 2022, arXiv:2205.12035).

The encoder reads the input with ~30% of tokens masked; its first token's last hidden state is the
sentence vector. The decoder must rebuild the whole unmasked input from that vector: its queries are the
sentence vector plus position embeddings, its keys/values are [sentence vector; embeddings of the
unmasked tokens 1..L-1], and each query sees key 0 and a random half of the other keys, never its own
token. Loss = encoder_weight * encoder MLM CE + decoder_weight * decoder CE.

Masks come from `chuxin_ray.models.masking`; this module is pure PyTorch and deterministic given them.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.activations import ACT2FN

from chuxin_ray.losses.masked_lm import IGNORE_INDEX, SplitHead, masked_lm_loss, split_lm_head


class RetroMAEOutput(NamedTuple):
    """A NamedTuple so DDP/FSDP output traversal (pytree) sees the tensors."""

    loss: torch.Tensor  # () weighted sum, the one to backpropagate
    encoder_loss: torch.Tensor  # () mean CE over masked tokens
    decoder_loss: torch.Tensor  # () mean CE over every non-special token
    encoder_tokens: torch.Tensor  # () number of encoder labels
    decoder_tokens: torch.Tensor  # () number of decoder labels


class EnhancedDecoderLayer(nn.Module):
    """One post-LN transformer layer (BERT's layout) whose queries and keys/values come from two streams.

    Queries from `query` (B, Lq, H), keys and values from `context` (B, Lk, H); the residual adds to the
    query stream. Initialised as BERT initialises a layer: N(0, initializer_range) weights, zero biases.
    """

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        hidden = config.hidden_size
        if hidden % config.num_attention_heads:
            raise ValueError(
                f"hidden_size={hidden} not divisible by num_attention_heads={config.num_attention_heads}"
            )
        self.heads = config.num_attention_heads
        self.head_dim = hidden // self.heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.attention_output = nn.Linear(hidden, hidden)
        self.attention_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.intermediate = nn.Linear(hidden, config.intermediate_size)
        self.activation = ACT2FN[config.hidden_act]
        self.output = nn.Linear(config.intermediate_size, hidden)
        self.output_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.attention_dropout = config.attention_probs_dropout_prob
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=config.initializer_range)
                nn.init.zeros_(module.bias)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)  # (B, heads, L, H/heads)

    def forward(
        self, query: torch.Tensor, context: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """query (B, Lq, H), context (B, Lk, H), attention_mask (B, Lq, Lk) bool, True = may attend."""
        q = self._split_heads(self.query(query))  # (B, heads, Lq, d)
        k = self._split_heads(self.key(context))  # (B, heads, Lk, d)
        v = self._split_heads(self.value(context))  # (B, heads, Lk, d)
        attended = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attention_mask[:, None],
            dropout_p=self.attention_dropout if self.training else 0.0,
        )  # (B, heads, Lq, d)
        attended = attended.transpose(1, 2).flatten(2)  # (B, Lq, H)
        hidden = self.attention_norm(query + self.dropout(self.attention_output(attended)))  # (B, Lq, H)
        ffn = self.output(self.activation(self.intermediate(hidden)))  # (B, Lq, H)
        return self.output_norm(hidden + self.dropout(ffn))  # (B, Lq, H)


def _lm_head_name(masked_lm: PreTrainedModel) -> str:
    """The child of a masked-LM that is not its base model: `lm_head` in XLM-R/RoBERTa, `cls` in BERT.

    The whole head (dense + activation + LayerNorm + vocabulary projection) is needed, not just
    get_output_embeddings(), which is only the final projection.
    """
    base = masked_lm.base_model
    heads = [name for name, child in masked_lm.named_children() if child is not base]
    projection = masked_lm.get_output_embeddings()
    if len(heads) != 1 or projection is None:
        raise ValueError(
            f"{type(masked_lm).__name__}: expected a masked-LM with one base model and one LM head, "
            f"found children {[name for name, _ in masked_lm.named_children()]}"
        )
    if not any(module is projection for module in getattr(masked_lm, heads[0]).modules()):
        raise ValueError(f"{type(masked_lm).__name__}.{heads[0]} does not hold the output embeddings")
    return heads[0]


class RetroMAE(nn.Module):
    """RetroMAE pretraining around any Hugging Face XLM-R/BERT-style masked-LM.

    The decoder shares the masked-LM's embeddings and LM head and owns one EnhancedDecoderLayer built
    from the masked-LM's config. `state_dict()` holds both (`lm.*`, `decoder.*`); `save_encoder` writes
    the masked-LM alone for finetuning.
    """

    def __init__(
        self,
        masked_lm: PreTrainedModel,
        encoder_weight: float = 1.0,
        decoder_weight: float = 1.0,
        lm_head_chunk_size: int | None = None,
        decoder_seed: int | None = None,
    ) -> None:
        super().__init__()
        self.lm = masked_lm
        self._head_name = _lm_head_name(masked_lm)
        embeddings = getattr(masked_lm.base_model, "embeddings", None)
        if embeddings is None or not isinstance(
            getattr(embeddings, "position_embeddings", None), nn.Embedding
        ):
            raise ValueError(f"{type(masked_lm).__name__}: the decoder needs absolute position embeddings")
        if getattr(masked_lm.config, "position_embedding_type", "absolute") != "absolute":
            raise ValueError(
                f"position_embedding_type={masked_lm.config.position_embedding_type!r} is not absolute"
            )
        self.encoder_weight = encoder_weight
        self.decoder_weight = decoder_weight
        self.lm_head_chunk_size = lm_head_chunk_size
        # Where the head's transform and vocabulary projection are, so chunked heads need no recompute
        # (losses/masked_lm.py); None for a head of unknown layout. A layout name, not modules: a copy
        # of this model must use its own head.
        split = split_lm_head(self.lm_head)
        self._head_layout = split.layout if split is not None else None
        with torch.random.fork_rng(devices=[], enabled=decoder_seed is not None):
            if decoder_seed is not None:
                torch.manual_seed(decoder_seed)
            self.decoder = EnhancedDecoderLayer(masked_lm.config)
        self.decoder.to(device=masked_lm.device, dtype=masked_lm.dtype)

    # Properties, not attributes: assigning a submodule twice would duplicate it in state_dict().
    @property
    def encoder(self) -> nn.Module:
        return self.lm.base_model

    @property
    def embeddings(self) -> nn.Module:
        return self.lm.base_model.embeddings

    @property
    def lm_head(self) -> nn.Module:
        return getattr(self.lm, self._head_name)

    def _loss_head(self) -> nn.Module | SplitHead:
        return self.lm_head if self._head_layout is None else SplitHead(self.lm_head, self._head_layout)

    def position_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Position ids as the encoder's embeddings compute them: (B, L)."""
        padding_idx = getattr(self.embeddings, "padding_idx", None)
        if padding_idx is not None:
            # RoBERTa/XLM-R count non-pad tokens from padding_idx + 1; pads get padding_idx (a zero row).
            not_pad = input_ids.ne(padding_idx).long()  # (B, L)
            return not_pad.cumsum(dim=1) * not_pad + padding_idx  # (B, L)
        return torch.arange(input_ids.size(1), device=input_ids.device).expand_as(input_ids)  # (B, L) BERT

    def sentence_embedding(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The first token's last hidden state: (B, H)."""
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, 0]

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        encoder_input_ids: torch.Tensor,
        encoder_labels: torch.Tensor,
        decoder_labels: torch.Tensor,
        decoder_attention_mask: torch.Tensor,
    ) -> RetroMAEOutput:
        """Tensors as `masking.mask_retromae_batch` builds them: ids/labels (B, L), decoder mask (B, L, L)."""
        encoder_hidden = self.encoder(
            input_ids=encoder_input_ids, attention_mask=attention_mask
        ).last_hidden_state  # (B, L, H)
        head = self._loss_head()
        encoder_loss = masked_lm_loss(encoder_hidden, encoder_labels, head, self.lm_head_chunk_size)  # ()

        sentence = encoder_hidden[:, :1]  # (B, 1, H)
        query = sentence + self.embeddings.position_embeddings(self.position_ids(input_ids))  # (B, L, H)
        # Word + position (+ type 0) embeddings, LayerNorm and dropout, exactly as the encoder embeds its input.
        token_embeddings = self.embeddings(input_ids=input_ids)  # (B, L, H)
        context = torch.cat([sentence, token_embeddings[:, 1:]], dim=1)  # (B, L, H)
        decoded = self.decoder(query, context, decoder_attention_mask)  # (B, L, H)
        decoder_loss = masked_lm_loss(decoded, decoder_labels, head, self.lm_head_chunk_size)  # ()

        return RetroMAEOutput(
            loss=self.encoder_weight * encoder_loss + self.decoder_weight * decoder_loss,
            encoder_loss=encoder_loss,
            decoder_loss=decoder_loss,
            encoder_tokens=encoder_labels.ne(IGNORE_INDEX).sum(),
            decoder_tokens=decoder_labels.ne(IGNORE_INDEX).sum(),
        )

    def gradient_checkpointing_enable(self, **kwargs: object) -> None:
        """Checkpoint the encoder's layers (the decoder is one layer and is not worth recomputing)."""
        self.lm.gradient_checkpointing_enable(**kwargs)

    def save_encoder(self, path: str | Path, **kwargs: object) -> None:
        """Write the masked-LM with save_pretrained: AutoModel (encoder) and AutoModelForMaskedLM load it."""
        self.lm.save_pretrained(str(path), **kwargs)
