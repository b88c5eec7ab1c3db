"""RetroMAE masks built as tensors on the batch's device.

FlagEmbedding's collator builds one (L, L) decoder mask per sample in Python and whole-word masks token by
token (FlagEmbedding issues #208, #1325: the collator is 39-51% of a step and the GPU idles). Here every mask
is a handful of batched tensor ops on the device the ids live on, and the number of masked tokens is not
capped (upstream caps it at 512 per sequence, which binds above ~1,700 tokens at ratio 0.3).

Reproducibility: pass a `torch.Generator` on the ids' device. Draw order, for callers that need to
replay it: `mask_encoder_input` draws rand(B, L) (selection), rand(B, L) (replacement kind), then
randint(B, L) (random tokens); `decoder_attention_mask` draws one rand(B, L, L).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from chuxin_ray.losses.masked_lm import IGNORE_INDEX

log = logging.getLogger(__name__)


@dataclass
class RetroMAEBatch:
    """Everything `RetroMAE.forward` takes; `as_kwargs()` passes it without copying tensors."""

    input_ids: torch.Tensor  # (B, L) original ids, the decoder's keys/values and targets
    attention_mask: torch.Tensor  # (B, L) 1 = token, 0 = pad
    encoder_input_ids: torch.Tensor  # (B, L) ids after 80/10/10 replacement
    encoder_labels: torch.Tensor  # (B, L) original id where masked, IGNORE_INDEX elsewhere
    decoder_labels: torch.Tensor  # (B, L) original id at every non-special token, IGNORE_INDEX elsewhere
    decoder_attention_mask: torch.Tensor  # (B, L, L) bool, True = query i may attend key j

    def as_kwargs(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def _id_tensor(ids: Sequence[int], device: torch.device) -> torch.Tensor:
    # Sorted and unique in Python: special ids are a handful, and a device-side unique() would sync.
    return torch.tensor(sorted({int(i) for i in ids}), dtype=torch.long, device=device)  # (S,)


def maskable_positions(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, special_token_ids: Sequence[int]
) -> torch.Tensor:
    """Positions that are real tokens and not special tokens: (B, L) bool."""
    specials = _id_tensor(special_token_ids, input_ids.device)  # (S,)
    return attention_mask.bool() & ~torch.isin(input_ids, specials)  # (B, L)


def _random_non_special_ids(
    shape: torch.Size,
    vocab_size: int,
    excluded: Sequence[int],
    device: torch.device,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Uniform ids over [0, vocab_size) minus `excluded`.

    A random <pad> inside a sequence would shift every later XLM-R position id (they count non-pad
    tokens), so specials are never drawn; HF's DataCollatorForLanguageModeling draws them.
    """
    skip = sorted({int(i) for i in excluded if 0 <= int(i) < vocab_size})
    draw = torch.randint(0, vocab_size - len(skip), shape, generator=generator, device=device)  # (B, L)
    # The k-th skipped id (0-based) is passed by every draw >= skip[k] - k, so id = draw + #{k: skip[k] - k <= draw}.
    thresholds = torch.tensor([s - k for k, s in enumerate(skip)], dtype=torch.long, device=device)  # (S,)
    return draw + torch.searchsorted(thresholds, draw, right=True)  # (B, L)


def _word_start_index(word_start: torch.Tensor, maskable: torch.Tensor) -> torch.Tensor:
    """For every position, the index of the first token of its word: (B, L) long.

    A word also starts at any maskable token that follows a special/pad token, so a tokenizer that marks
    no start after <s> cannot glue a word to the special before it.
    """
    length = word_start.size(1)
    after_unmaskable = torch.ones_like(maskable)  # (B, L)
    after_unmaskable[:, 1:] = ~maskable[:, :-1]
    starts = word_start.bool() | ~maskable | after_unmaskable  # (B, L)
    positions = torch.arange(length, device=word_start.device).expand_as(word_start)  # (B, L)
    return torch.where(starts, positions, 0).cummax(dim=1).values  # (B, L)


def mask_encoder_input(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    special_token_ids: Sequence[int],
    mask_token_id: int,
    vocab_size: int,
    mask_ratio: float = 0.3,
    word_start: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT-style masking for the RetroMAE encoder: returns (masked input ids, labels), both (B, L).

    Each maskable token (not special, not pad) is selected with probability `mask_ratio`; with
    `word_start` (B, L) bool, the draw is made once per word and every token of a selected word is
    selected. A selected token becomes `mask_token_id` (80%), a random non-special id (10%), or stays
    (10%); its label is the original id, every other label is IGNORE_INDEX. Bernoulli selection gives the
    same expected ratio as upstream's fixed-count sampling without a per-row sort.
    """
    if not 0.0 <= mask_ratio <= 1.0:
        raise ValueError(f"mask_ratio={mask_ratio} must be in [0, 1]")
    device = input_ids.device
    maskable = maskable_positions(input_ids, attention_mask, special_token_ids)  # (B, L)
    selected = torch.rand(input_ids.shape, generator=generator, device=device) < mask_ratio  # (B, L)
    if word_start is not None:
        if word_start.shape != input_ids.shape:
            raise ValueError(
                f"word_start shape {tuple(word_start.shape)} != input_ids {tuple(input_ids.shape)}"
            )
        selected = selected.gather(1, _word_start_index(word_start, maskable))  # (B, L) the word's draw
    selected &= maskable  # (B, L)

    kind = torch.rand(input_ids.shape, generator=generator, device=device)  # (B, L)
    to_mask = selected & (kind < 0.8)  # (B, L) 80% -> mask token
    to_random = selected & (kind >= 0.8) & (kind < 0.9)  # (B, L) 10% -> random id, 10% unchanged
    excluded = [*special_token_ids, mask_token_id]
    random_ids = _random_non_special_ids(input_ids.shape, vocab_size, excluded, device, generator)  # (B, L)

    masked = torch.where(to_mask, mask_token_id, input_ids)  # (B, L)
    masked = torch.where(to_random, random_ids, masked)  # (B, L)
    labels = torch.where(selected, input_ids, IGNORE_INDEX)  # (B, L)
    return masked, labels


def decoder_labels(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, special_token_ids: Sequence[int]
) -> torch.Tensor:
    """The decoder reconstructs every non-special, non-pad token: (B, L) ids or IGNORE_INDEX."""
    return torch.where(
        maskable_positions(input_ids, attention_mask, special_token_ids), input_ids, IGNORE_INDEX
    )


def decoder_attention_mask(
    attention_mask: torch.Tensor, mask_ratio: float = 0.5, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Per-query random attention for the enhanced decoder: (B, L, L) bool, True = query i sees key j.

    Key j (1 <= j, j != i, not pad) is hidden from query i where u[b, i, j] < mask_ratio, u ~ U[0, 1)
    drawn once per (b, i, j); key 0 (the sentence vector) is always visible, and a query never sees its
    own token, which is what it must reconstruct. (0, 0) is the one visible diagonal entry: position 0 is
    the special first token and carries no label, and every row needs one visible key for a finite
    softmax. Pad keys are never visible; pad query rows follow the same rules and carry no label. Like
    the encoder's, the draw is Bernoulli (upstream samples a fixed count per row, which needs a sort).
    """
    if not 0.0 <= mask_ratio <= 1.0:
        raise ValueError(f"mask_ratio={mask_ratio} must be in [0, 1]")
    batch, length = attention_mask.shape
    device = attention_mask.device
    u = torch.rand((batch, length, length), generator=generator, device=device)  # (B, L, L)
    eye = torch.eye(length, dtype=torch.bool, device=device)  # (L, L)
    visible = (u >= mask_ratio) & ~eye & attention_mask.bool()[:, None, :]  # (B, L, L)
    visible[:, :, 0] = True  # key 0 = sentence vector
    return visible


def mask_retromae_batch(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    special_token_ids: Sequence[int],
    mask_token_id: int,
    vocab_size: int,
    encoder_mask_ratio: float = 0.3,
    decoder_mask_ratio: float = 0.5,
    word_start: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> RetroMAEBatch:
    """All RetroMAE inputs for one tokenised, right-padded batch (B, L), built on its device."""
    encoder_input_ids, encoder_labels = mask_encoder_input(
        input_ids,
        attention_mask,
        special_token_ids=special_token_ids,
        mask_token_id=mask_token_id,
        vocab_size=vocab_size,
        mask_ratio=encoder_mask_ratio,
        word_start=word_start,
        generator=generator,
    )
    return RetroMAEBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        encoder_input_ids=encoder_input_ids,
        encoder_labels=encoder_labels,
        decoder_labels=decoder_labels(input_ids, attention_mask, special_token_ids),
        decoder_attention_mask=decoder_attention_mask(attention_mask, decoder_mask_ratio, generator),
    )


@dataclass(frozen=True)
class TokenizerInfo:
    """What the workers need of the tokenizer, extracted once on the driver."""

    vocab_size: int
    pad_id: int
    mask_id: int
    special_ids: tuple[int, ...]
    word_start: np.ndarray | None  # (V,) bool, False for `##` continuation pieces; None: token-level


def tokenizer_info(tok, whole_word_mask: bool) -> TokenizerInfo:
    """The ids masking needs, and the word starts for whole-word masking where the vocabulary marks them."""
    word_start = None
    if whole_word_mask:
        pieces = tok.convert_ids_to_tokens(list(range(len(tok))))
        continuation = np.array([p is not None and p.startswith("##") for p in pieces])  # (V,)
        if continuation.any():  # WordPiece marks pieces; SentencePiece (XLM-R) marks none usable for CJK
            word_start = ~continuation
        else:
            log.info("pretrain: the vocabulary marks no `##` word pieces; token-level masking")
    return TokenizerInfo(
        vocab_size=len(tok),
        pad_id=tok.pad_token_id,
        mask_id=tok.mask_token_id,
        special_ids=tuple(sorted(set(tok.all_special_ids))),
        word_start=word_start,
    )
