"""Rule-based cleaning of Chinese text.

Two implementations of the same rules: `RuleSet.first_failing_rule(text)`, a plain per-text
function (the reference), and `RuleSet.failing_rules(texts)`, which runs the same rules over a
whole Arrow column with pyarrow's vectorised kernels (RE2) and keeps Python only for the two rules
RE2 cannot express (back-references, line sets). Tests hold the two equal. A text fails with the
first rule it breaks, in the order of RULES; lengths are in characters (code points), not bytes.
"""

from __future__ import annotations

import functools
import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from chuxin_ray.config import CleaningRules

# CJK Unified Ideographs (+ Extension A, compatibility ideographs, Extensions B-F in plane 2).
CJK_CLASS = r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ffff]"
CJK = re.compile(CJK_CLASS)
CJK_RANGES = (
    (0x3400, 0x4DBF),
    (0x4E00, 0x9FFF),
    (0xF900, 0xFAFF),
    (0x20000, 0x2FFFF),
)  # the same, as numbers
# Every code point str.isspace() accepts (29 of them).
SPACE_CODE_POINTS = np.array([c for c in range(0x3001) if chr(c).isspace()], dtype="<u4")
# What Python's str.isspace() accepts, in RE2 syntax (RE2's own \s is ASCII-only).
SPACE_RE2 = r"[\t-\r\x{1c}-\x{1f} \x{85}\p{Z}]"
# An HTML/XML tag, comment or character entity: what scraped pages leave behind. Valid in both
# Python re and RE2, with the same leftmost-first matching.
MARKUP_PATTERN = r"</?[a-zA-Z][^<>\n]{0,200}>|<!--.*?-->|&(?:[a-zA-Z]{2,8}|#\d{1,7}|#x[0-9a-fA-F]{1,6});"
MARKUP = re.compile(MARKUP_PATTERN)
# Where str.splitlines() breaks a line.
LINE_BREAK_CODE_POINTS = np.array(
    [c for c in range(0x3001) if len(f"a{chr(c)}a".splitlines()) > 1], dtype="<u4"
)

TOO_SHORT = "too_short"
TOO_LONG = "too_long"
LOW_CJK_RATIO = "low_cjk_ratio"
REPEATED_CHARS = "repeated_chars"
REPEATED_LINES = "repeated_lines"
MARKUP_RESIDUE = "markup_residue"
BLOCKLISTED = "blocklisted"
RULES = (TOO_SHORT, TOO_LONG, LOW_CJK_RATIO, REPEATED_CHARS, REPEATED_LINES, MARKUP_RESIDUE, BLOCKLISTED)


def cjk_ratio(text: str) -> float:
    """Share of CJK ideographs among the non-whitespace characters."""
    visible = len(text) - sum(c.isspace() for c in text)
    return len(CJK.findall(text)) / visible if visible else 0.0


def repeated_char_ratio(text: str, run: int) -> float:
    """Share of characters inside runs of one character repeated at least `run` times."""
    return sum(m.end() - m.start() for m in _run_pattern(run).finditer(text)) / len(text) if text else 0.0


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
        self.blocklist_pattern = "|".join(map(re.escape, words)) if words else None
        self.blocklist = re.compile(self.blocklist_pattern) if words else None

    def first_failing_rule(self, text: str) -> str:
        """The plain path: one text, the rules in order."""
        r = self.rules
        if len(text) < r.min_chars:
            return TOO_SHORT
        if len(text) > r.max_chars:
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

    def failing_rules(self, texts: pa.Array) -> list[str]:
        """The fast path: the first failing rule of every text of a (non-null) string column."""
        r = self.rules
        n = len(texts)
        points = CodePoints(texts)
        length = points.length  # (n,) code points
        visible = length - points.count(np.isin(points.cps, SPACE_CODE_POINTS))  # (n,)
        cjk = points.count(in_ranges(points.cps, CJK_RANGES)) / np.maximum(visible, 1)  # (n,)
        fails = {
            TOO_SHORT: length < r.min_chars,
            TOO_LONG: length > r.max_chars,
            LOW_CJK_RATIO: np.where(visible > 0, cjk, 0.0) < r.min_cjk_ratio,
            REPEATED_CHARS: points.repeated_char_ratios(r.repeat_run) > r.max_repeated_char_ratio,
            REPEATED_LINES: np.zeros(n, dtype=bool),
            MARKUP_RESIDUE: np.zeros(n, dtype=bool),
            BLOCKLISTED: (
                _bools(pc.match_substring_regex(texts, self.blocklist_pattern))
                if self.blocklist_pattern
                else np.zeros(n, dtype=bool)
            ),
        }
        # Markup: the RE2 pattern only where a tag or entity can start.
        maybe_markup = points.texts_with((points.cps == ord("<")) | (points.cps == ord("&")))
        if len(maybe_markup):
            some = texts.take(pa.array(maybe_markup, pa.int64()))
            removed = pc.utf8_length(pc.replace_substring_regex(some, MARKUP_PATTERN, ""))
            markup_chars = length[maybe_markup] - _ints(removed)  # (m,)
            ratio = markup_chars / np.maximum(length[maybe_markup], 1)
            fails[MARKUP_RESIDUE][maybe_markup] = ratio > r.max_markup_ratio
        # Repeated lines need a set per text: Python, only for multi-line texts no earlier rule failed.
        earlier = fails[TOO_SHORT] | fails[TOO_LONG] | fails[LOW_CJK_RATIO] | fails[REPEATED_CHARS]
        multi_line = np.zeros(n, dtype=bool)
        multi_line[points.texts_with(np.isin(points.cps, LINE_BREAK_CODE_POINTS))] = True
        candidates = np.flatnonzero(~earlier & multi_line)
        for i, text in zip(candidates, texts.take(pa.array(candidates, pa.int64())).to_pylist(), strict=True):
            fails[REPEATED_LINES][i] = repeated_line_ratio(text) > r.max_repeated_line_ratio
        reasons = np.full(n, "", dtype=object)
        for rule in reversed(RULES):  # earlier rules overwrite later ones: the first failure wins
            reasons[fails[rule]] = rule
        return reasons.tolist()


class CodePoints:
    """The code points of a whole string column at once, for per-text counts without Python loops."""

    def __init__(self, texts: pa.Array):
        self.length = _ints(pc.utf8_length(texts))  # (n,)
        offsets, data = string_bytes(texts)  # (n + 1,)
        text = str(data[offsets[0] : offsets[-1]], "utf-8")  # every text at once, back to back
        self.cps = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")  # (C,)
        self.starts = np.concatenate([[0], np.cumsum(self.length)[:-1]]).astype(np.int64)  # (n,)

    def count(self, mask: np.ndarray) -> np.ndarray:
        """(n,) per text: how many of its code points are set in `mask` (C,)."""
        if not len(self.cps):
            return np.zeros(len(self.length), dtype=np.int64)
        # reduceat gives an empty text its neighbour's value (and cannot index past the end): zero them.
        # int32 sums straight from the bools where no count can pass 2**31.
        dtype = np.int32 if len(self.cps) < 2**31 else np.int64
        sums = np.add.reduceat(mask, np.minimum(self.starts, len(self.cps) - 1), dtype=dtype)
        return sums.astype(np.int64) * (self.length > 0)

    def texts_with(self, mask: np.ndarray) -> np.ndarray:
        """(m,) ascending indices of the texts holding a code point set in `mask` (C,)."""
        # an empty text starts where the next one does: side="right" picks the text that holds it
        return np.unique(np.searchsorted(self.starts, np.flatnonzero(mask), side="right") - 1)

    def repeated_char_ratios(self, run: int) -> np.ndarray:
        """(n,) `repeated_char_ratio` of every text: maximal runs of one code point, as the greedy
        regex finds them."""
        if run <= 1:  # every character is a run
            return (self.length > 0).astype(np.float64)
        if not len(self.cps):
            return np.zeros(len(self.length))
        # Runs of two or more are rare: work from the few code points that repeat the one before.
        repeats = self.cps[1:] == self.cps[:-1]  # (C - 1,) repeats[i]: cps[i + 1] continues a run ...
        inner = self.starts[(self.starts > 0) & (self.starts < len(self.cps))]
        repeats[inner - 1] = False  # ... unless a text starts at i + 1
        at = np.flatnonzero(repeats) + 1  # (r,) ascending; a run of L code points holds L - 1 of them
        first = np.flatnonzero(np.diff(at, prepend=-2) != 1)  # (R,) where in `at` each run begins
        lengths = np.diff(first, append=len(at)) + 1  # (R,) code points in each run
        long = lengths >= run
        text = np.searchsorted(self.starts, at[first[long]] - 1, side="right") - 1  # (L,) text of each
        in_runs = np.zeros(len(self.length), dtype=np.int64)  # (n,)
        np.add.at(in_runs, text, lengths[long])
        return in_runs / np.maximum(self.length, 1)


def in_ranges(cps: np.ndarray, ranges: tuple[tuple[int, int], ...]) -> np.ndarray:
    mask = np.zeros(len(cps), dtype=bool)
    for low, high in ranges:
        mask |= (cps >= low) & (cps <= high)
    return mask


def string_bytes(texts: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, memoryview]:
    """(offsets, data) of a (non-null) string column without Python strings: text i is the UTF-8
    bytes data[offsets[i]:offsets[i + 1]]. offsets is (n + 1,) int64; a sliced array's come
    from its slice of the offsets buffer."""
    if isinstance(texts, pa.ChunkedArray):
        texts = texts.combine_chunks()
    if texts.null_count:
        raise ValueError("null texts")
    if not len(texts):
        return np.zeros(1, dtype=np.int64), memoryview(b"")
    _, offsets, data = texts.buffers()
    offset_type = np.int64 if pa.types.is_large_string(texts.type) else np.int32
    offsets = np.frombuffer(offsets, offset_type)[texts.offset : texts.offset + len(texts) + 1]  # (n + 1,)
    return offsets.astype(np.int64), memoryview(data if data is not None else b"")


def _bools(array: pa.Array) -> np.ndarray:
    return array.to_numpy(zero_copy_only=False).astype(bool)


def _ints(array: pa.Array) -> np.ndarray:
    return array.to_numpy(zero_copy_only=False).astype(np.int64)


def apply_rules(table: pa.Table, rules: RuleSet) -> pa.Table:
    """Mark kept rows that fail a rule as dropped, with the rule as reason."""
    kept = np.flatnonzero(_bools(pc.equal(table.column("outcome"), "kept")))  # (k,)
    if len(kept) == 0:
        return table
    failed = np.asarray(
        rules.failing_rules(table.column("text").take(pa.array(kept)).combine_chunks()), dtype=object
    )
    dropped = np.zeros(table.num_rows, dtype=bool)  # (n,)
    dropped[kept[failed != ""]] = True
    mask = pa.array(dropped)
    reasons = pa.array(failed[failed != ""], pa.string())
    outcome = pc.replace_with_mask(
        table.column("outcome").combine_chunks(), mask, pa.array(["dropped"] * len(reasons), pa.string())
    )
    reason = pc.replace_with_mask(table.column("reason").combine_chunks(), mask, reasons)
    table = table.set_column(table.schema.get_field_index("outcome"), "outcome", outcome)
    return table.set_column(table.schema.get_field_index("reason"), "reason", reason)


def normalize_for_dedup(texts: pa.Array, mode: str) -> pa.Array:
    """nfkc_lower_nospace: full-width/half-width, case and whitespace differences do not make a
    text new. Vectorised (utf8proc); `normalize_text` applies it to one string."""
    if mode == "exact":
        return texts
    folded = pc.utf8_lower(pc.utf8_normalize(texts, "NFKC"))
    return pc.replace_substring_regex(folded, SPACE_RE2, "")


def normalize_text(text: str, mode: str) -> str:
    return normalize_for_dedup(pa.array([text], pa.string()), mode)[0].as_py()
