"""The report on runs that are empty, half-finished or malformed: it says so and never raises.
(tests/integration/test_report.py checks its numbers on a run made by real stages.)"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from chuxin_ray import report


def write(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")


def statuses(md: str) -> dict[str, str]:
    section = md.split("## Stages", 1)[1].split("## ", 1)[0]
    rows = [line.strip("|").split(" | ") for line in section.splitlines() if line.startswith("| ")]
    return {r[0].strip(): r[1].strip() for r in rows[1:]}


def test_an_absent_run_reports_every_stage_as_not_run(tmp_path):
    result = report.write_report(str(tmp_path / "nothing-here"))
    md = Path(result["markdown"]).read_text(encoding="utf-8")
    assert set(statuses(md).values()) == {"not run"}
    assert set(result["stages"].values()) == {"not run"}
    page = Path(result["html"]).read_text(encoding="utf-8")
    assert "<img" not in page and "http" not in page


def test_malformed_and_unfinished_outputs_are_shown_not_raised(tmp_path, monkeypatch):
    run = tmp_path / "run"
    write(run / "ingest" / "_manifest.json", "{not json")
    write(run / "tokenize" / "part-0.parquet", "")  # started, no manifest
    write(
        run / "pretrain" / "metrics.jsonl",
        '{"step": 1, "loss": 2.0, "encoder_loss": 1.0}\nnot json\n{"step": 2, "loss": 1.5, "encoder_loss": 0.75}\n',
    )
    write(
        run / "finetune" / "_manifest.json",
        {
            "stage": "finetune",
            "status": "complete",
            "duration_s": 3600.0,
            "counts": {"steps": 3, "samples": 96},
        },
    )
    write(run / "finetune" / "metrics.jsonl", "")
    write(run / "evaluate" / "results.json", [1, 2, 3])
    score_rows = [{"query": "q", "pos_scores": [2.0], "neg_scores": [-1.0, -2.0]}] * 30
    write(
        run / "score" / "_manifest.json",
        {
            "stage": "score",
            "status": "complete",
            "config": {"pos_threshold": 0.0, "neg_threshold": None, "mode": "absolute"},
            "counts": {"funnel": {"queries_score_in": 31, "queries_out": 30, "pairs_scored": 93}},
            "files": {"data": [{"path": "data/part-0.jsonl", "rows": 30}]},
        },
    )
    write(run / "score" / "data" / "part-0.jsonl", "\n".join(map(json.dumps, score_rows)) + "\nbroken line\n")
    monkeypatch.setattr(report, "SCORE_SAMPLE_ROWS", 10)

    result = report.write_report(str(run))
    md = Path(result["markdown"]).read_text(encoding="utf-8")
    assert statuses(md) == {
        **dict.fromkeys(report.STAGES, "not run"),
        "ingest": "incomplete",
        "tokenize": "incomplete",
        "pretrain": "incomplete",  # metrics of a run that stopped before its manifest
        "finetune": "complete",
        "score": "complete",
        "evaluate": "incomplete",
    }
    assert any("_manifest.json: not readable as JSON" in p for p in result["problems"])
    assert any("metrics.jsonl: line 2 is not JSON" in p for p in result["problems"])
    assert "| finetune | complete | 60.0 min | 96 | — | steps: 3 |" in md  # a shape the report does not know
    assert "| loss | 2 | 2 | 1.5 | 1.5 |" in md
    assert "a sample of 10 of 30 rows from 1 of 1 files" in md  # capped at SCORE_SAMPLE_ROWS
    assert "| positives | 10 | 2 |" in md and "| negatives | 20 | -1.5 |" in md
    assert "results.json is not a mapping" in md and "evaluate has no complete manifest" in md

    page = Path(result["html"]).read_text(encoding="utf-8")
    assert re.findall(r'<img alt="([^"]+)"', page) == ["pretrain loss", "score histograms"]


@pytest.mark.parametrize(("lo", "hi"), [(0.0, 1.0), (-3.1, 2.7), (15.43, 15.56), (1.0, 48829.0), (5.0, 5.0)])
def test_ticks_are_round_and_cover_the_range(lo, hi):
    ticks = report.nice_ticks(lo, hi)
    assert ticks[0] <= lo and ticks[-1] >= hi and 2 <= len(ticks) <= 12
    step = ticks[1] - ticks[0]
    mantissa = step / 10 ** int(f"{step:e}".split("e")[1])
    assert round(mantissa, 6) in (1.0, 2.0, 5.0)
