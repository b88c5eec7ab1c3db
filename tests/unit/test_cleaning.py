"""Cleaning rules, each on texts made to pass or fail it."""

from __future__ import annotations

import pyarrow as pa
import pytest

from chuxin_ray.config import CleaningRules
from chuxin_ray.data import cleaning
from chuxin_ray.data.cleaning import RuleSet, apply_rules, normalize_for_dedup

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


def test_normalize_for_dedup():
    assert normalize_for_dedup("Ｈｅｌｌｏ　世界 ！", "nfkc_casefold_space") == "hello世界!"
    assert normalize_for_dedup("A b", "exact") == "A b"
