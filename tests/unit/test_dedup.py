"""Duplicate finding on dedup keys, against a plain first-occurrence loop over the texts."""

from __future__ import annotations

import random

import numpy as np
import pyarrow as pa

from chuxin_ray.data.cleaning import normalize_text
from chuxin_ray.data.dedup import (
    KEY,
    POS,
    SHARD,
    drop_rows,
    find_duplicates,
    key_table,
    partition_of,
    split_by,
)


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


def test_split_by_puts_each_row_in_its_partition_once_and_duplicates_stay_findable():
    rng = random.Random(2)
    texts = [rng.choice(["甲乙丙", "丁戊", "己庚辛", "子丑"]) + str(rng.randrange(40)) for _ in range(400)]
    keys, _ = shards_of(texts, 32, "exact", rng)
    parts = split_by(keys, KEY, 3)
    assert len(parts) == 3 and sum(p.num_rows for p in parts) == keys.num_rows
    for i, part in enumerate(parts):
        assert set(partition_of(part.column(KEY).to_numpy(), 3).tolist()) <= {i}
        assert part.schema == keys.schema

    # every copy of a key lands in one partition, so the partitions find what the whole finds
    def rows(table: pa.Table) -> list[tuple]:
        return sorted(zip(table.column(SHARD).to_pylist(), table.column(POS).to_pylist(), strict=True))

    whole = rows(find_duplicates(keys))
    assert len(whole) > 200 and rows(pa.concat_tables(find_duplicates(p) for p in parts)) == whole
    # rows keep their order within a partition
    pos = parts[0].column(POS).to_numpy() + 1000 * parts[0].column(SHARD).to_numpy()
    assert (np.diff(pos) > 0).all()
    assert [p.num_rows for p in split_by(keys.slice(0, 0), KEY, 2)] == [0, 0]


def test_partition_of_spreads_structured_shard_ids_evenly():
    shards = np.arange(400, dtype=np.int64) << 24  # the first block of 400 files: all 0 mod 4
    counts = np.bincount(partition_of(shards, 4), minlength=4)
    assert counts.min() >= 70, counts  # 100 each on average
    assert partition_of(shards, 1).tolist() == [0] * 400
