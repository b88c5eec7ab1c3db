"""Stage `synthesize`: passages -> an LLM writes search queries for each -> {query, passage} Parquet.

    ingest output, cut into row ranges of shard_rows      data/row_ranges.py (the same every run)
      -> one Ray Data block per pending range: passages   finished ranges are skipped
      -> a chat prompt per passage                        llm/prompts.py (templates from config)
      -> the LLM: HTTP caller actors or vLLM in Ray Data  llm/calls.py, llm/client.py
      -> the driver collects each range; when whole, it parses the answers and writes
         data/shard-NNNNN.parquet, failed/shard-NNNNN.parquet, then the marker _done/shard-NNNNN.json
      -> when every range has its marker: the manifest, with the funnel summed over the markers

A killed run leaves whole shards with markers (writes are atomic and the marker comes last); a
rerun with the same inputs and generation settings (`_plan.json`) generates only the rest. Every
passage ends in exactly one of: queries written, answer without a parseable query, failed call.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import ray

from chuxin_ray import storage
from chuxin_ray.config import Config, SynthesizeConfig
from chuxin_ray.data.row_ranges import InputFile, RowRange, plan_ranges, read_range, stage_inputs
from chuxin_ray.data.shards import write_parquet
from chuxin_ray.llm.calls import add_llm_answers, endpoint, retried_counts, vllm_processor_config
from chuxin_ray.llm.prompts import cut, messages_for, parse_queries, pick_template
from chuxin_ray.ray_cluster import connect

log = logging.getLogger(__name__)

STAGE = "synthesize"
DATA, FAILED, DONE = "data", "failed", "_done"
PLAN = "_plan.json"
UNPARSED = "no_query_in_answer"
DATA_SCHEMA = pa.schema(
    [
        ("query_id", pa.string()),  # <passage_id>#q<k>
        ("passage_id", pa.string()),
        ("query", pa.string()),
        ("passage", pa.string()),
        ("source", pa.string()),
        ("prompt", pa.string()),  # the template's name
    ]
)
FAILED_SCHEMA = pa.schema(
    [
        ("passage_id", pa.string()),
        ("source", pa.string()),
        ("reason", pa.string()),  # a client failure reason, or no_query_in_answer
        ("attempts", pa.int32()),
        ("answer", pa.string()),  # the raw answer when it held no query
    ]
)
ROW_COLUMNS = ["shard", "passage_id", "passage", "source", "prompt", "messages"]


@dataclass
class SynthesizePlan:
    cfg: SynthesizeConfig
    src: storage.Location
    out: storage.Location
    files: list[InputFile]
    ranges: list[RowRange]
    pending: list[RowRange]
    config_hash: str
    manifest: dict | None
    finished: dict[str, dict] = field(default_factory=dict)  # shard name -> its marker


def setup(cfg: Config, force: bool = False) -> SynthesizePlan:
    section: SynthesizeConfig = cfg.require(STAGE)
    out = storage.resolve(cfg.stage_output(STAGE), cfg.storage)
    config_hash = cfg.hash(STAGE)
    src = storage.resolve(section.input or cfg.stage_output("ingest"), cfg.storage)
    manifest = storage.begin_stage(STAGE, out, config_hash, force, subdirs=())
    if manifest is not None:
        return SynthesizePlan(section, src, out, [], [], [], config_hash, manifest)
    if section.llm.engine == "http":
        endpoint(section.llm, cfg, STAGE)
    else:
        vllm_processor_config(section.llm, cfg, STAGE)
    files = first_rows(stage_inputs(src, f"{STAGE}.input"), section.max_passages)
    ranges = plan_ranges(files, section.shard_rows)
    identity = generation_identity(section, cfg, files)
    previous = storage.read_json(out.child(PLAN)) if storage.exists(out.child(PLAN)) else None
    if force or previous is None or previous.get("identity") != identity:
        if previous is not None:
            log.info("%s: inputs or generation settings changed; starting over in %s", STAGE, out.uri)
        for sub in (DATA, FAILED, DONE):
            storage.delete_dir(out.child(sub))
        storage.write_json(out.child(PLAN), {"identity": identity, "shards": len(ranges)})
    finished = read_markers(out)
    pending = [r for r in ranges if r.name not in finished]
    if finished:
        log.info(
            "%s: %d of %d shards already finished; generating the rest", STAGE, len(finished), len(ranges)
        )
    return SynthesizePlan(section, src, out, files, ranges, pending, config_hash, None, finished)


def first_rows(files: list[InputFile], limit: int | None) -> list[InputFile]:
    """The files cut to their first `limit` rows in order (the ingest output is in hash order, so the
    first rows are a uniform sample)."""
    if limit is None:
        return files
    kept, left = [], limit
    for f in files:
        if left <= 0:
            break
        kept.append(InputFile(f.path, min(f.rows, left)))
        left -= f.rows
    return kept


def generation_identity(section: SynthesizeConfig, cfg: Config, files: list[InputFile]) -> str:
    """What decides a shard's content: inputs, prompts, sampling and the model. Concurrency,
    retries and timeouts are left out, so a rerun may change them and keep finished shards."""
    llm = section.llm
    model = llm.model or (cfg.serve.served_model if cfg.serve else None)
    data = {
        "inputs": [(f.path, f.rows) for f in files],
        "prompts": [p.model_dump() for p in section.prompts],
        "n": section.queries_per_passage,
        "max_passage_chars": section.max_passage_chars,
        "shard_rows": section.shard_rows,
        "llm": [llm.engine, model, llm.temperature, llm.top_p, llm.max_tokens],
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def read_markers(out: storage.Location) -> dict[str, dict]:
    done = out.child(DONE)
    if not storage.exists(done):
        return {}
    markers = {}
    for info in storage.list_files(done, (".json",)):
        loc = storage.Location(out.fs, info.path, done.uri_of(info.path))
        markers[info.base_name.removesuffix(".json")] = storage.read_json(loc)
    return markers


def run(plan: SynthesizePlan, cfg: Config) -> dict:
    if plan.manifest is not None:
        return storage.report_complete(STAGE, plan.out, plan.manifest)
    started = time.time()
    finished = dict(plan.finished)
    if plan.pending:
        connect(cfg.ray)
        finished.update(generate(plan, cfg))
    return finish(plan, cfg, finished, started)


def main(cfg: Config, force: bool = False) -> dict:
    return run(setup(cfg, force), cfg)


def generate(plan: SynthesizePlan, cfg: Config) -> dict[str, dict]:
    """Run the pending shards; each is written by the driver the moment its last passage returns."""
    section = plan.cfg
    by_shard = {r.shard: r for r in plan.pending}
    ds = ray.data.from_items(
        [{"shard": r.shard} for r in plan.pending], override_num_blocks=len(plan.pending)
    )
    ds = ds.map_batches(
        passages_with_prompts,
        batch_size=1,
        batch_format="pyarrow",
        fn_kwargs={"fs": plan.src.fs, "ranges": by_shard, "section": section},
    )
    ds = add_llm_answers(ds, section.llm, cfg, STAGE, ROW_COLUMNS)
    parts: dict[int, list[pa.Table]] = {}
    received: Counter = Counter()
    markers: dict[str, dict] = {}
    t0, requests, tokens = time.time(), 0, 0
    for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for shard in set(block.column("shard").to_pylist()):
            part = block.filter(pc.equal(block.column("shard"), shard))
            parts.setdefault(shard, []).append(part)
            received[shard] += part.num_rows
            r = by_shard[shard]
            if received[shard] == r.rows:
                marker = write_shard_output(plan.out, r, pa.concat_tables(parts.pop(shard)), section)
                markers[r.name] = marker
                requests += marker["requests"]
                tokens += marker["completion_tokens"]
                elapsed = max(time.time() - t0, 1e-9)
                log.info(
                    "%s: %s done (%d/%d pending shards), %.1f requests/s, %.0f tokens/s",
                    STAGE,
                    r.name,
                    len(markers),
                    len(plan.pending),
                    requests / elapsed,
                    tokens / elapsed,
                )
    return markers


# --------------------------------------------------------------------------------------------------
# Ray Data step and the driver's shard writer
# --------------------------------------------------------------------------------------------------


def passages_with_prompts(
    batch: pa.Table, fs, ranges: dict[int, RowRange], section: SynthesizeConfig
) -> pa.Table:
    tables = []
    for shard in batch.column("shard").to_pylist():
        r = ranges[shard]
        table = read_range(fs, r)
        n = table.num_rows
        ids = [str(x) for x in table.column("id").to_pylist()]
        texts = table.column("text").to_pylist()
        sources = table.column("source").to_pylist() if "source" in table.column_names else [""] * n
        templates = [pick_template(section.prompts, i) for i in ids]
        messages = [
            json.dumps(
                messages_for(t, passage=cut(text, section.max_passage_chars), n=section.queries_per_passage),
                ensure_ascii=False,
            )
            for t, text in zip(templates, texts, strict=True)
        ]
        tables.append(
            pa.table(
                {
                    "shard": pa.array([shard] * n, pa.int32()),
                    "passage_id": pa.array(ids, pa.string()),
                    "passage": pa.array(texts, pa.string()),
                    "source": pa.array(sources, pa.string()),
                    "prompt": pa.array([t.name for t in templates], pa.string()),
                    "messages": pa.array(messages, pa.string()),
                }
            )
        )
    return pa.concat_tables(tables)


def write_shard_output(
    out: storage.Location, r: RowRange, table: pa.Table, section: SynthesizeConfig
) -> dict:
    """Parse a whole shard's answers, write its data and failures, then its marker (last)."""
    data: dict[str, list] = {name: [] for name in DATA_SCHEMA.names}
    failed: dict[str, list] = {name: [] for name in FAILED_SCHEMA.names}
    failed_calls: Counter = Counter()
    with_queries = 0
    rows = table.to_pylist()
    for row in rows:
        if row["answer"] is None:
            failed_calls[row["error"]] += 1
            _append(failed, row["passage_id"], row["source"], row["error"], row["attempts"], None)
            continue
        queries = parse_queries(row["answer"], section.queries_per_passage)
        if not queries:
            _append(failed, row["passage_id"], row["source"], UNPARSED, row["attempts"], row["answer"])
            continue
        with_queries += 1
        for k, q in enumerate(queries):
            for name, value in zip(
                DATA_SCHEMA.names,
                (
                    f"{row['passage_id']}#q{k}",
                    row["passage_id"],
                    q,
                    row["passage"],
                    row["source"],
                    row["prompt"],
                ),
                strict=True,
            ):
                data[name].append(value)
    data_rel = f"{DATA}/{r.name}.parquet"
    _write(out, data_rel, pa.table(data, schema=DATA_SCHEMA))
    failed_rel = f"{FAILED}/{r.name}.parquet"
    _write(out, failed_rel, pa.table(failed, schema=FAILED_SCHEMA))
    marker = {
        "shard": r.shard,
        "finished_at": time.time(),  # epoch seconds: progress and steady-state rates (bench/synthesis.py)
        "passages": len(rows),
        "passages_with_queries": with_queries,
        "queries": len(data["query_id"]),
        "unparsed_answers": len(failed["reason"]) - sum(failed_calls.values()),
        "failed_calls": dict(failed_calls),
        "retried_attempts": dict(retried_counts(table.column("retried").to_pylist())),
        "requests": int(sum(table.column("attempts").to_pylist())),
        "prompt_tokens": int(sum(table.column("prompt_tokens").to_pylist())),
        "completion_tokens": int(sum(table.column("completion_tokens").to_pylist())),
        "files": {
            "data": {"path": data_rel, "rows": len(data["query_id"])},
            "failed": {"path": failed_rel, "rows": len(failed["reason"])},
        },
    }
    storage.write_json(out.child(DONE, f"{r.name}.json"), marker)
    return marker


def _append(failed: dict, passage_id, source, reason, attempts, answer) -> None:
    for name, value in zip(FAILED_SCHEMA.names, (passage_id, source, reason, attempts, answer), strict=True):
        failed[name].append(value)


def _write(out: storage.Location, rel: str, table: pa.Table) -> None:
    """A fixed name (unlike data.shards.write_shard): a redone shard replaces its own file."""
    write_parquet(out.child(rel), table)


# --------------------------------------------------------------------------------------------------
# The manifest
# --------------------------------------------------------------------------------------------------


def finish(plan: SynthesizePlan, cfg: Config, markers: dict[str, dict], started: float) -> dict:
    missing = [r.name for r in plan.ranges if r.name not in markers]
    if missing:
        raise RuntimeError(f"{STAGE}: shards without output: {', '.join(missing[:5])}; rerun to finish them")
    ordered = [markers[r.name] for r in plan.ranges]
    failed_calls: Counter = Counter()
    retried: Counter = Counter()
    for m in ordered:
        failed_calls.update(m["failed_calls"])
        retried.update(m["retried_attempts"])
    funnel = {
        "passages_in": sum(m["passages"] for m in ordered),
        "passages_with_queries": sum(m["passages_with_queries"] for m in ordered),
        "queries_generated": sum(m["queries"] for m in ordered),
        "unparsed_answers": sum(m["unparsed_answers"] for m in ordered),
        "failed_calls": dict(sorted(failed_calls.items())),
        "retried_attempts": dict(sorted(retried.items())),
    }
    expected = sum(f.rows for f in plan.files)
    accounted = funnel["passages_with_queries"] + funnel["unparsed_answers"] + sum(failed_calls.values())
    if not expected == funnel["passages_in"] == accounted:
        raise RuntimeError(
            f"{STAGE}: {expected} passages in the input, {funnel['passages_in']} in the shards, "
            f"{accounted} accounted for (with queries + unparsed + failed calls); no manifest written"
        )
    counts = {
        "funnel": funnel,
        "requests": sum(m["requests"] for m in ordered),
        "prompt_tokens": sum(m["prompt_tokens"] for m in ordered),
        "completion_tokens": sum(m["completion_tokens"] for m in ordered),
        "shards": len(ordered),
    }
    files = {
        DATA: [m["files"]["data"] for m in ordered],
        FAILED: [m["files"]["failed"] for m in ordered],
    }
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
    log.info(
        "%s: %d passages -> %d queries (%d passages failed, %d unparsed) in %.1f s",
        STAGE,
        funnel["passages_in"],
        funnel["queries_generated"],
        sum(failed_calls.values()),
        funnel["unparsed_answers"],
        time.time() - started,
    )
    return manifest
