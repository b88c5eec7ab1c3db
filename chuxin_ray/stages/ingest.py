"""Stage `ingest`: raw corpus files -> cleaned, deduplicated Parquet of {id, text, source}.

    files (jsonl / .gz / .zst / parquet)                          one read task per file
      -> records: one row per source record, bad ones marked      data/records.py
      -> rules: kept rows failing a rule become `dropped`         data/cleaning.py
      -> claims: each kept text's dedup key claimed stage-wide;   data/key_claims.py, one actor
         rows whose text an earlier copy owns become `duplicate`  per key partition
      -> each block written where it was read: kept rows to       data/, quarantine/, dropped/
         data/, bad records to quarantine/, rule failures to dropped/
      -> when every block is in: the few shards holding a copy    Ray tasks
         that lost its key to an earlier copy rewritten without it
      -> manifest with counts by outcome and reason               only if every row is accounted for

Deduplication is decided while the corpus streams: a block asks the claim actors (each holds one
hash partition of the keys, 32 bytes a slot) which of its texts it owns before it writes, and the
lowest `order` (first file, first row) owns each text. The texts move once, from the reader to their
shard; only blocks that ran ahead of an earlier copy of one of their texts are written twice. With
blocks read roughly in corpus order that is rare, where a keyed shuffle of every key and a rewrite of
every shard holding a duplicate (this stage's previous design) wrote nearly every shard twice.
Claims are idempotent, so a retried read task writes what its first attempt wrote; if a claim actor
dies the stage fails and a rerun starts over.
Output: <out>/data/ (kept), <out>/quarantine/ (bad records with reason, file and row, raw bytes),
<out>/dropped/ (rule failures with reason), <out>/_manifest.json.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from chuxin_ray import storage
from chuxin_ray.config import Config, ConfigError, IngestConfig
from chuxin_ray.data import dedup
from chuxin_ray.data.cleaning import RuleSet, apply_rules
from chuxin_ray.data.key_claims import Displaced, KeyClaims
from chuxin_ray.data.records import SourceFile, detect_format, read_records, source_name
from chuxin_ray.data.shards import write_shard
from chuxin_ray.ray_cluster import available_cpus, connect

log = logging.getLogger(__name__)

STAGE = "ingest"
SUBDIRS = ("data", "quarantine", "dropped")
PARTITION_BYTES = 2**30  # input bytes per key partition when not configured (~3e6 texts, ~200 MB of claims)
DATA_COLUMNS = ["id", "text", "source"]
QUARANTINE_COLUMNS = ["source", "path", "row", "reason", "raw"]
DROPPED_COLUMNS = ["id", "text", "source", "path", "row", "reason"]


@dataclass
class IngestPlan:
    cfg: IngestConfig
    out: storage.Location
    files: list[SourceFile]
    config_hash: str
    manifest: dict | None  # set when the output is already complete: nothing to do


def setup(cfg: Config, force: bool = False) -> IngestPlan:
    """Everything that can fail without Ray: the config, the input listing, the output state."""
    section: IngestConfig = cfg.require(STAGE)
    out = storage.resolve(cfg.stage_output(STAGE), cfg.storage)
    config_hash = cfg.hash(STAGE)
    manifest = storage.begin_stage(STAGE, out, config_hash, force, SUBDIRS)
    files = [] if manifest else list_inputs(section, cfg)
    return IngestPlan(section, out, files, config_hash, manifest)


def list_inputs(section: IngestConfig, cfg: Config) -> list[SourceFile]:
    files = []
    for i, spec in enumerate(section.inputs):
        loc = storage.resolve(spec.uri, cfg.storage)
        found = []
        for info in storage.list_files(loc):
            fmt = detect_format(info.path) if spec.format == "auto" else spec.format
            if fmt is not None:
                found.append((info, fmt))
        if not found:
            raise ConfigError(f"ingest.inputs.{i}.uri: no jsonl(.gz/.zst) or parquet files at {loc.uri}")
        for info, fmt in found:
            files.append(
                SourceFile(
                    fs=loc.fs,
                    path=info.path,
                    uri=loc.uri_of(info.path),
                    format=fmt,
                    source=spec.source or source_name(spec.uri),
                    text_field=spec.fields.text,
                    id_field=spec.fields.id,
                    index=len(files),
                    size=info.size or 0,
                )
            )
    return files


def run(plan: IngestPlan, cfg: Config) -> dict:
    if plan.manifest is not None:
        return storage.report_complete(STAGE, plan.out, plan.manifest)
    started = time.time()
    connect(cfg.ray)
    section = plan.cfg
    n_bytes = sum(f.size for f in plan.files)
    log.info("%s: %d files, %.1f MB -> %s", STAGE, len(plan.files), n_bytes / 1e6, plan.out.uri)

    claims = None
    if section.dedup.enabled:
        partitions = section.dedup.num_partitions or max(
            available_cpus(), math.ceil(n_bytes / PARTITION_BYTES)
        )
        claims = [KeyClaims.options(scheduling_strategy="SPREAD").remote() for _ in range(partitions)]
    per_file = ray.data.from_items(
        [{"file": i} for i in range(len(plan.files))], override_num_blocks=len(plan.files)
    ).map_batches(
        read_and_clean,
        batch_size=1,
        batch_format="pyarrow",
        fn_kwargs={
            "files": plan.files,
            "batch_rows": section.read_batch_rows,
            "rules": section.rules,
            "dedup_mode": section.dedup.normalize,
            "claims": claims,
            "out": plan.out,
        },
    )
    results = [json.loads(row["result"]) for row in per_file.take_all()]  # reads, cleans, claims, writes
    rewrites: list[dict] = []
    if claims is not None:
        displaced = Displaced.concat(ray.get([c.all_displaced.remote() for c in claims]))
        log.info(
            "%s: read, cleaned and written in %.1f s; %d copies displaced by earlier ones",
            STAGE,
            time.time() - started,
            len(displaced.shard),
        )
        rewrites = drop_displaced(displaced, 2 * available_cpus(), plan.out, section.dedup.normalize)
        log.info(
            "%s: %d shards rewritten without their displaced copies (%d key partitions)",
            STAGE,
            len(rewrites),
            len(claims),
        )
    counts, files = summarize(results, rewrites)

    manifest = storage.stage_manifest(
        STAGE,
        plan.config_hash,
        cfg.redacted()[STAGE],
        inputs=[{"uri": f.uri, "bytes": f.size, "format": f.format, "source": f.source} for f in plan.files],
        counts=counts,
        files=files,
        started=started,
    )
    storage.write_manifest(plan.out, manifest)
    elapsed = max(time.time() - started, 1e-9)
    log.info(
        "%s: read %d records (%.1f MB) in %.1f s: %.0f records/s, %.1f MB/s; kept %d, dropped %d, "
        "duplicates %d, quarantined %d",
        STAGE,
        counts["read"],
        n_bytes / 1e6,
        elapsed,
        counts["read"] / elapsed,
        n_bytes / 1e6 / elapsed,
        counts["kept"],
        sum(counts["dropped"].values()),
        counts["duplicates"],
        sum(counts["quarantined"].values()),
    )
    return manifest


def main(cfg: Config, force: bool = False) -> dict:
    return run(setup(cfg, force), cfg)


# --------------------------------------------------------------------------------------------------
# Ray Data steps (module-level functions: they are pickled into tasks)
# --------------------------------------------------------------------------------------------------


def shard_id(file_index: int, block: int) -> int:
    return (file_index << 24) + block


def shard_name(shard: int, suffix: str = "") -> str:
    """Shards are named by the file and block they come from, so a retried read task rewrites the
    same files rather than adding new ones."""
    return f"part-{shard >> 24:06d}-{shard & 0xFFFFFF:06d}{suffix}"


DEDUPED = "-dedup"  # the rewrite of a shard without its displaced copies
DUPLICATE = "duplicate"  # the outcome of a kept row whose text an earlier copy owns


def read_and_clean(
    batch: pa.Table,
    files: list[SourceFile],
    batch_rows: int,
    rules,
    dedup_mode: str,
    claims: list | None,
    out: storage.Location,
):
    """Read whole files, clean them, claim their texts (when deduplicating) and write every block's
    rows where they belong. Yields one row per file: what it became (rows read, the independent side
    of the invariant; rows by outcome and reason; the shards written), as JSON. A retried task's
    shards have the same names, and Ray Data keeps the rows of one attempt only."""
    rule_set = RuleSet(rules)
    for index in batch.column("file").to_pylist():
        file = files[index]
        result = {"read": 0, "outcomes": Counter(), "files": []}
        for block, records in enumerate(read_records(file, batch_rows)):
            shard = shard_id(file.index, block)
            records = apply_rules(records, rule_set)
            if claims is not None:
                records = mark_duplicates(records, claims, shard, dedup_mode)
            write_block(out, records, shard, result)
        result["outcomes"] = [[o, r, n] for (o, r), n in result["outcomes"].items()]
        yield pa.table({"file": [file.uri], "result": [json.dumps(result)]})


def mark_duplicates(records: pa.Table, claims: list, shard: int, mode: str) -> pa.Table:
    """Kept rows whose text an earlier copy owns become `duplicate`: copies within the block, then
    the block's first copies claimed from the partitions their keys hash to."""
    outcome = records.column("outcome")
    kept = np.flatnonzero(pc.equal(outcome, "kept").to_numpy(zero_copy_only=False))  # (k,)
    if not len(kept):
        return records
    texts = records.column("text").take(pa.array(kept)).combine_chunks()
    keys = dedup.text_hashes(texts, mode)  # (k, 2)
    order = records.column("order").to_numpy()[kept]  # (k,) ascending: the block is in file order
    owned = np.zeros(len(kept), dtype=bool)  # (k,)
    first = dedup.first_copies(keys)  # (f,) the first copy of each key in the block
    part = dedup.partition_of(keys[first, 0], len(claims))  # (f,)
    asked = []  # (rows, the partition's answer): every partition asked before any answer is awaited
    for p in np.unique(part).tolist():
        rows = first[part == p]
        asked.append((rows, claims[p].claim.remote(keys[rows, 0], keys[rows, 1], order[rows], shard)))
    for rows, answer in asked:
        owned[rows] = ray.get(answer)
    duplicate = np.zeros(records.num_rows, dtype=bool)
    duplicate[kept[~owned]] = True
    return records.set_column(
        records.schema.get_field_index("outcome"),
        "outcome",
        pc.if_else(pa.array(duplicate), pa.scalar(DUPLICATE), outcome),
    )


OUTPUTS = (  # outcome, folder, columns
    ("kept", "data", DATA_COLUMNS),
    ("quarantined", "quarantine", QUARANTINE_COLUMNS),
    ("dropped", "dropped", DROPPED_COLUMNS),
)


def write_block(out: storage.Location, records: pa.Table, shard: int, result: dict) -> None:
    """Write a block's rows by outcome, each to a shard named after `shard`; adds to `result` what
    was read, written and found duplicate."""
    result["read"] += records.num_rows
    outcome = records.column("outcome")
    duplicates = pc.sum(pc.equal(outcome, DUPLICATE)).as_py() or 0
    result["outcomes"][DUPLICATE, ""] += duplicates
    for name, folder, columns in OUTPUTS:
        part = records.filter(pc.equal(outcome, name))
        if name == "kept":  # kept rows have no reason: count them without a Python pass
            result["outcomes"][name, ""] += part.num_rows
        else:
            result["outcomes"].update((name, reason) for reason in part.column("reason").to_pylist())
        if part.num_rows:
            rel = write_shard(out, folder, part.select(columns), name=shard_name(shard))
            result["files"].append([folder, rel, part.num_rows, shard])
        elif name == "kept" and duplicates:
            # every kept row is a copy now; an earlier attempt of this task may have written some
            storage.delete_if_exists(out.child(folder, shard_name(shard) + ".parquet"))


REWRITE_SCHEMA = pa.schema(
    [("shard", pa.int64()), ("path", pa.string()), ("rows", pa.int64()), ("displaced", pa.int64())]
)


def drop_displaced(displaced: Displaced, groups: int, out: storage.Location, mode: str) -> list[dict]:
    """Rewrite every shard that holds a displaced copy without it, `groups` tasks at most. Returns
    REWRITE_SCHEMA rows. A failed task is retried by Ray, and a rewrite is idempotent."""
    shard, high, low = displaced.shard, displaced.high, displaced.low  # (m,) each
    shards = np.unique(shard)
    tasks = []
    for group in range(min(groups, len(shards))):
        mine = np.isin(shard, shards[group::groups])  # (m,)
        tasks.append(rewrite_shards.remote(out, mode, shard[mine], high[mine], low[mine]))
    return pa.concat_tables(ray.get(tasks)).to_pylist() if tasks else []


@ray.remote
def rewrite_shards(out: storage.Location, mode: str, shard: np.ndarray, high: np.ndarray, low: np.ndarray):
    """Each shard in `shard` rewritten without its copies whose keys are (high, low): REWRITE_SCHEMA."""
    written: dict[str, list] = {name: [] for name in REWRITE_SCHEMA.names}
    for s in np.unique(shard).tolist():
        of = shard == s
        gone = set(zip(high[of].tolist(), low[of].tolist(), strict=True))
        path, left = rewrite_shard(out, s, gone, mode)
        for name, value in zip(REWRITE_SCHEMA.names, (s, path, left, len(gone)), strict=True):
            written[name].append(value)
    return pa.table(written, schema=REWRITE_SCHEMA)


def rewrite_shard(
    out: storage.Location, shard: int, gone: set[tuple[int, int]], mode: str
) -> tuple[str, int]:
    """Data shard `shard` without the rows whose dedup keys are in `gone`: its path ("" when
    nothing is left) and rows. A rewrite goes to a new name and then the original is deleted, so a
    retried call ends in the same state; a shard that loses nothing is left as it is (a retried read
    task may have written it without the copy already)."""
    original = out.child("data", shard_name(shard) + ".parquet")
    rel = f"data/{shard_name(shard, DEDUPED)}.parquet"
    if storage.exists(out.child(rel)):
        with out.fs.open_input_file(out.child(rel).path) as f:
            left = pq.ParquetFile(f).metadata.num_rows
    elif storage.exists(original):
        with out.fs.open_input_file(original.path) as f:
            table = pq.read_table(f)
        keys = dedup.text_hashes(table.column("text").combine_chunks(), mode)  # (n, 2)
        keep = np.array([key not in gone for key in map(tuple, keys.tolist())], dtype=bool)  # (n,)
        if keep.all():
            return f"data/{shard_name(shard)}.parquet", table.num_rows
        table = table.filter(pa.array(keep))
        left = table.num_rows
        if left:
            write_shard(out, "data", table, name=shard_name(shard, DEDUPED))
    else:  # rewritten to nothing by an earlier attempt, or all copies (write_block deleted it)
        left = 0
    storage.delete_if_exists(original)
    return (rel if left else ""), left


def summarize(results: list[dict], rewrites: list[dict]) -> tuple[dict, dict]:
    """Counts by outcome and reason plus the file lists, from what each file became and which
    shards were rewritten without displaced copies; checks rows read = rows accounted for, and that
    no rewrite dropped more rows than it had copies to drop."""
    outcomes: dict[str, Counter] = {name: Counter() for name in ("kept", "dropped", "quarantined", DUPLICATE)}
    files: dict[str, list] = {"data": [], "quarantine": [], "dropped": []}
    rewritten = {r["shard"]: r for r in rewrites}
    for result in results:
        for outcome, reason, rows in result["outcomes"]:
            outcomes[outcome][reason] += rows
        for folder, path, rows, shard in result["files"]:
            if folder == "data" and shard in rewritten:
                rewrite = rewritten[shard]
                lost = rows - rewrite["rows"]
                if not 0 <= lost <= rewrite["displaced"]:
                    raise RuntimeError(
                        f"{STAGE}: {path} held {rows} rows and was rewritten with {rewrite['rows']}, "
                        f"but had {rewrite['displaced']} displaced copies to drop; no manifest written"
                    )
                outcomes[DUPLICATE][""] += lost
                path, rows = rewrite["path"], rewrite["rows"]
            if rows:
                files[folder].append({"path": path, "rows": rows})
    counts = {
        "read": sum(r["read"] for r in results),
        "kept": sum(f["rows"] for f in files["data"]),
        "dropped": dict(sorted(outcomes["dropped"].items())),
        "duplicates": outcomes[DUPLICATE][""],
        "quarantined": dict(sorted(outcomes["quarantined"].items())),
    }
    accounted = (
        counts["kept"]
        + sum(counts["dropped"].values())
        + counts["duplicates"]
        + sum(counts["quarantined"].values())
    )
    if accounted != counts["read"]:
        raise RuntimeError(
            f"{STAGE}: {counts['read']} records read but {accounted} accounted for "
            f"(kept + dropped + duplicates + quarantined); no manifest written"
        )
    for name in files:
        files[name].sort(key=lambda f: f["path"])
    return counts, files
