"""Stage `judge`: query rules, then the LLM judges each query -> the queries worth training on.

    synthesize output {query_id, passage_id, query, passage, source}
      -> per-row rules: length, copied from the passage, CJK share   data/query_rules.py
      -> hash shuffle on the normalised query; duplicates marked     keep the smallest query_id
      -> the LLM, only for rows that passed: "is this a plausible search query for this passage?"
      -> the answer parsed to yes / no / unknown (failed: no answer), the raw answer kept
      -> the keep rule (judge.keep) -> data/ (kept) and rejected/ (with reason, verdict, answer)

Every query ends in exactly one of: kept, rule-filtered (by rule), judged out (by verdict).
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass

import pyarrow as pa
import ray

from chuxin_ray import storage
from chuxin_ray.config import Config, JudgeConfig
from chuxin_ray.data.query_rules import KEY, apply_query_rules, mark_duplicate_queries
from chuxin_ray.data.row_ranges import InputFile, stage_inputs
from chuxin_ray.data.shards import write_shard
from chuxin_ray.llm.calls import add_llm_answers, endpoint, retried_counts, vllm_processor_config
from chuxin_ray.llm.prompts import FAILED, NO, UNKNOWN, YES, cut, messages_for, parse_verdict
from chuxin_ray.ray_cluster import available_cpus, connect

log = logging.getLogger(__name__)

STAGE = "judge"
SUBDIRS = ("data", "rejected")
INPUT_COLUMNS = ["query_id", "passage_id", "query", "passage", "source"]
KEEP = {"yes": {YES}, "not_no": {YES, UNKNOWN}, "all": {YES, NO, UNKNOWN, FAILED}}
DATA_COLUMNS = [*INPUT_COLUMNS, "verdict", "judge_answer"]
REJECTED_COLUMNS = [*INPUT_COLUMNS, "reason", "verdict", "judge_answer", "error"]
SUMMARY_SCHEMA = pa.schema(
    [("kind", pa.string()), ("key", pa.string()), ("count", pa.int64()), ("file", pa.string())]
)


@dataclass
class JudgePlan:
    cfg: JudgeConfig
    src: storage.Location
    out: storage.Location
    files: list[InputFile]
    upstream: dict  # the synthesize funnel
    config_hash: str
    manifest: dict | None


def setup(cfg: Config, force: bool = False) -> JudgePlan:
    section: JudgeConfig = cfg.require(STAGE)
    out = storage.resolve(cfg.stage_output(STAGE), cfg.storage)
    config_hash = cfg.hash(STAGE)
    src = storage.resolve(section.input or cfg.stage_output("synthesize"), cfg.storage)
    manifest = storage.begin_stage(STAGE, out, config_hash, force, SUBDIRS)
    if manifest is not None:
        return JudgePlan(section, src, out, [], {}, config_hash, manifest)
    if section.llm.engine == "http":
        endpoint(section.llm, cfg, STAGE)
    else:
        vllm_processor_config(section.llm, cfg, STAGE)
    files = stage_inputs(src, f"{STAGE}.input")
    upstream = (storage.read_manifest(src) or {}).get("counts", {}).get("funnel", {})
    return JudgePlan(section, src, out, files, upstream, config_hash, None)


def run(plan: JudgePlan, cfg: Config) -> dict:
    if plan.manifest is not None:
        return storage.report_complete(STAGE, plan.out, plan.manifest)
    started = time.time()
    connect(cfg.ray)
    section = plan.cfg
    ds = ray.data.read_parquet([f.path for f in plan.files], filesystem=plan.src.fs).select_columns(
        INPUT_COLUMNS
    )
    ds = ds.map_batches(apply_query_rules, batch_format="pyarrow", fn_kwargs={"rules": section.rules})
    if section.rules.dedup:
        # As in ingest: after a keyed repartition one map_batches call sees a whole partition, so
        # every copy of a query is in the same call.
        ds = ds.repartition(section.num_partitions or available_cpus(), keys=[KEY])
        ds = ds.map_batches(mark_duplicate_queries, batch_format="pyarrow", batch_size=None)
    ds = ds.map_batches(
        judge_messages,
        batch_format="pyarrow",
        fn_kwargs={"template": section.prompt, "max_chars": section.max_passage_chars},
    )
    ds = add_llm_answers(ds, section.llm, cfg, STAGE, [*INPUT_COLUMNS, "reason", "messages"])
    summary = ds.map_batches(
        finish_batch,
        batch_format="pyarrow",
        batch_size=None,
        fn_kwargs={"out": plan.out, "keep": section.keep},
    ).take_all()

    counts, files = summarize(summary, expected=sum(f.rows for f in plan.files), upstream=plan.upstream)
    manifest = storage.stage_manifest(
        STAGE,
        plan.config_hash,
        cfg.redacted()[STAGE],
        inputs=[plan.src.uri],
        counts=counts,
        files=files,
        started=started,
    )
    storage.write_manifest(plan.out, manifest)
    f = counts["funnel"]
    log.info(
        "%s: %d queries -> %d kept (%d rule-filtered, %d judged out) in %.1f s",
        STAGE,
        f["queries_judge_in"],
        f["queries_kept"],
        sum(f["rule_filtered"].values()),
        sum(f["judged_out"].values()),
        time.time() - started,
    )
    return manifest


def main(cfg: Config, force: bool = False) -> dict:
    return run(setup(cfg, force), cfg)


# --------------------------------------------------------------------------------------------------
# Ray Data steps
# --------------------------------------------------------------------------------------------------


def judge_messages(table: pa.Table, template, max_chars: int) -> pa.Table:
    """Chat messages for rows that passed the rules; null (no call) for the others."""
    messages = [
        json.dumps(messages_for(template, query=q, passage=cut(p, max_chars)), ensure_ascii=False)
        if not r
        else None
        for q, p, r in zip(
            table.column("query").to_pylist(),
            table.column("passage").to_pylist(),
            table.column("reason").to_pylist(),
            strict=True,
        )
    ]
    return table.append_column("messages", pa.array(messages, pa.string()))


def finish_batch(table: pa.Table, out: storage.Location, keep: str) -> pa.Table:
    """Verdicts, the keep rule, this block's files, and what happened to each row."""
    rows = table.to_pylist()
    kept, rejected = [], []
    tally: Counter = Counter()
    for row in rows:
        if row["reason"]:
            tally[("rule_filtered", row["reason"])] += 1
            rejected.append(dict(row, verdict=None, judge_answer=None))
            continue
        verdict = parse_verdict(row["answer"])
        tally[("judged", verdict)] += 1
        if row["error"]:
            tally[("failed_calls", row["error"])] += 1
        row = dict(row, verdict=verdict, judge_answer=row["answer"])
        if verdict in KEEP[keep]:
            tally[("kept", "")] += 1
            kept.append(row)
        else:
            tally[("judged_out", verdict)] += 1
            rejected.append(dict(row, reason=f"judged_{verdict}"))
    for reason, n in retried_counts(table.column("retried").to_pylist()).items():
        tally[("retried_attempts", reason)] += n
    tally[("requests", "")] += int(sum(table.column("attempts").to_pylist()))
    summary = {"kind": [], "key": [], "count": [], "file": []}
    for (kind, key), n in tally.items():
        for name, value in zip(summary, (kind, key, n, ""), strict=True):
            summary[name].append(value)
    for name, part, columns in (("data", kept, DATA_COLUMNS), ("rejected", rejected, REJECTED_COLUMNS)):
        if part:
            rel = write_shard(
                out,
                name,
                pa.Table.from_pylist([{c: r.get(c) for c in columns} for r in part], _schema(columns)),
            )
            for col, value in zip(summary, (name, "", len(part), rel), strict=True):
                summary[col].append(value)
    return pa.table(summary, schema=SUMMARY_SCHEMA)


def _schema(columns: list[str]) -> pa.Schema:
    return pa.schema([(c, pa.string()) for c in columns])


def summarize(summary: list[dict], expected: int, upstream: dict) -> tuple[dict, dict]:
    by: dict[str, Counter] = {}
    files: dict[str, list] = {"data": [], "rejected": []}
    for row in summary:
        if row["file"]:
            files[row["kind"]].append({"path": row["file"], "rows": row["count"]})
        else:
            by.setdefault(row["kind"], Counter())[row["key"]] += row["count"]

    def named(kind: str) -> dict:
        return dict(sorted(by.get(kind, Counter()).items()))

    own = {
        "queries_judge_in": expected,
        "rule_filtered": named("rule_filtered"),
        "judged": named("judged"),
        "judged_out": named("judged_out"),
        "judge_failed_calls": named("failed_calls"),
        "judge_retried_attempts": named("retried_attempts"),
        "queries_kept": sum(by.get("kept", Counter()).values()),
    }
    accounted = own["queries_kept"] + sum(own["rule_filtered"].values()) + sum(own["judged_out"].values())
    if accounted != expected:
        raise RuntimeError(
            f"{STAGE}: {expected} queries in but {accounted} accounted for "
            f"(kept + rule-filtered + judged out); no manifest written"
        )
    for name in files:
        files[name].sort(key=lambda f: f["path"])
    counts = {"funnel": {**upstream, **own}, "requests": sum(by.get("requests", Counter()).values())}
    return counts, files
