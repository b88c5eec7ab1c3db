"""Rule-based cleaning of Chinese text: each rule is a pure function of the text.

`first_failing_rule(text, rules)` returns the name of the first rule a text fails ("" when it
passes); the rules run cheapest first. Lengths are in characters (code points), not bytes.
"""

from __future__ import annotations

import functools
import re
import unicodedata

import pyarrow as pa

from chuxin_ray.config import CleaningRules

# CJK Unified Ideographs (+ Extension A, compatibility ideographs, Extensions B-F in plane 2).
CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ffff]")
# An HTML/XML tag or a character entity: what scraped pages leave behind.
MARKUP = re.compile(r"</?[a-zA-Z][^<>\n]{0,200}>|<!--.*?-->|&(?:[a-zA-Z]{2,8}|#\d{1,7}|#x[0-9a-fA-F]{1,6});")

TOO_SHORT = "too_short"
TOO_LONG = "too_long"
LOW_CJK_RATIO = "low_cjk_ratio"
REPEATED_CHARS = "repeated_chars"
REPEATED_LINES = "repeated_lines"
MARKUP_RESIDUE = "markup_residue"
BLOCKLISTED = "blocklisted"


def cjk_ratio(text: str) -> float:
    """Share of CJK ideographs among the non-whitespace characters."""
    visible = len(text) - sum(c.isspace() for c in text)
    return len(CJK.findall(text)) / visible if visible else 0.0


def repeated_char_ratio(text: str, run: int) -> float:
    """Share of characters inside runs of one character repeated at least `run` times."""
    pattern = _run_pattern(run)
    return sum(m.end() - m.start() for m in pattern.finditer(text)) / len(text) if text else 0.0


@functools.cache
def _run_pattern(run: int) -> re.Pattern:
    return re.compile(rf"(.)\1{{{run - 1},}}", re.DOTALL)


def repeated_line_ratio(text: str) -> float:
    """Share of non-empty lines that repeat an earlier line of the same text."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (len(lines) - len(set(lines))) / len(lines) if len(lines) > 1 else 0.0


def markup_ratio(text: str) -> float:
    """Share of characters inside HTML tags, comments and entities."""
    return sum(m.end() - m.start() for m in MARKUP.finditer(text)) / len(text) if text else 0.0


class RuleSet:
    """The configured rules, compiled once per worker."""

    def __init__(self, rules: CleaningRules):
        self.rules = rules
        words = [w for w in rules.blocklist if w]
        self.blocklist = re.compile("|".join(map(re.escape, words))) if words else None

    def first_failing_rule(self, text: str) -> str:
        r = self.rules
        n = len(text.strip())
        if n < r.min_chars:
            return TOO_SHORT
        if n > r.max_chars:
            return TOO_LONG
        if cjk_ratio(text) < r.min_cjk_ratio:
            return LOW_CJK_RATIO
        if repeated_char_ratio(text, r.repeat_run) > r.max_repeated_char_ratio:
            return REPEATED_CHARS
        if repeated_line_ratio(text) > r.max_repeated_line_ratio:
            return REPEATED_LINES
        if markup_ratio(text) > r.max_markup_ratio:
            return MARKUP_RESIDUE
        if self.blocklist is not None and self.blocklist.search(text):
            return BLOCKLISTED
        return ""


def apply_rules(table: pa.Table, rules: RuleSet) -> pa.Table:
    """Mark kept rows that fail a rule as dropped, with the rule as reason."""
    outcome = table.column("outcome").to_pylist()
    reason = table.column("reason").to_pylist()
    for i, text in enumerate(table.column("text").to_pylist()):
        if outcome[i] == "kept" and (failed := rules.first_failing_rule(text)):
            outcome[i], reason[i] = "dropped", failed
    table = table.set_column(
        table.schema.get_field_index("outcome"), "outcome", pa.array(outcome, pa.string())
    )
    return table.set_column(table.schema.get_field_index("reason"), "reason", pa.array(reason, pa.string()))


def normalize_for_dedup(text: str, mode: str) -> str:
    """nfkc_casefold_space: full-width/half-width, case and whitespace differences do not count."""
    if mode == "exact":
        return text
    return "".join(unicodedata.normalize("NFKC", text).casefold().split())
