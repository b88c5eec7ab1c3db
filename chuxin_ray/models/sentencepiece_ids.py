"""Token ids for XLM-R tokenizers (XLM-R, bge-m3) from SentencePiece's own C++ encoder: the ids the
Hugging Face fast tokenizer gives, several times faster.

The fast tokenizer runs the model of `sentencepiece.bpe.model` in Rust: the same normalisation table
and the same unigram segmentation. On Chinese text the Rust path is slow: 107 ms for 128 People's Daily
paragraphs (~250 characters each) where SentencePiece takes 8 ms, one thread (bench/finetune.py's
passages); a finetuning step tokenises 16 queries and 128 passages, in a thread beside the step.

Ids: XLM-R keeps fairseq's order, <s>=0 <pad>=1 </s>=2 <unk>=3, then SentencePiece's pieces shifted by
one (piece 0, SentencePiece's <unk>, is 3), then <mask>. With special tokens and truncation:
[0] + pieces[:max_length - 2] + [2], as the fast tokenizer does.

The two paths differ in three ways, and a text that could meet one goes through the fast tokenizer:
  - whitespace: the fast tokenizer keeps a trailing space as a piece of its own, SentencePiece strips
    it; so any whitespace, control or format character sends a text there;
  - special-token strings: "<s>" in a text is one id for the fast tokenizer, several pieces here; so
    does a "<";
  - ties: where two segmentations score the same, each breaks the tie its own way ("天天天" is 天 天天
    there, 天天 天 here). Equal scores come from the same pieces in another order, which needs a
    repeated stretch of text; so does a unit of 1-8 characters three times in a row after NFKC
    ("哈哈哈", "ⅲ" = "iii"): ~10% of People's Daily paragraphs and reviews.
The rest, most Chinese text, goes through SentencePiece. Tests check every character of the Basic
Multilingual Plane, real corpora and tens of thousands of repetitive texts against the fast tokenizer.
"""

from __future__ import annotations

import os
import re
import unicodedata

XLMR_SPECIALS = {"bos_token_id": 0, "pad_token_id": 1, "eos_token_id": 2, "unk_token_id": 3}
# Whitespace (Python's \s includes U+3000 and the other Unicode spaces), C0/C1 controls, zero-width and
# directional format characters, the byte-order mark, and "<" (special tokens are written <...>).
UNSAFE_CHARACTER = re.compile(r"[\s<\x00-\x1f\x7f-\x9f\u00ad\u200b-\u200f\u2028-\u202f\u2060-\u206f\ufeff]")
REPEATED_UNIT = re.compile(r"(.{1,8})\1\1")  # where segmentations can tie


def needs_fast_tokenizer(text: str) -> bool:
    """Whether SentencePiece could give `text` other ids than the fast tokenizer (module docstring)."""
    return bool(UNSAFE_CHARACTER.search(text) or REPEATED_UNIT.search(unicodedata.normalize("NFKC", text)))


class SentencePieceIds:
    """`ids(texts, max_length)`: the fast tokenizer's input ids for `texts`, with special tokens and
    truncation. Build with `for_tokenizer`, which says None for anything but a plain XLM-R tokenizer."""

    def __init__(self, tokenizer, processor):
        self.tokenizer = tokenizer  # the fast tokenizer, for the texts SentencePiece would treat differently
        self.processor = processor

    @classmethod
    def for_tokenizer(cls, tokenizer) -> SentencePieceIds | None:
        if type(tokenizer).__name__ not in ("XLMRobertaTokenizerFast", "XLMRobertaTokenizer"):
            return None
        model_file = getattr(tokenizer, "vocab_file", None)
        if not model_file or not os.path.isfile(model_file):
            return None
        if any(getattr(tokenizer, name) != value for name, value in XLMR_SPECIALS.items()):
            return None
        import sentencepiece

        processor = sentencepiece.SentencePieceProcessor(model_file=model_file)
        pieces = processor.get_piece_size()
        if len(tokenizer) != pieces + 2:  # + <pad> and <mask>: no added tokens
            return None
        probe = [3, 4, 1000, pieces // 2, pieces - 1]  # a few pieces must have their fairseq ids
        if tokenizer.convert_tokens_to_ids([processor.id_to_piece(i) for i in probe]) != [
            i + 1 for i in probe
        ]:
            return None
        return cls(tokenizer, processor)

    def ids(self, texts: list[str], max_length: int) -> list[list[int]]:
        body = max_length - 2  # room for <s> and </s>
        plain = [i for i, t in enumerate(texts) if not needs_fast_tokenizer(t)]
        out: list[list[int] | None] = [None] * len(texts)
        for i, pieces in zip(plain, self.processor.encode([texts[i] for i in plain]), strict=True):
            out[i] = [0, *(p + 1 if p else 3 for p in pieces[:body]), 2]
        rest = [i for i, ids in enumerate(out) if ids is None]
        if rest:
            encoded = self.tokenizer([texts[i] for i in rest], max_length=max_length, truncation=True)
            for i, ids in zip(rest, encoded["input_ids"], strict=True):
                out[i] = ids
        return out
