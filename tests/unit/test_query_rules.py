"""Rules on generated queries: each rule alone, the copied-span measure against a brute-force
longest common substring, and global duplicate marking across hash partitions."""

from __future__ import annotations

import random

import pyarrow as pa
import pytest

from chuxin_ray.config import QueryRules
from chuxin_ray.data.query_rules import (
    COPIED,
    DUPLICATE,
    KEY,
    LOW_CJK,
    TOO_LONG,
    TOO_SHORT,
    apply_query_rules,
    copied_ratio,
    failing_rule,
    mark_duplicate_queries,
)

PASSAGE = "国务院总理李鹏今天上午在人民大会堂会见了来访的日本客人，双方就两国经贸合作交换了意见。"


def longest_common_substring(a: str, b: str) -> int:
    best = 0
    for i in range(len(a)):
        for j in range(i + 1, len(a) + 1):
            if a[i:j] in b:
                best = max(best, j - i)
    return best


def test_copied_ratio_equals_brute_force():
    rng = random.Random(0)
    alphabet = "李鹏会见日本客人经贸合作人民大会堂abc "
    for _ in range(300):
        q = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 20)))
        p = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        qv, pv = "".join(q.split()), "".join(p.split())
        expected = longest_common_substring(qv, pv) / len(qv) if qv else 0.0
        assert copied_ratio(q, p) == pytest.approx(expected)


def test_copied_ratio_extremes():
    assert copied_ratio("会见了来访的日本客人", PASSAGE) == 1.0
    assert copied_ratio("会见了 来访的 日本客人", PASSAGE) == 1.0  # whitespace ignored
    assert copied_ratio("李鹏会见日本客人", PASSAGE) == pytest.approx(4 / 8)  # 日本客人
    assert copied_ratio("天气怎么样", PASSAGE) == pytest.approx(1 / 5)  # 天 appears alone
    assert copied_ratio("", PASSAGE) == 0.0


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        ("李鹏", TOO_SHORT),
        ("李鹏会见哪国客人" * 10, TOO_LONG),
        ("李鹏在人民大会堂会见了来访的日本客人", COPIED),
        ("Li Peng meeting Japan", LOW_CJK),
        ("李鹏会见了哪国的客人", ""),
        ("iPhone15价格", ""),  # 2 of 10 visible characters are CJK: the default bound is 0.2
    ],
)
def test_each_rule(query, reason):
    assert failing_rule(query, PASSAGE, QueryRules()) == reason


def test_rules_can_be_switched_off():
    rules = QueryRules(max_copy_ratio=None, min_cjk_ratio=None)
    assert failing_rule("李鹏在人民大会堂会见了来访的日本客人", PASSAGE, rules) == ""
    assert failing_rule("Li Peng meeting Japan", PASSAGE, rules) == ""


def test_duplicates_keep_the_smallest_query_id_across_partitions():
    queries = ["李鹏会见了谁", "李鹏 会见了谁", "ＬＩ鹏会见了谁", "li鹏会见了谁", "日本客人来访", "李鹏"]
    table = pa.table(
        {
            "query_id": ["d#q0", "b#q0", "c#q0", "a#q1", "e#q0", "a#q0"],
            "query": queries,
            "passage": [PASSAGE] * 6,
        }
    )
    table = apply_query_rules(table, QueryRules())
    # Split by key into two "partitions" the way a keyed repartition would, then mark each.
    keys = table.column(KEY).to_pylist()
    parts = [table.filter(pa.array([k % 2 == p for k in keys])) for p in (0, 1)]
    marked = pa.concat_tables(mark_duplicate_queries(part) for part in parts)
    reasons = dict(
        zip(marked.column("query_id").to_pylist(), marked.column("reason").to_pylist(), strict=True)
    )
    # 李鹏会见了谁 = 李鹏 会见了谁 (spaces) ; ＬＩ鹏会见了谁 = li鹏会见了谁 (NFKC + lower)
    assert reasons == {
        "b#q0": "",
        "d#q0": DUPLICATE,
        "a#q1": "",
        "c#q0": DUPLICATE,
        "e#q0": "",
        "a#q0": TOO_SHORT,  # a failing row is never counted as a duplicate's keeper
    }
    assert KEY not in marked.column_names
