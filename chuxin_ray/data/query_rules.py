"""Rules on LLM-written queries: length, copying from the passage, language, duplicates.

Per-row rules give the first failing rule as the reason (the order below). Duplicates are global:
`query_key` hashes the normalised query (NFKC, lower-cased, whitespace removed, as ingest's dedup),
and after a hash shuffle on that key `mark_duplicate_queries` keeps, of each group, the query with
the smallest query_id.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from chuxin_ray.config import QueryRules
from chuxin_ray.data.cleaning import cjk_ratio
from chuxin_ray.data.dedup import text_hashes

TOO_SHORT = "too_short"
TOO_LONG = "too_long"
COPIED = "copied_from_passage"
LOW_CJK = "low_cjk_ratio"
DUPLICATE = "duplicate"
RULES = (TOO_SHORT, TOO_LONG, COPIED, LOW_CJK, DUPLICATE)
KEY, KEY_LOW = "query_key", "query_key_low"


def visible(text: str) -> str:
    return "".join(text.split())


def copied_ratio(query: str, passage: str) -> float:
    """Length of the longest run of the query found verbatim in the passage, over the query's length
    (whitespace ignored in both). 1.0: the query is a span of the passage.

    For each start, only runs longer than the best so far are tested, each a C-speed substring
    search: O(len(query) x len(passage)) in the worst case, ~20 us for a 20-char query and a
    2,000-char passage."""
    q, p = visible(query), visible(passage)
    if not q:
        return 0.0
    best = 0
    for i in range(len(q)):
        if len(q) - i <= best:
            break
        n = best + 1
        while i + n <= len(q) and q[i : i + n] in p:
            best = n
            n += 1
    return best / len(q)


def failing_rule(query: str, passage: str, rules: QueryRules) -> str:
    """The first rule the query fails, or "" when it passes the per-row rules."""
    chars = len(visible(query))
    if chars < rules.min_chars:
        return TOO_SHORT
    if chars > rules.max_chars:
        return TOO_LONG
    if rules.max_copy_ratio is not None and copied_ratio(query, passage) > rules.max_copy_ratio:
        return COPIED
    if rules.min_cjk_ratio is not None and cjk_ratio(query) < rules.min_cjk_ratio:
        return LOW_CJK
    return ""


def apply_query_rules(table: pa.Table, rules: QueryRules) -> pa.Table:
    """Adds `reason` ("" = passes) and, when dedup is on, the two query-key columns."""
    queries = table.column("query").to_pylist()
    passages = table.column("passage").to_pylist()
    reasons = [failing_rule(q, p, rules) for q, p in zip(queries, passages, strict=True)]
    table = table.append_column("reason", pa.array(reasons, pa.string()))
    if rules.dedup:
        keys = text_hashes(table.column("query").combine_chunks(), "nfkc_lower_nospace")  # (n, 2)
        table = table.append_column(KEY, pa.array(keys[:, 0], pa.int64()))
        table = table.append_column(KEY_LOW, pa.array(keys[:, 1], pa.int64()))
    return table


def mark_duplicate_queries(table: pa.Table) -> pa.Table:
    """Within one hash partition (every copy of a key is here): of the rows that passed the per-row
    rules, all but the smallest query_id of each key get reason `duplicate`. Drops the key columns."""
    reason = np.asarray(table.column("reason").to_pylist(), dtype=object)
    passing = np.flatnonzero(reason == "")  # (P,)
    if len(passing) > 1:
        high = table.column(KEY).to_numpy()[passing]
        low = table.column(KEY_LOW).to_numpy()[passing]
        ids = np.asarray(table.column("query_id").to_pylist(), dtype=object)[passing]
        by_key = np.lexsort((ids.astype(str), low, high))  # by key, then query_id
        high, low, ranked = high[by_key], low[by_key], passing[by_key]
        repeat = np.concatenate([[False], (high[1:] == high[:-1]) & (low[1:] == low[:-1])])
        reason[ranked[repeat]] = DUPLICATE
        table = table.set_column(
            table.schema.get_field_index("reason"), "reason", pa.array(reason.tolist(), pa.string())
        )
    return table.drop_columns([KEY, KEY_LOW])
