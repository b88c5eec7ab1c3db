"""Cleaning rules, each on texts made to pass or fail it."""

from __future__ import annotations

import pyarrow as pa
import pytest

from chuxin_ray.config import CleaningRules
from chuxin_ray.data import cleaning
from chuxin_ray.data.cleaning import RuleSet, apply_rules, normalize_text

NEWS = "中共中央总书记、国家主席江泽民发表一九九八年新年讲话《迈向充满希望的新世纪》。"


def test_measures():
    assert cleaning.cjk_ratio("你好 ab") == pytest.approx(2 / 4)
    assert cleaning.cjk_ratio("   ") == 0.0
    assert cleaning.repeated_char_ratio("好好好好好abc", run=5) == pytest.approx(5 / 8)
    assert cleaning.repeated_char_ratio("好好好好abc", run=5) == 0.0
    assert cleaning.repeated_line_ratio("甲\n乙\n甲\n甲") == pytest.approx(2 / 4)
    assert cleaning.repeated_line_ratio("单行") == 0.0
    assert cleaning.markup_ratio("<p>好</p>") == pytest.approx(7 / 8)
    assert cleaning.markup_ratio("a &nbsp; b") == pytest.approx(6 / 10)
    assert cleaning.markup_ratio("3 < 5 且 6 > 2") == 0.0  # comparisons are not tags


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (NEWS, ""),
        ("短文本", cleaning.TOO_SHORT),
        (NEWS * 40, cleaning.TOO_LONG),
        ("This review is written in English only, no Chinese.", cleaning.LOW_CJK_RATIO),
        ("好" * 30 + NEWS, cleaning.REPEATED_CHARS),
        (
            "\n".join([NEWS, "重复的一行文字内容", "重复的一行文字内容", "重复的一行文字内容"]),
            cleaning.REPEATED_LINES,
        ),
        ("<div class='x'><span>" + NEWS + "</span></div>", cleaning.MARKUP_RESIDUE),
        (NEWS + "加微信领取优惠", cleaning.BLOCKLISTED),
    ],
)
def test_first_failing_rule(text, reason):
    rules = RuleSet(CleaningRules(min_chars=8, max_chars=1000, blocklist=["加微信"]))
    assert rules.first_failing_rule(text) == reason


def test_rules_run_in_order_and_blocklist_off_when_empty():
    rules = RuleSet(CleaningRules(min_chars=8))
    assert rules.first_failing_rule("ab") == cleaning.TOO_SHORT  # short and non-CJK: first rule wins
    assert rules.first_failing_rule(NEWS + "加微信") == ""


def test_apply_rules_touches_only_kept_rows():
    table = pa.table(
        {
            "text": [NEWS, "短", None],
            "outcome": ["kept", "kept", "quarantined"],
            "reason": ["", "", "invalid_json"],
        }
    )
    out = apply_rules(table, RuleSet(CleaningRules(min_chars=8)))
    assert out.column("outcome").to_pylist() == ["kept", "dropped", "quarantined"]
    assert out.column("reason").to_pylist() == ["", cleaning.TOO_SHORT, "invalid_json"]


def test_normalize_text():
    assert normalize_text("Ｈｅｌｌｏ　世界 ！\t\n", "nfkc_lower_nospace") == "hello世界!"
    assert normalize_text("A b", "exact") == "A b"


ADVERSARIAL = [
    "",
    " ",
    "\u3000\u3000中文\u3000",
    "\x0b\x1c\x85\u2028中\xa0文",
    "<b>粗体</b>中文内容很多很多很多很多很多",
    "&amp;&#123;&#x4e2d;中文中文中文中文",
    "<!-- 注释 -->正文正文正文正文正文",
    "3 < 5 > 2 中文中文中文中文中文",
    "哈" * 5 + "中文" * 10,
    "哈" * 4 + "中文" * 10,
    "行一\n行一\n行二\n行一",
    "𠀀𠀁𠀂 Extension B 汉字",
    "加微信 is blocked 中文中文中文",
    "a.b*c 中文中文中文中文中文",
    "行一\r行一\r行一\u2028行二",
    "中文中文中文中文好好好好好好",
    "",
]


@pytest.mark.parametrize("blocklist", [[], ["加微信", "a.b*c"]])
def test_fast_path_equals_plain_path(blocklist):
    """STYLE.md rule 7: the vectorised rules give the plain per-text answer on every text."""
    from chuxin_ray import demo

    texts = demo.people_daily()[:3000] + demo.reviews()[:3000] + ADVERSARIAL
    for rules in (
        CleaningRules(min_chars=8, max_chars=300, blocklist=blocklist),
        CleaningRules(
            min_chars=0,
            min_cjk_ratio=0.9,
            repeat_run=3,
            max_repeated_char_ratio=0.05,
            max_repeated_line_ratio=0.0,
            max_markup_ratio=0.0,
            blocklist=blocklist,
        ),
    ):
        rule_set = RuleSet(rules)
        fast = rule_set.failing_rules(pa.array(texts, pa.string()))
        plain = [rule_set.first_failing_rule(t) for t in texts]
        assert fast == plain
        assert len(set(plain)) >= 5  # the texts exercise most rules


def test_code_points_from_sliced_arrays_equal_python():
    """CodePoints reads Arrow's buffers: sliced and chunked arrays and empty texts give what the
    Python strings give, and each per-text measure equals its plain function."""
    import numpy as np

    from chuxin_ray import demo

    texts = ["", "好好好好好", "好好好好好", "", "aa", "a", "a\n\na", ""] + demo.people_daily()[:300]
    texts += ["好好", "", "好好好好好好好好", "", "", *ADVERSARIAL, "x"]
    whole = pa.array(texts, pa.string())
    arrays = [
        whole,
        whole.slice(1),
        whole.slice(2, 5),
        whole.slice(3, 1),
        whole.slice(0, 0),
        whole.slice(0, 1),
    ]
    arrays += [
        pa.chunked_array([whole.slice(0, 100), whole.slice(100)]),
        whole.cast(pa.large_string()).slice(2),
    ]
    rules = RuleSet(
        CleaningRules(min_chars=0, repeat_run=2, max_repeated_char_ratio=0.0, max_markup_ratio=0.0)
    )
    for array in arrays:
        plain = array.to_pylist()
        points = cleaning.CodePoints(array)
        assert np.array_equal(points.cps, np.frombuffer("".join(plain).encode("utf-32-le"), dtype="<u4"))
        is_space = np.isin(points.cps, cleaning.SPACE_CODE_POINTS)
        assert points.count(is_space).tolist() == [sum(c.isspace() for c in t) for t in plain]
        for run in (1, 2, 3, 5):
            ratios = points.repeated_char_ratios(run).tolist()
            assert ratios == [cleaning.repeated_char_ratio(t, run) for t in plain]
        assert points.texts_with(points.cps == ord("a")).tolist() == [
            i for i, t in enumerate(plain) if "a" in t
        ]
        if not isinstance(array, pa.ChunkedArray):
            assert rules.failing_rules(array) == [rules.first_failing_rule(t) for t in plain]


def test_apply_rules_on_a_chunked_table():
    texts = [NEWS, "短", None, "好" * 30 + NEWS, NEWS, "<p>" + NEWS + "</p>"]
    outcome = ["kept", "kept", "quarantined", "kept", "dropped", "kept"]
    reason = ["", "", "invalid_json", "", "too_short", ""]
    table = pa.table({"text": texts, "outcome": outcome, "reason": reason})
    chunked = pa.concat_tables([table.slice(0, 2), table.slice(2, 3), table.slice(5)])
    rules = RuleSet(CleaningRules(min_chars=8, max_markup_ratio=0.05))
    for t in (table, chunked):
        out = apply_rules(t, rules)
        assert out.schema == t.schema and out.column("text").equals(t.column("text"))
        assert out.column("outcome").to_pylist() == [
            "kept",
            "dropped",
            "quarantined",
            "dropped",
            "dropped",
            "dropped",
        ]
        assert out.column("reason").to_pylist() == [
            "",
            cleaning.TOO_SHORT,
            "invalid_json",
            cleaning.REPEATED_CHARS,
            "too_short",
            cleaning.MARKUP_RESIDUE,
        ]
