"""RetroMAE masks: ratios, the 80/10/10 split, what is never masked, whole words, the decoder mask rules."""

from __future__ import annotations

import pytest
import torch

from chuxin_ray.losses.masked_lm import IGNORE_INDEX
from chuxin_ray.models.masking import (
    decoder_attention_mask,
    decoder_labels,
    mask_encoder_input,
    mask_retromae_batch,
)

# XLM-R layout: <s>=0, <pad>=1, </s>=2, <unk>=3, <mask> = the last id.
BOS, PAD, EOS, UNK = 0, 1, 2, 3
SPECIALS = [BOS, PAD, EOS, UNK]
VOCAB = 1000
MASK = VOCAB - 1


def make_batch(batch: int, length: int, seed: int, min_tokens: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded <s> w1..wn </s> <pad>.. rows of random lengths: ids and attention mask, (B, L)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, MASK, (batch, length), generator=g)  # (B, L)
    lengths = torch.randint(min_tokens + 2, length + 1, (batch,), generator=g)  # (B,) incl. <s> and </s>
    positions = torch.arange(length)  # (L,)
    attention_mask = (positions[None, :] < lengths[:, None]).long()  # (B, L)
    ids = torch.where(attention_mask.bool(), ids, PAD)  # (B, L)
    ids[:, 0] = BOS
    ids[torch.arange(batch), lengths - 1] = EOS
    return ids, attention_mask


def encoder_mask(ids, attention_mask, seed, word_start=None, ratio=0.3):
    return mask_encoder_input(
        ids,
        attention_mask,
        special_token_ids=SPECIALS,
        mask_token_id=MASK,
        vocab_size=VOCAB,
        mask_ratio=ratio,
        word_start=word_start,
        generator=torch.Generator().manual_seed(seed),
    )


def maskable(ids, attention_mask):
    return attention_mask.bool() & ~torch.isin(ids, torch.tensor(SPECIALS))


def test_encoder_ratio_and_80_10_10_split():
    ids, attention_mask = make_batch(128, 256, seed=0)
    masked, labels = encoder_mask(ids, attention_mask, seed=1)
    selected = labels.ne(IGNORE_INDEX)
    n_selected = selected.sum().item()
    assert n_selected / maskable(ids, attention_mask).sum().item() == pytest.approx(0.3, abs=0.01)

    to_mask = (selected & masked.eq(MASK)).sum().item() / n_selected
    unchanged = (selected & masked.eq(ids)).sum().item() / n_selected
    random = (selected & masked.ne(MASK) & masked.ne(ids)).sum().item() / n_selected
    # ~5,000 selected tokens: the standard error of each share is < 0.006.
    assert to_mask == pytest.approx(0.8, abs=0.025)
    assert random == pytest.approx(0.1, abs=0.02)
    assert unchanged == pytest.approx(0.1, abs=0.02)


def test_labels_hold_originals_and_specials_padding_are_never_masked():
    ids, attention_mask = make_batch(64, 128, seed=2)
    masked, labels = encoder_mask(ids, attention_mask, seed=3)
    selected = labels.ne(IGNORE_INDEX)
    assert torch.equal(labels[selected], ids[selected])
    assert not (selected & ~maskable(ids, attention_mask)).any()
    assert torch.equal(masked[~selected], ids[~selected])
    # Random replacements never draw a special or the mask token (a random <pad> shifts XLM-R positions).
    replaced = masked[selected & masked.ne(ids) & masked.ne(MASK)]
    assert replaced.numel() > 0
    assert not torch.isin(replaced, torch.tensor([*SPECIALS, MASK])).any()
    assert replaced.min() >= 0 and replaced.max() < VOCAB


def test_no_cap_on_masked_tokens():
    # Upstream caps predictions at 512 per sequence; 0.3 x 4,094 maskable tokens is ~1,228.
    ids, attention_mask = make_batch(1, 4096, seed=4, min_tokens=4094)
    _, labels = encoder_mask(ids, attention_mask, seed=5)
    assert labels.ne(IGNORE_INDEX).sum().item() > 1100


def word_starts(batch: int, length: int, seed: int) -> torch.Tensor:
    """Random word boundaries: words of 1-4 tokens, (B, L) bool."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand((batch, length), generator=g) < 0.4  # mean word length 2.5


def test_whole_word_masking_masks_words_together():
    ids, attention_mask = make_batch(32, 64, seed=6)
    word_start = word_starts(32, 64, seed=7)
    word_start[:, 1] = False  # a tokenizer may not flag the first word after <s>: it still starts a word
    _, labels = encoder_mask(ids, attention_mask, seed=8, word_start=word_start)
    selected = labels.ne(IGNORE_INDEX)
    allowed = maskable(ids, attention_mask)
    words_checked = 0
    for b in range(ids.size(0)):
        word: list[int] = []
        for i in range(ids.size(1) + 1):
            ends_word = i == ids.size(1) or not allowed[b, i] or word_start[b, i] or not allowed[b, i - 1]
            if ends_word and word:
                assert len({bool(selected[b, j]) for j in word}) == 1, (b, word)
                words_checked += len(word) > 1
                word = []
            if i < ids.size(1) and allowed[b, i]:
                word.append(i)
    assert words_checked > 100
    assert not (selected & ~allowed).any()


def test_whole_word_ratio_is_over_tokens():
    ids, attention_mask = make_batch(128, 256, seed=9)
    _, labels = encoder_mask(ids, attention_mask, seed=10, word_start=word_starts(128, 256, seed=11))
    ratio = labels.ne(IGNORE_INDEX).sum().item() / maskable(ids, attention_mask).sum().item()
    assert ratio == pytest.approx(0.3, abs=0.015)  # words are drawn, so tokens vary more than per-token


def test_same_generator_seed_same_masks():
    ids, attention_mask = make_batch(8, 32, seed=12)
    first = encoder_mask(ids, attention_mask, seed=13)
    again = encoder_mask(ids, attention_mask, seed=13)
    other = encoder_mask(ids, attention_mask, seed=14)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[1], other[1])


def test_decoder_mask_rules_and_ratio():
    ids, attention_mask = make_batch(32, 128, seed=15)
    visible = decoder_attention_mask(attention_mask, 0.5, generator=torch.Generator().manual_seed(16))
    batch, length = ids.shape
    assert visible.shape == (batch, length, length) and visible.dtype == torch.bool
    diagonal = visible.diagonal(dim1=1, dim2=2)  # (B, L)
    assert diagonal[:, 0].all()  # (0, 0): the unlabelled first token keeps one key for a finite softmax
    assert not diagonal[:, 1:].any()
    assert visible[:, :, 0].all()
    pad_keys = ~attention_mask.bool()[:, None, :].expand(-1, length, -1)  # (B, L, L)
    assert not visible[pad_keys].any()

    eligible = attention_mask.bool()[:, None, :] & ~torch.eye(length, dtype=torch.bool)  # (B, L, L)
    eligible[:, :, 0] = False
    assert visible[eligible].float().mean().item() == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("ratio", [0.0, 1.0])
def test_decoder_mask_extreme_ratios(ratio: float):
    ids, attention_mask = make_batch(4, 16, seed=17)
    visible = decoder_attention_mask(attention_mask, ratio, generator=torch.Generator().manual_seed(18))
    expected = attention_mask.bool()[:, None, :] & ~torch.eye(16, dtype=torch.bool)  # (B, L, L)
    if ratio == 1.0:
        expected = torch.zeros_like(expected)
    expected[:, :, 0] = True
    assert torch.equal(visible, expected)


def test_decoder_labels_are_every_real_token():
    ids, attention_mask = make_batch(16, 32, seed=19)
    labels = decoder_labels(ids, attention_mask, SPECIALS)
    real = maskable(ids, attention_mask)
    assert torch.equal(labels[real], ids[real])
    assert labels[~real].eq(IGNORE_INDEX).all()


def test_batch_bundles_every_model_input():
    ids, attention_mask = make_batch(4, 16, seed=20)
    batch = mask_retromae_batch(
        ids,
        attention_mask,
        special_token_ids=SPECIALS,
        mask_token_id=MASK,
        vocab_size=VOCAB,
        generator=torch.Generator().manual_seed(21),
    )
    kwargs = batch.as_kwargs()
    assert set(kwargs) == {
        "input_ids",
        "attention_mask",
        "encoder_input_ids",
        "encoder_labels",
        "decoder_labels",
        "decoder_attention_mask",
    }
    assert kwargs["input_ids"] is ids


@pytest.mark.parametrize("ratio", [-0.1, 1.5])
def test_bad_ratio_is_rejected(ratio: float):
    ids, attention_mask = make_batch(2, 8, seed=22)
    with pytest.raises(ValueError, match="mask_ratio"):
        encoder_mask(ids, attention_mask, seed=0, ratio=ratio)
    with pytest.raises(ValueError, match="mask_ratio"):
        decoder_attention_mask(attention_mask, ratio)
