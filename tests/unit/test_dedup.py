"""Dedup keys and who keeps a text, against a plain first-occurrence loop over the texts."""

from __future__ import annotations

import random

import numpy as np
import pyarrow as pa

from chuxin_ray.data.cleaning import normalize_text
from chuxin_ray.data.dedup import first_copies, partition_of, text_hashes
from chuxin_ray.data.key_claims import ClaimTable

MODE = "nfkc_lower_nospace"


def test_keys_are_equal_exactly_when_normalised_texts_are():
    texts = ["甲乙丙", "甲 乙 丙", "ＡＢＣ", "abc", "丁戊", "", "己庚辛。"]
    keys = text_hashes(pa.array(texts), MODE)
    assert keys.shape == (7, 2) and keys.dtype == np.int64
    for i, a in enumerate(texts):
        for j, b in enumerate(texts):
            same = normalize_text(a, MODE) == normalize_text(b, MODE)
            assert (keys[i] == keys[j]).all() == same, (a, b)
    exact = text_hashes(pa.array(["ａｂｃ", "abc", "abc"]), "exact")
    assert not (exact[0] == exact[1]).all() and (exact[1] == exact[2]).all()
    assert text_hashes(pa.array([], pa.string()), MODE).shape == (0, 2)


def test_first_copies_in_a_block():
    keys = text_hashes(pa.array(["b", "a", "b", "c", "a", "B"]), MODE)
    assert first_copies(keys).tolist() == [0, 1, 3]


def test_blocks_claiming_in_any_order_keep_what_a_plain_loop_keeps():
    """Texts cut into blocks with a global order, each block's first copies claimed from the
    partition its keys hash to, the blocks in shuffled order: what survives (owned and never
    displaced) is the first copy of each normalised text."""
    rng = random.Random(0)
    pool = ["甲乙丙", "甲 乙 丙", "ＡＢＣ", "abc", "丁戊", "己庚辛", "己庚辛。"]
    texts = [rng.choice(pool) + str(rng.randrange(30)) for _ in range(2000)]
    blocks = [(b, list(range(start, start + 64))) for b, start in enumerate(range(0, 2000, 64))]
    blocks[-1] = (blocks[-1][0], [i for i in blocks[-1][1] if i < 2000])
    rng.shuffle(blocks)
    tables = [ClaimTable(capacity=8) for _ in range(3)]
    written = set()
    for shard, rows in blocks:
        keys = text_hashes(pa.array([texts[i] for i in rows]), MODE)  # (r, 2)
        first = first_copies(keys)
        part = partition_of(keys[first, 0], 3)
        for p in range(3):
            mine = first[part == p]
            owned = tables[p].claim(keys[mine, 0], keys[mine, 1], np.array(rows)[mine], shard)
            written |= {rows[i] for i in mine[owned]}
    displaced = set()
    for table in tables:
        d = table.all_displaced()
        for shard, high, low in zip(d.shard.tolist(), d.high.tolist(), d.low.tolist(), strict=True):
            rows = dict(blocks)[shard]
            keys = text_hashes(pa.array([texts[i] for i in rows]), MODE)
            displaced.add(rows[np.flatnonzero((keys[:, 0] == high) & (keys[:, 1] == low))[0]])  # first copy

    first_seen: dict[str, int] = {}
    for i, text in enumerate(texts):
        first_seen.setdefault(normalize_text(text, MODE), i)
    assert written - displaced == set(first_seen.values())
    assert len(displaced) > 20 and displaced <= written
    assert len(first_seen) < 2000 / 2  # the texts repeat


def test_partition_of_spreads_structured_values_evenly():
    values = np.arange(400, dtype=np.int64) << 24  # all 0 mod 4
    counts = np.bincount(partition_of(values, 4), minlength=4)
    assert counts.min() >= 70, counts  # 100 each on average
    assert partition_of(values, 1).tolist() == [0] * 400


def test_text_hashes_equal_hashing_python_strings():
    """The hashes come from Arrow's buffers: the same as hashing each normalised str's UTF-8, also
    for sliced, chunked and empty texts."""
    import hashlib

    from chuxin_ray import demo

    texts = demo.people_daily()[:500] + ["", "  ", "ＡＢＣ 甲", "", "𠀀\u3000x"] + demo.reviews()[:500]
    whole = pa.array(texts, pa.string())
    cases = [
        whole,
        whole.slice(3, 700),
        whole.slice(500, 4),  # empty texts only and one blank
        whole.slice(0, 0),
        pa.chunked_array([whole.slice(0, 300), whole.slice(300)]),
        pa.chunked_array([whole.slice(7, 3)]),
        whole.cast(pa.large_string()).slice(1),
    ]
    for mode in (MODE, "exact"):
        for array in cases:
            normalised = [normalize_text(t, mode) for t in array.to_pylist()]
            digests = b"".join(hashlib.blake2b(t.encode(), digest_size=16).digest() for t in normalised)
            expected = np.frombuffer(digests, dtype="<i8").reshape(-1, 2)
            assert np.array_equal(text_hashes(array, mode), expected)
