"""Prompts in, parsed answers out: chat messages from a template, queries and verdicts from raw text.

LLM answers are noisy: numbering ("1.", "（2）", "查询1："), quotes, markdown bullets, a JSON list
instead of lines, a reasoning block before the answer (`<think>...</think>` from Qwen3/DeepSeek-R1),
"答案：是" or '{"answer": "否", "reason": ...}'. The parsers accept all of these and return what
they understood; the caller keeps the raw text beside the parse.
"""

from __future__ import annotations

import json
import re
import unicodedata
import zlib

from chuxin_ray.config import PromptTemplate

YES, NO, UNKNOWN = "yes", "no", "unknown"
FAILED = "failed"  # the call itself failed: no answer to parse


def messages_for(template: PromptTemplate, **fields: object) -> list[dict[str, str]]:
    """OpenAI chat messages from a template whose placeholders were checked when the config loaded."""
    messages = []
    if template.system:
        messages.append({"role": "system", "content": template.system.format(**fields)})
    messages.append({"role": "user", "content": template.user.format(**fields)})
    return messages


def pick_template(templates: list[PromptTemplate], key: str) -> PromptTemplate:
    """A template chosen by a stable hash of `key` (crc32: the same on every process and run)."""
    return templates[zlib.crc32(key.encode("utf-8")) % len(templates)]


def cut(text: str, max_chars: int) -> str:
    return text if len(text) <= max_chars else text[:max_chars]


# --------------------------------------------------------------------------------------------------
# Queries
# --------------------------------------------------------------------------------------------------

_THINK = re.compile(r"<think>.*?(?:</think>|$)", re.S)  # an unclosed block is all reasoning
_FENCE = re.compile(r"```[a-zA-Z]*")
_LEADER = re.compile(
    r"^\s*(?:[-*•·]+|\d+\s*[.)、．:：]|[（(]\s*\d+\s*[)）]|[一二三四五六七八九十]+\s*[、.．]"
    r"|(?:查询|问题|query|q)\s*\d*\s*[:：])\s*",
    re.I,
)
_QUOTES = "\"'“”‘’「」『』《》`"


def strip_reasoning(text: str) -> str:
    return _FENCE.sub("", _THINK.sub("", text)).strip()


def parse_queries(text: str | None, n: int) -> list[str]:
    """Up to `n` distinct queries from an answer: a JSON list, or one query per line."""
    if not text:
        return []
    text = strip_reasoning(text)
    candidates: list[str] = []
    start, end = text.find("["), text.rfind("]")
    if 0 <= start < end:
        try:
            items = json.loads(text[start : end + 1])
            if isinstance(items, list):
                candidates = [str(x) for x in items if isinstance(x, str | int | float)]
        except ValueError:
            pass
    if not candidates:
        candidates = text.splitlines()
    out: list[str] = []
    for line in candidates:
        if line.rstrip().endswith((":", "：")):  # an introduction ("以下是查询："), not a query
            continue
        query = clean_query(line)
        if query and query not in out:
            out.append(query)
        if len(out) == n:
            break
    return out


def clean_query(line: str) -> str:
    line = unicodedata.normalize("NFKC", line).strip()
    for _ in range(3):  # "1. “查询”" has a leader and quotes; nesting beyond 3 is not seen
        stripped = _LEADER.sub("", line).strip().strip(_QUOTES).strip()
        if stripped == line:
            break
        line = stripped
    return line.strip(_QUOTES + " ,，;；")


# --------------------------------------------------------------------------------------------------
# Verdicts
# --------------------------------------------------------------------------------------------------

# Two tiers, each longest first (so "不是" wins over "是", "not plausible" over "plausible"). Strong
# words are the answer itself (是/否, yes/no); weak words (合理, 相关) usually sit in the question or
# the reasoning ("是否合理：否"), so they decide only when no strong word is there. Neutral words that
# contain a decision character (是否 holds 是) are matched and skipped.
_NEUTRAL = ["是不是", "是否", "能否", "可否"]
_STRONG: list[tuple[str, str]] = [
    ("不是", NO),
    ("不对", NO),
    ("否", NO),
    ("是", YES),
    ("对", YES),
    ("yes", YES),
    ("no", NO),
    ("true", YES),
    ("false", NO),
]
_WEAK: list[tuple[str, str]] = [
    ("不合理", NO),
    ("不可以", NO),
    ("不能", NO),
    ("不相关", NO),
    ("不符合", NO),
    ("无关", NO),
    ("not plausible", NO),
    ("implausible", NO),
    ("合理", YES),
    ("可以", YES),
    ("相关", YES),
    ("符合", YES),
    ("plausible", YES),
]


def _pattern(words: list[str]) -> re.Pattern:
    # Latin words must stand alone ("no" is not in "not" or "know"); \b would not do, since a CJK
    # character counts as a word character and "答案yes" has no boundary.
    return re.compile(
        "|".join(rf"(?<![a-z]){re.escape(w)}(?![a-z])" if w.isascii() else re.escape(w) for w in words), re.I
    )


_TIERS = [
    (_pattern([*_NEUTRAL, *(w for w, _ in _STRONG)]), dict(_STRONG)),
    (_pattern([*_NEUTRAL, *(w for w, _ in _WEAK)]), dict(_WEAK)),
]
_JSON_KEYS = ("answer", "verdict", "judgement", "judgment", "result", "label", "plausible", "is_plausible")
_JSON_KEYS_ZH = ("答案", "结果", "判断", "结论")


def parse_verdict(text: str | None) -> str:
    """`yes`, `no` or `unknown` from a judge's answer (JSON, 是/否, yes/no, with noise around)."""
    if text is None:
        return FAILED
    text = unicodedata.normalize("NFKC", strip_reasoning(text)).strip()
    start, end = text.find("{"), text.rfind("}")
    if 0 <= start < end:
        try:
            obj = json.loads(text[start : end + 1])
        except ValueError:
            obj = None
        if isinstance(obj, dict):
            verdict = _json_verdict(obj)
            if verdict != UNKNOWN:
                return verdict
    return _word_verdict(text)


def _json_verdict(obj: dict) -> str:
    lowered = {str(k).lower(): v for k, v in obj.items()}
    for key in (*_JSON_KEYS, *_JSON_KEYS_ZH):
        if key in lowered:
            value = lowered[key]
            if isinstance(value, bool):
                return YES if value else NO
            if isinstance(value, int | float):
                return YES if value >= 0.5 else NO
            if isinstance(value, str):
                return _word_verdict(value)
    return UNKNOWN


def _word_verdict(text: str) -> str:
    for pattern, meaning in _TIERS:
        for match in pattern.finditer(text):
            verdict = meaning.get(match.group(0).lower())
            if verdict is not None:
                return verdict
    return UNKNOWN
