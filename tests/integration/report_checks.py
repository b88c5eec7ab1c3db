"""Checks of `chuxin-ray report` against a real run; a helper module, not a test file.

`check_report(run_dir)` is called by the tiny pipeline's test (tests/integration/test_cli.py) on the run
it made, every stage of the recipe included, and reads the report's numbers back against the stages'
manifests, metrics and outputs: the Markdown tables parsed back, the HTML with its charts inline and
nothing fetched from anywhere.
"""

from __future__ import annotations

import base64
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from chuxin_ray import cli, storage
from chuxin_ray.report import write_report
from chuxin_ray.train import loop


def md_section(md: str, title: str) -> str:
    return md.split(f"\n{title}\n", 1)[1].split("\n## ", 1)[0]


def md_rows(section: str) -> list[list[str]]:
    """The first Markdown table of a section: one list of cells per body row."""
    rows = []
    for line in section.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            rows.append([c.strip() for c in line.strip().strip("|").split(" | ")])
        elif rows and not line.startswith("|"):
            break
    return rows[1:]


def number(text: str) -> float:
    return float(text.replace(",", ""))


def outcome(cell: str, name: str) -> float:
    match = re.search(rf"(?:^|; ){name}: ([-0-9.,e+]+)", cell)
    assert match, f"{name} not in {cell!r}"
    return number(match.group(1))


def check_report(run_dir: Path) -> None:
    """The report of a complete tiny run (jobs/tiny.yaml) against what its stages wrote."""
    manifests = {p.parent.name: json.loads(p.read_text()) for p in run_dir.glob("*/_manifest.json")}
    result = write_report(str(run_dir))
    md = Path(result["markdown"]).read_text(encoding="utf-8")

    stages = {r[0]: r for r in md_rows(md_section(md, "## Stages"))}
    for name in manifests:
        assert stages[name][1] == "complete", name
    c = manifests["ingest"]["counts"]
    row = stages["ingest"]
    assert (number(row[3]), number(row[4])) == (c["read"], c["kept"])
    assert outcome(row[5], "duplicates") == c["duplicates"]
    assert outcome(row[5], "dropped") == sum(c["dropped"].values())
    c = manifests["tokenize"]["counts"]
    assert (number(stages["tokenize"][3]), number(stages["tokenize"][4])) == (c["texts"], c["rows"])
    c = manifests["pretrain"]["counts"]
    assert (
        number(stages["pretrain"][3]) == c["samples"]
        and outcome(stages["pretrain"][5], "steps") == c["steps"]
    )
    f = manifests["score"]["counts"]["funnel"]
    row = stages["score"]
    assert (number(row[3]), number(row[4])) == (f["queries_score_in"], f["queries_out"])
    assert outcome(row[5], "pairs_out") == f["pairs_out"]

    funnel = {r[2]: r[1] for r in md_rows(md_section(md, "## Data funnel"))}
    assert number(funnel["records read"]) == manifests["ingest"]["counts"]["read"]
    assert number(funnel["passages kept"]) == manifests["ingest"]["counts"]["kept"]
    assert number(funnel["training pairs kept by the reranker"]) == f["pairs_out"]

    metrics = loop.read_metrics(storage.resolve(str(run_dir / "pretrain")))
    losses = {r[0]: r for r in md_rows(md_section(md, "### pretrain"))}
    steps, first, last, low = (number(x) for x in losses["loss"][1:5])
    values = [m["loss"] for m in metrics]
    assert steps == len(values) and first == pytest.approx(values[0], rel=1e-3)
    assert last == pytest.approx(values[-1], rel=1e-3) and low == pytest.approx(min(values), rel=1e-3)
    for stage in ("finetune", "unified"):
        assert number(md_rows(md_section(md, f"### {stage}"))[0][1]) == manifests[stage]["counts"]["steps"]

    rows = [json.loads(x) for p in (run_dir / "score" / "data").glob("*.jsonl") for x in p.open()]
    scores = {r[0]: r for r in md_rows(md_section(md, "## Reranker scores"))}
    assert number(scores["positives"][1]) == sum(len(r["pos_scores"]) for r in rows)
    assert number(scores["negatives"][1]) == sum(len(r["neg_scores"]) for r in rows)

    results = json.loads((run_dir / "evaluate" / "results.json").read_text())
    for set_name, by_model in results.items():
        table = md_rows(md_section(md, f"### {set_name}"))
        dense = [r for r in table if r[0] == "dense"]
        assert dense[0][1] == "model"
        assert number(dense[0][2]) == pytest.approx(by_model["model"]["dense"]["ndcg_at_10"], abs=1e-4)
        assert number(dense[1][2]) == pytest.approx(by_model["baseline"]["dense"]["ndcg_at_10"], abs=1e-4)

    page = Path(result["html"]).read_text(encoding="utf-8")
    assert not re.search(r"https?://|//[a-z]", page.replace("data:image/svg+xml;base64,", ""))
    images = re.findall(r'<img alt="([^"]+)" src="data:image/svg\+xml;base64,([A-Za-z0-9+/=]+)">', page)
    assert len(images) >= 3 and len(re.findall(r"<img ", page)) == len(images)
    for alt, data in images:
        svg = ET.fromstring(base64.b64decode(data))  # well-formed SVG
        assert svg.tag == "{http://www.w3.org/2000/svg}svg", alt


def check_report_from_object_storage(run_dir: Path, s3_server, monkeypatch) -> None:
    """The same run copied to S3: `chuxin-ray report s3://...` with the storage settings from env."""
    bucket = s3_server.new_bucket("report")
    fs = storage.resolve(f"s3://{bucket}", s3_server.storage_config()).fs
    pafs.copy_files(str(run_dir), f"{bucket}/run", pafs.LocalFileSystem(), fs)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    assert cli.main(["report", f"s3://{bucket}/run"]) == 0
    md = storage.read_bytes(
        storage.resolve(f"s3://{bucket}/run/report/report.md", s3_server.storage_config())
    )
    stages = {r[0]: r for r in md_rows(md_section(md.decode(), "## Stages"))}
    kept = json.loads((run_dir / "ingest" / "_manifest.json").read_text())["counts"]["kept"]
    assert number(stages["ingest"][4]) == kept and stages["export"][1] == "complete"
