"""Duplicate marking inside one hash partition, against a plain first-occurrence loop."""

from __future__ import annotations

import random

import pyarrow as pa

from chuxin_ray.data.cleaning import normalize_text
from chuxin_ray.data.dedup import KEY, KEY_LOW, add_dedup_key, mark_duplicates


def table(texts, outcomes=None):
    n = len(texts)
    return pa.table(
        {
            "text": texts,
            "order": list(range(n)),
            "outcome": outcomes or ["kept"] * n,
            "reason": [""] * n,
        }
    )


def test_marks_all_but_first_occurrence_against_plain_loop():
    rng = random.Random(0)
    pool = ["甲乙丙", "甲 乙 丙", "ＡＢＣ", "abc", "丁戊", "己庚辛"]
    texts = [rng.choice(pool) for _ in range(500)]
    order = list(range(500))
    rng.shuffle(order)  # rows arrive out of order after a shuffle
    t = table(texts).set_column(1, "order", pa.array(order, pa.int64()))
    out = mark_duplicates(add_dedup_key(t, "nfkc_lower_nospace"))
    assert KEY not in out.column_names and KEY_LOW not in out.column_names
    expected = {}
    for i in sorted(range(500), key=lambda i: order[i]):
        expected.setdefault(normalize_text(texts[i], "nfkc_lower_nospace"), i)
    kept = {i for i, o in enumerate(out.column("outcome").to_pylist()) if o == "kept"}
    assert kept == set(expected.values())
    assert out.column("reason").to_pylist().count("duplicate") == 500 - len(kept)


def test_other_outcomes_never_group():
    t = table(["甲", "甲", "甲"], ["quarantined", "dropped", "kept"])
    out = mark_duplicates(add_dedup_key(t, "exact"))
    assert out.column("outcome").to_pylist() == ["quarantined", "dropped", "kept"]
