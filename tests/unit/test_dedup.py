"""Duplicate finding on dedup keys, against a plain first-occurrence loop over the texts."""

from __future__ import annotations

import random

import numpy as np
import pyarrow as pa

from chuxin_ray.data.cleaning import normalize_text
from chuxin_ray.data.dedup import KEY, POS, SHARD, drop_rows, find_duplicates, key_table


def shards_of(texts: list[str], per_shard: int, mode: str, rng: random.Random):
    """The texts cut into shards of `per_shard`, with a global order that is not the list order."""
    order = list(range(len(texts)))
    rng.shuffle(order)
    tables = []
    for shard, start in enumerate(range(0, len(texts), per_shard)):
        chunk = pa.array(texts[start : start + per_shard], pa.string())
        tables.append(key_table(chunk, np.array(order[start : start + per_shard]), shard, mode))
    return pa.concat_tables(tables), order


def test_finds_all_but_first_occurrence_against_plain_loop():
    rng = random.Random(0)
    pool = ["甲乙丙", "甲 乙 丙", "ＡＢＣ", "abc", "丁戊", "己庚辛", "己庚辛。"]
    texts = [rng.choice(pool) for _ in range(500)]
    keys, order = shards_of(texts, 64, "nfkc_lower_nospace", rng)
    keys = keys.take(pa.array(rng.sample(range(500), 500)))  # rows arrive in any order after a shuffle
    found = find_duplicates(keys)

    first: dict[str, int] = {}
    for i in sorted(range(500), key=lambda i: order[i]):
        first.setdefault(normalize_text(texts[i], "nfkc_lower_nospace"), i)
    expected = {(i // 64, i % 64) for i in range(500)} - {(i // 64, i % 64) for i in first.values()}
    got = set(zip(found.column(SHARD).to_pylist(), found.column(POS).to_pylist(), strict=True))
    assert got == expected and found.num_rows == len(expected)
    assert len(first) == 5  # "甲 乙 丙" ~ "甲乙丙" and "ＡＢＣ" ~ "abc" after normalising


def test_exact_mode_and_a_key_split_over_partitions_is_not_a_duplicate():
    keys, _ = shards_of(["ａｂｃ", "abc", "abc"], 2, "exact", random.Random(1))
    assert find_duplicates(keys).num_rows == 1  # only the two identical "abc"
    # A key seen once in a partition has nothing to be a duplicate of, whatever sits beside it.
    assert find_duplicates(keys.slice(0, 2)).num_rows == 0
    assert find_duplicates(keys.slice(0, 0)).num_rows == 0
    assert keys.column(KEY).type == pa.int64()


def test_drop_rows_keeps_the_rest_in_order():
    table = pa.table({"text": ["a", "b", "c", "d", "e"]})
    assert drop_rows(table, np.array([3, 0])).column("text").to_pylist() == ["b", "c", "e"]
    assert drop_rows(table, np.array([], dtype=np.int32)).num_rows == 5
