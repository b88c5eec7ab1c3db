"""Prompt rendering and the parsers that read queries and verdicts out of noisy LLM answers."""

from __future__ import annotations

import pytest

from chuxin_ray.config import JUDGE_PROMPT, SYNTHESIS_PROMPT, PromptTemplate
from chuxin_ray.llm.prompts import (
    FAILED,
    NO,
    UNKNOWN,
    YES,
    messages_for,
    parse_queries,
    parse_verdict,
    pick_template,
)


def test_messages_fill_the_template():
    messages = messages_for(SYNTHESIS_PROMPT, passage="北京是中国的首都。", n=3)
    assert [m["role"] for m in messages] == ["system", "user"]
    assert "北京是中国的首都。" in messages[1]["content"] and "3个" in messages[1]["content"]
    judge = messages_for(JUDGE_PROMPT, query="中国首都", passage="北京是中国的首都。")
    assert "查询：中国首都" in judge[1]["content"]
    bare = messages_for(PromptTemplate(user="{passage}"), passage="x")
    assert bare == [{"role": "user", "content": "x"}]


def test_template_choice_is_stable_and_spread():
    templates = [PromptTemplate(name=f"t{i}", user="{passage}") for i in range(3)]
    picks = [pick_template(templates, f"doc-{i}").name for i in range(300)]
    assert picks == [pick_template(templates, f"doc-{i}").name for i in range(300)]
    assert all(60 < picks.count(f"t{i}") < 140 for i in range(3))


@pytest.mark.parametrize(
    ("answer", "n", "expected"),
    [
        ("北京有哪些景点\n故宫门票多少钱", 2, ["北京有哪些景点", "故宫门票多少钱"]),
        (
            "1. 北京有哪些景点\n2、故宫门票多少钱\n3) 长城在哪",
            3,
            ["北京有哪些景点", "故宫门票多少钱", "长城在哪"],
        ),
        ("（1）“北京有哪些景点”\n- 故宫门票", 5, ["北京有哪些景点", "故宫门票"]),
        ("查询1：北京景点\n查询2：北京景点\n", 2, ["北京景点"]),  # duplicates collapse
        ('["北京景点", "故宫门票"]', 2, ["北京景点", "故宫门票"]),
        ('好的，查询如下：\n```json\n["北京景点"]\n```', 1, ["北京景点"]),
        ("<think>先想想这段讲什么\n</think>\n北京景点", 1, ["北京景点"]),
        ("<think>没有想完", 1, []),
        ("a\nb\nc\nd", 2, ["a", "b"]),
        ("好的，以下是3个查询：\n北京景点\n故宫门票", 3, ["北京景点", "故宫门票"]),
        ("", 1, []),
        (None, 1, []),
        ("\n \n", 1, []),
    ],
)
def test_parse_queries(answer, n, expected):
    assert parse_queries(answer, n) == expected


@pytest.mark.parametrize(
    ("answer", "verdict"),
    [
        ("是", YES),
        ("否", NO),
        ("是。", YES),
        ("不是", NO),
        ("答案：是", YES),
        ("是否合理：否", NO),  # 是否 is not a yes; 合理 sits in the question
        ("否。理由：这是一段新闻", NO),  # the first strong word is the answer
        ("这个查询是合理的", YES),
        ("这个查询不是很自然", NO),
        ("这个查询不合理，因为……", NO),
        ("合理", YES),
        ("Yes", YES),
        ("no.", NO),
        ("The answer is YES", YES),
        ("答案yes", YES),
        ("I do not know", UNKNOWN),  # "not" and "know" hold "no" only as a part
        ('{"answer": "否", "reason": "查询和文本无关"}', NO),
        ('{"plausible": true}', YES),
        ('{"is_plausible": false}', NO),
        ('{"判断": "是"}', YES),
        ('结果如下 {"label": 1}', YES),
        ('{"reason": "…"} 是', YES),  # JSON without a verdict key: read the words
        ("<think>是不是合理呢？不确定</think>否", NO),
        ("嗯嗯嗯", UNKNOWN),
        ("", UNKNOWN),
        (None, FAILED),
    ],
)
def test_parse_verdict(answer, verdict):
    assert parse_verdict(answer) == verdict
