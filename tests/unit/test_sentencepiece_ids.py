"""SentencePiece's encoder against the Hugging Face fast tokenizer it stands in for: the same ids."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from chuxin_ray import demo
from chuxin_ray.models.sentencepiece_ids import SentencePieceIds, needs_fast_tokenizer
from chuxin_ray.train.pair_batches import Group, Tokenize

XLMR = Path(__file__).resolve().parents[2].parent / "shared" / "xlmr-tokenizer"


@pytest.fixture(scope="module")
def xlmr():
    tokenizer = AutoTokenizer.from_pretrained(XLMR)
    fast = SentencePieceIds.for_tokenizer(tokenizer)
    assert fast is not None
    return tokenizer, fast


def reference(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    return tokenizer(texts, max_length=max_length, truncation=True)["input_ids"]


def test_every_bmp_character_in_a_text(xlmr):
    tokenizer, fast = xlmr
    texts = ["中" + chr(c) + "文" for c in range(0x10000) if not 0xD800 <= c < 0xE000]  # no lone surrogates
    through_sentencepiece = sum(not needs_fast_tokenizer(t) for t in texts)
    assert through_sentencepiece > 0.99 * len(texts)  # the check below is mostly SentencePiece's
    assert fast.ids(texts, 16) == reference(tokenizer, texts, 16)


def test_chinese_corpora_whole_and_truncated(xlmr):
    tokenizer, fast = xlmr
    texts = demo.people_daily()[:1500] + demo.reviews()[:1500]
    texts += [
        "",
        "中",
        "a" * 600,
        "混合 English 与中文",
        " 前后有空格 ",
        "特殊<s>记号</s>",
        "全角　空格",
        "😀表情🀄",
    ]
    assert sum(not needs_fast_tokenizer(t) for t in texts) > 0.5 * len(texts)
    assert fast.ids(texts, 512) == reference(tokenizer, texts, 512)
    assert fast.ids(texts[-600:], 8) == reference(tokenizer, texts[-600:], 8)  # truncated


def test_repetitive_texts_where_segmentations_tie(xlmr):
    tokenizer, fast = xlmr
    rng = random.Random(0)
    alphabets = ["天a", "ab", "abc", "哈呵。", "天天好的", "i.-", "中国人民", "12", "啊!？", "xyzxy", "ⅲ天"]
    texts = ["".join(rng.choices(rng.choice(alphabets), k=rng.randint(2, 30))) for _ in range(20_000)]
    plain = [[p + 1 if p else 3 for p in ids] for ids in fast.processor.encode(texts)]  # unguarded
    want = reference(tokenizer, texts, 64)
    assert sum(p[:62] != w[1:-1] for p, w in zip(plain, want, strict=True)) > 100  # ties do happen here
    assert fast.ids(texts, 64) == want


def test_padding_equals_the_fast_tokenizers(xlmr):
    tokenizer, _ = xlmr
    tokenize = Tokenize(tokenizer, 96, 96, lambda g: "")
    assert tokenize.fast is not None
    for texts in (demo.people_daily()[:40], ["中", "好的"]):  # truncated to 96; padded up to 8
        want = tokenizer(
            texts,
            max_length=96,
            truncation=True,
            padding="longest",
            pad_to_multiple_of=8,
            return_tensors="pt",
        )
        got = tokenize.encode(texts, 96)
        assert got["input_ids"].shape[1] % 8 == 0
        assert torch.equal(got["input_ids"], want["input_ids"])
        assert torch.equal(got["attention_mask"], want["attention_mask"])


def test_only_plain_xlmr_tokenizers_qualify(xlmr, tmp_path):
    tokenizer, _ = xlmr
    other = demo.train_tokenizer(demo.people_daily()[:500], tmp_path / "tok", vocab_size=500)
    assert SentencePieceIds.for_tokenizer(AutoTokenizer.from_pretrained(other)) is None
    added = AutoTokenizer.from_pretrained(XLMR)
    added.add_tokens(["新词元"])  # an id SentencePiece knows nothing of
    assert SentencePieceIds.for_tokenizer(added) is None


def test_training_batches_are_the_same_tensors_either_way(xlmr):
    tokenizer, _ = xlmr
    paragraphs = demo.people_daily()[:64] + ["哈哈哈哈，太好了", " 空格在前", "<s>记号"]
    groups = [
        Group(
            "d", i, paragraphs[i][:20], "为这个句子生成表示以用于检索相关文章：", paragraphs[i : i + 4], None
        )
        for i in range(0, len(paragraphs) - 3, 3)
    ]
    fast = Tokenize(tokenizer, 32, 128, lambda g: g.prompt)
    plain = Tokenize(tokenizer, 32, 128, lambda g: g.prompt, sentencepiece=False)
    assert fast.fast is not None and plain.fast is None
    for got, want in zip(fast(groups), plain(groups), strict=True):
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in got)
