"""`chuxin-ray report` on a run made by real stages on the local Ray: ingest on demo text, then
`run_pipeline` from tokenize (tokenize, 6 RetroMAE steps on 1 worker, the reranker `score` stage on pairs
built from the ingested passages), which ends by writing the report. `evaluate` is represented by a
results.json in its documented layout (set -> model -> method -> metrics) and a manifest, `finetune` by a
started, unfinished output. The report's numbers are checked against the files the stages wrote: the
Markdown tables are parsed back; the HTML must carry its charts inline.
"""

from __future__ import annotations

import base64
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch
import yaml

from chuxin_ray import cli, demo, storage
from chuxin_ray.config import load_config
from chuxin_ray.data.shards import read_table
from chuxin_ray.pipeline import run_pipeline
from chuxin_ray.report import write_report
from chuxin_ray.stages import ingest, pretrain

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

RESULTS = {  # evaluate's results.json layout: set -> model -> method -> {metric: value}
    "t2retrieval-mini": {
        "model": {"dense": {"ndcg_at_10": 0.6125, "recall_at_10": 0.75, "mrr_at_10": 0.58}},
        "baseline": {"dense": {"ndcg_at_10": 0.5, "recall_at_10": 0.7, "mrr_at_10": 0.45}},
    }
}

EVALUATE_MANIFEST = {"stage": "evaluate", "status": "complete", "duration_s": 42.0, "counts": {"queries": 50}}


def build_reranker(tok_dir: Path, dest: Path) -> Path:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from chuxin_ray.models.tiny import tiny_xlmr_config

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    # one segment type, as XLM-R: a type_vocab_size=1 model cannot embed the pair's second text as type 1
    tok.model_input_names = tok.init_kwargs["model_input_names"] = ["input_ids", "attention_mask"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_config(
            tiny_xlmr_config(vocab_size=len(tok), dropout=0.0, initializer_range=0.5, num_labels=1)
        )
    model.save_pretrained(str(dest))
    tok.save_pretrained(str(dest))
    return dest


@pytest.fixture(scope="module")
def run(tmp_path_factory, ray_local):
    """A run folder made by the stages; returns (config, manifests by stage, the pipeline's report.md)."""
    root = tmp_path_factory.mktemp("report")
    texts = demo.people_daily()[:400] + demo.reviews()[:100]
    lines = [json.dumps({"text": t}, ensure_ascii=False) for t in texts]
    lines += [json.dumps({"text": t}, ensure_ascii=False) for t in texts[:15]]  # 15 duplicates
    lines += ['{"text": broken'] * 4 + [json.dumps({"text": "好"})] * 3  # 4 quarantined, 3 too short
    (root / "raw.jsonl").write_text("\n".join(lines), encoding="utf-8")
    tok_dir = demo.train_tokenizer(texts, root / "tokenizer", vocab_size=1200)
    data = {
        "run": {"name": "rep", "output": str(root / "run")},
        "ingest": {"inputs": [{"uri": str(root / "raw.jsonl")}], "dedup": {"num_partitions": 1}},
        "tokenize": {"tokenizer": str(tok_dir), "max_length": 64, "long_texts": "window", "stride": 8},
        "pretrain": {
            "model": "tiny",
            "max_length": 64,
            "training": {
                "workers": 1,
                "cpus_per_worker": 0.5,
                "steps": 6,
                "batch_size": 8,
                "bucket_batches": 2,
                "lr": 1e-3,
                "checkpoint_every": 6,
            },
        },
        "score": {
            "reranker": str(build_reranker(tok_dir, root / "reranker")),
            "input": str(root / "pairs"),
            "max_length": 64,
            "pos_threshold": -0.5,
            "neg_threshold": 0.5,
            "runtime": {"batch_size": 32},
        },
    }
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    cfg = load_config(path)

    manifests = {"ingest": ingest.main(cfg)}
    out = storage.resolve(cfg.stage_output("ingest"))
    passages = read_table(out, [f["path"] for f in manifests["ingest"]["files"]["data"]]).column("text")
    passages = [p for p in passages.to_pylist() if len(p) >= 20][:60]
    (root / "pairs").mkdir()
    for part in range(2):  # two files: the report samples across files
        rows = [
            {"query": p[:12], "pos": [p], "neg": [passages[(i + k) % len(passages)] for k in (1, 7, 13)]}
            for i, p in enumerate(passages)
            if i % 2 == part
        ]
        body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        (root / "pairs" / f"part-{part}.jsonl").write_text(body, encoding="utf-8")
    manifests.update(run_pipeline(cfg, start="tokenize"))  # tokenize, pretrain, score, then the report
    assert sorted(manifests) == ["ingest", "pretrain", "score", "tokenize"]
    written_by_pipeline = (root / "run" / "report" / "report.md").read_text(encoding="utf-8")

    run_dir = root / "run"
    (run_dir / "evaluate").mkdir()
    (run_dir / "evaluate" / "results.json").write_text(json.dumps(RESULTS))
    (run_dir / "evaluate" / "_manifest.json").write_text(json.dumps(EVALUATE_MANIFEST))
    (run_dir / "finetune").mkdir()
    (run_dir / "finetune" / "_manifest.json").write_text(
        json.dumps({"stage": "finetune", "status": "running"})
    )
    return cfg, manifests, written_by_pipeline


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


def test_the_pipeline_ends_with_the_report(run):
    cfg, manifests, md = run
    stages = {r[0]: r for r in md_rows(md_section(md, "## Stages"))}
    assert [stages[s][1] for s in ("ingest", "tokenize", "pretrain", "score")] == ["complete"] * 4
    assert stages["evaluate"][1] == "not run"  # written before this test added evaluate's files
    assert number(stages["ingest"][4]) == manifests["ingest"]["counts"]["kept"]


def test_report_numbers_equal_the_manifests(run):
    cfg, manifests, _ = run
    result = write_report(cfg.run.output)
    md = Path(result["markdown"]).read_text(encoding="utf-8")

    stages = {r[0]: r for r in md_rows(md_section(md, "## Stages"))}
    assert stages["synthesize"][1] == "not run" and stages["export"][1] == "not run"
    assert stages["finetune"][1] == "incomplete"
    assert result["stages"]["finetune"] == "incomplete"
    assert (
        stages["evaluate"][1:3] == ["complete", "42.0 s"] and outcome(stages["evaluate"][5], "queries") == 50
    )
    for name in ("ingest", "tokenize", "pretrain", "score"):
        assert stages[name][1] == "complete"

    c = manifests["ingest"]["counts"]
    row = stages["ingest"]
    assert (number(row[3]), number(row[4])) == (c["read"], c["kept"])
    assert outcome(row[5], "duplicates") == c["duplicates"] >= 15  # + duplicates in the demo text
    assert outcome(row[5], "quarantined") == sum(c["quarantined"].values()) == 4
    assert outcome(row[5], "dropped") == sum(c["dropped"].values()) >= 3
    c = manifests["tokenize"]["counts"]
    assert (number(stages["tokenize"][3]), number(stages["tokenize"][4])) == (c["texts"], c["rows"])
    assert outcome(stages["tokenize"][5], "tokens") == c["tokens"]
    c = manifests["pretrain"]["counts"]
    assert number(stages["pretrain"][3]) == c["samples"]
    assert outcome(stages["pretrain"][5], "steps") == c["steps"] == 6
    f = manifests["score"]["counts"]["funnel"]
    row = stages["score"]
    assert (number(row[3]), number(row[4])) == (f["queries_score_in"], f["queries_out"])
    assert outcome(row[5], "pairs_scored") == f["pairs_scored"]
    assert outcome(row[5], "pairs_out") == f["pairs_out"]
    assert outcome(row[5], "pairs_dropped") == sum(f["pairs_dropped"].values())

    funnel = {r[2]: r[1] for r in md_rows(md_section(md, "## Data funnel"))}
    c = manifests["ingest"]["counts"]
    assert number(funnel["records read"]) == c["read"]
    assert number(funnel["passages kept"]) == c["kept"]
    assert number(funnel["exact duplicates"]) == c["duplicates"]
    assert number(funnel["training pairs kept by the reranker"]) == f["pairs_out"]
    assert funnel["queries generated"] == "not run"

    metrics = pretrain.read_metrics(storage.resolve(cfg.stage_output("pretrain")))
    losses = {r[0]: r for r in md_rows(md_section(md, "### pretrain"))}
    for name in ("loss", "encoder_loss", "decoder_loss"):
        steps, first, last, low = (number(x) for x in losses[name][1:5])
        values = [m[name] for m in metrics]
        assert steps == len(values) == 6
        assert first == pytest.approx(values[0], rel=1e-3) and last == pytest.approx(values[-1], rel=1e-3)
        assert low == pytest.approx(min(values), rel=1e-3)
    assert md_section(md, "### finetune").strip().startswith("not run")

    rows = [json.loads(x) for p in Path(cfg.stage_output("score"), "data").glob("*.jsonl") for x in p.open()]
    pos = [s for r in rows for s in r["pos_scores"]]
    neg = [s for r in rows for s in r["neg_scores"]]
    scores = {r[0]: r for r in md_rows(md_section(md, "## Reranker scores"))}
    assert number(scores["positives"][1]) == len(pos) and number(scores["negatives"][1]) == len(neg)
    assert number(scores["positives"][2]) == pytest.approx(sum(pos) / len(pos), rel=1e-3, abs=1e-3)
    assert number(scores["negatives"][6]) == 0.5

    evaluation = md_rows(md_section(md, "### t2retrieval-mini"))
    assert evaluation[0][:3] == ["dense", "model", "0.6125"]
    assert evaluation[1][:3] == ["dense", "baseline", "0.5"]
    assert evaluation[2][1].startswith("Δ model") and evaluation[2][2] == "+0.1125"

    page = Path(result["html"]).read_text(encoding="utf-8")
    assert not re.search(r"https?://|//[a-z]", page.replace("data:image/svg+xml;base64,", ""))
    images = re.findall(r'<img alt="([^"]+)" src="data:image/svg\+xml;base64,([A-Za-z0-9+/=]+)">', page)
    assert [alt for alt, _ in images] == ["data funnel", "pretrain loss", "score histograms"]
    assert len(re.findall(r"<img ", page)) == len(images)  # every image is one of these
    for alt, data in images:
        svg = ET.fromstring(base64.b64decode(data))  # well-formed SVG
        assert svg.tag == "{http://www.w3.org/2000/svg}svg", alt
    loss_svg = ET.fromstring(base64.b64decode(images[1][1]))
    lines = loss_svg.findall("{http://www.w3.org/2000/svg}polyline")
    assert len(lines) == 3 and all(len(p.get("points").split()) == 6 for p in lines)


def test_report_from_object_storage_through_the_cli(run, s3_server, monkeypatch):
    """The same run copied to S3: `chuxin-ray report s3://...` with the storage settings from env."""
    cfg, manifests, _ = run
    bucket = s3_server.new_bucket("report")
    fs = storage.resolve(f"s3://{bucket}", s3_server.storage_config()).fs
    pafs.copy_files(cfg.run.output, f"{bucket}/run", pafs.LocalFileSystem(), fs)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)

    assert cli.main(["report", f"s3://{bucket}/run"]) == 0
    md = storage.read_bytes(
        storage.resolve(f"s3://{bucket}/run/report/report.md", s3_server.storage_config())
    )
    stages = {r[0]: r for r in md_rows(md_section(md.decode(), "## Stages"))}
    assert number(stages["ingest"][4]) == manifests["ingest"]["counts"]["kept"]
    assert stages["score"][1] == "complete" and stages["mine"][1] == "not run"
