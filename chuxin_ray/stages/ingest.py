"""Stage `ingest`: raw corpus files -> cleaned, deduplicated Parquet of {id, text, source}.

    files (jsonl / .gz / .zst / parquet)                          one read task per file
      -> records: one row per source record, bad ones marked      data/records.py
      -> rules: kept rows failing a rule become `dropped`         data/cleaning.py
      -> each block written where it was read: kept rows to       data/, quarantine/, dropped/
         data/, bad records to quarantine/, rule failures to dropped/; one dedup key per kept row
      -> the keys only (32 bytes a row) split by key into partitions     Ray tasks, data/dedup.py
      -> per partition: duplicates found, as (shard, row), split by shard into groups
      -> per group: each shard holding a duplicate rewritten without it
      -> manifest with counts by outcome and reason               only if every row is accounted for

The texts move once, from the reader to their shard: deduplication shuffles 32-byte keys, so the
object store holds a few percent of the corpus, and memory does not grow with it. The two shuffles are
plain Ray tasks (`num_returns` = partitions, as in Ray's shuffle examples), not keyed Ray Data
repartitions: on 2 CPUs a keyed repartition of 1e6 keys in 20 blocks took ~5 s (its aggregator
actors), the same split as tasks ~0.2 s once workers are up; bench/ingest.py at 1e6 records went
from ~53 s to ~26 s with this and 32k-row blocks.
Output: <out>/data/ (kept), <out>/quarantine/ (bad records with reason, file and row, raw bytes),
<out>/dropped/ (rule failures with reason), <out>/_manifest.json.
"""

from __future__ import annotations

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
from chuxin_ray.data.records import SourceFile, detect_format, read_records, source_name
from chuxin_ray.data.shards import write_shard
from chuxin_ray.ray_cluster import available_cpus, connect

log = logging.getLogger(__name__)

STAGE = "ingest"
SUBDIRS = ("data", "quarantine", "dropped")
PARTITION_BYTES = 2**30  # input bytes per key partition when not configured (~100 MB of keys)
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
    tally = FileTally.remote()
    n_bytes = sum(f.size for f in plan.files)
    log.info("%s: %d files, %.1f MB -> %s", STAGE, len(plan.files), n_bytes / 1e6, plan.out.uri)

    ds = ray.data.from_items(
        [{"file": i} for i in range(len(plan.files))], override_num_blocks=len(plan.files)
    )
    keys = ds.map_batches(
        read_and_clean,
        batch_size=1,
        batch_format="pyarrow",
        fn_kwargs={
            "files": plan.files,
            "batch_rows": section.read_batch_rows,
            "rules": section.rules,
            "dedup_mode": section.dedup.normalize if section.dedup.enabled else None,
            "out": plan.out,
            "tally": tally,
        },
    )
    rewrites: list[dict] = []
    if section.dedup.enabled:
        partitions = section.dedup.num_partitions or max(
            available_cpus(), math.ceil(n_bytes / PARTITION_BYTES)
        )
        key_blocks = keys.to_arrow_refs()
        log.info("%s: read, cleaned and written in %.1f s; deduplicating", STAGE, time.time() - started)
        rewrites = drop_duplicates_everywhere(key_blocks, partitions, 2 * available_cpus(), plan.out)
        log.info(
            "%s: %d shards rewritten without %d duplicates (%d key partitions)",
            STAGE,
            len(rewrites),
            sum(r["duplicates"] for r in rewrites),
            partitions,
        )
    else:
        keys.materialize()  # reads, cleans and writes; yields no keys
    counts, files = summarize(ray.get(tally.results.remote()), rewrites)

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


@ray.remote(num_cpus=0)
class FileTally:
    """What each input file became, recorded where it was read: rows read (the independent side of
    the invariant), rows by outcome and reason, and the shards written. Keyed by file, so a retried
    read task replaces its entry rather than adding to it (and its shards have the same names)."""

    def __init__(self):
        self.files: dict[str, dict] = {}

    def record(self, uri: str, result: dict) -> None:
        self.files[uri] = result

    def results(self) -> list[dict]:
        return list(self.files.values())


def shard_id(file_index: int, block: int) -> int:
    return (file_index << 24) + block


def shard_name(shard: int, suffix: str = "") -> str:
    """Shards are named by the file and block they come from, so a retried read task rewrites the
    same files rather than adding new ones."""
    return f"part-{shard >> 24:06d}-{shard & 0xFFFFFF:06d}{suffix}"


DEDUPED = "-dedup"  # the rewrite of a shard without its duplicates


def read_and_clean(
    batch: pa.Table, files: list[SourceFile], batch_rows: int, rules, dedup_mode: str | None, out, tally
):
    """Read whole files, clean them and write every block's rows where they belong; yield one dedup
    key per kept row (nothing when dedup is off). Records what each file became in `tally`."""
    rule_set = RuleSet(rules)
    for index in batch.column("file").to_pylist():
        file = files[index]
        result = {"read": 0, "outcomes": Counter(), "files": []}
        for block, records in enumerate(read_records(file, batch_rows)):
            shard = shard_id(file.index, block)
            kept = write_block(out, apply_rules(records, rule_set), shard, result)
            if dedup_mode is not None:
                yield dedup.key_table(kept.column("text"), kept.column("order").to_numpy(), shard, dedup_mode)
        result["outcomes"] = [[o, r, n] for (o, r), n in result["outcomes"].items()]
        ray.get(tally.record.remote(file.uri, result))


OUTPUTS = (  # outcome, folder, columns
    ("kept", "data", DATA_COLUMNS),
    ("quarantined", "quarantine", QUARANTINE_COLUMNS),
    ("dropped", "dropped", DROPPED_COLUMNS),
)


def write_block(out: storage.Location, records: pa.Table, shard: int, result: dict) -> pa.Table:
    """Write a block's rows by outcome, each to a shard named after `shard`; adds to `result` what
    was read and written. Returns the kept rows (all RECORD_SCHEMA columns, in shard order)."""
    result["read"] += records.num_rows
    outcome = records.column("outcome")
    parts = {name: records.filter(pc.equal(outcome, name)) for name, _, _ in OUTPUTS}
    for name, folder, columns in OUTPUTS:
        part = parts[name]
        if name == "kept":  # kept rows have no reason: count them without a Python pass
            result["outcomes"][name, ""] += part.num_rows
        else:
            result["outcomes"].update((name, reason) for reason in part.column("reason").to_pylist())
        if part.num_rows:
            rel = write_shard(out, folder, part.select(columns), name=shard_name(shard))
            result["files"].append([folder, rel, part.num_rows, shard])
    return parts["kept"]


REWRITE_SCHEMA = pa.schema(
    [("shard", pa.int64()), ("path", pa.string()), ("rows", pa.int64()), ("duplicates", pa.int64())]
)


def drop_duplicates_everywhere(
    key_blocks: list[ray.ObjectRef], partitions: int, groups: int, out: storage.Location
) -> list[dict]:
    """Find the duplicates among every kept row's key and rewrite the shards that hold them. Returns
    REWRITE_SCHEMA rows. Each task holds one block, one partition of keys or one group of duplicates;
    a failed task is retried by Ray and each step is idempotent."""
    by_block = [as_list(split_keys.options(num_returns=partitions).remote(b, partitions)) for b in key_blocks]
    by_partition = [
        as_list(
            duplicates_in_partition.options(num_returns=groups).remote(
                groups, *[parts[i] for parts in by_block]
            )
        )
        for i in range(partitions)
    ]
    written = ray.get(
        [rewrite_group.remote(out, *[parts[j] for parts in by_partition]) for j in range(groups)]
    )
    return pa.concat_tables(written).to_pylist()


def as_list(refs: ray.ObjectRef | list[ray.ObjectRef]) -> list[ray.ObjectRef]:
    """What `.remote()` gives for num_returns = n, as a list also when n = 1."""
    return refs if isinstance(refs, list) else [refs]


def one_or_tuple(tables: list[pa.Table]) -> pa.Table | tuple[pa.Table, ...]:
    """A task's return value for num_returns = len(tables)."""
    return tables[0] if len(tables) == 1 else tuple(tables)


@ray.remote
def split_keys(keys: pa.Table, partitions: int):
    return one_or_tuple(dedup.split_by(keys, dedup.KEY, partitions))


@ray.remote
def duplicates_in_partition(groups: int, *parts: pa.Table):
    """Every copy of a key is in this partition, so its duplicates are global; split by shard group."""
    keys = pa.concat_tables(parts) if parts else dedup.KEY_SCHEMA.empty_table()
    return one_or_tuple(dedup.split_by(dedup.find_duplicates(keys), dedup.SHARD, groups))


@ray.remote
def rewrite_group(out: storage.Location, *parts: pa.Table) -> pa.Table:
    """Every duplicate of this group's shards: rewrite those shards."""
    return drop_duplicates(pa.concat_tables(parts), out)


def drop_duplicates(rows: pa.Table, out: storage.Location) -> pa.Table:
    """(shard, pos) of duplicates, every one of their shards in this call: rewrite each such data
    shard without them. Returns REWRITE_SCHEMA rows: the shard, its new path ("" when nothing is
    left), rows left and rows dropped."""
    if rows.num_rows == 0:
        return REWRITE_SCHEMA.empty_table()
    shards = rows.column(dedup.SHARD).to_numpy()  # (D,)
    positions = rows.column(dedup.POS).to_numpy()  # (D,)
    by_shard = np.argsort(shards, kind="stable")
    ids, starts = np.unique(shards[by_shard], return_index=True)
    written: dict[str, list] = {name: [] for name in REWRITE_SCHEMA.names}
    for shard, pos in zip(ids.tolist(), np.split(positions[by_shard], starts[1:]), strict=True):
        path, left = rewrite_shard(out, shard, pos)
        for name, value in zip(REWRITE_SCHEMA.names, (shard, path, left, len(pos)), strict=True):
            written[name].append(value)
    return pa.table(written, schema=REWRITE_SCHEMA)


def rewrite_shard(out: storage.Location, shard: int, positions: np.ndarray) -> tuple[str, int]:
    """Write data shard `shard` again without the rows at `positions`, then delete the original.
    Idempotent, so a retried task ends in the same state: a rewrite that exists is not redone."""
    original = out.child("data", shard_name(shard) + ".parquet")
    rel = f"data/{shard_name(shard, DEDUPED)}.parquet"
    if storage.exists(out.child(rel)):
        with out.fs.open_input_file(out.child(rel).path) as f:
            left = pq.ParquetFile(f).metadata.num_rows
    elif storage.exists(original):
        with out.fs.open_input_file(original.path) as f:
            table = dedup.drop_rows(pq.read_table(f), positions)
        left = table.num_rows
        if left:
            write_shard(out, "data", table, name=shard_name(shard, DEDUPED))
    else:  # rewritten to nothing by an earlier attempt of this task
        left = 0
    if storage.exists(original):
        out.fs.delete_file(original.path)
    return (rel if left else ""), left


def summarize(results: list[dict], rewrites: list[dict]) -> tuple[dict, dict]:
    """Counts by outcome and reason plus the file lists, from what each file became and which
    shards lost duplicates; checks rows read = rows accounted for, and that the rows in the data
    files are the kept rows less the duplicates."""
    outcomes: dict[str, Counter] = {"kept": Counter(), "dropped": Counter(), "quarantined": Counter()}
    files: dict[str, list] = {"data": [], "quarantine": [], "dropped": []}
    rewritten = {r["shard"]: r for r in rewrites}
    for result in results:
        for outcome, reason, rows in result["outcomes"]:
            outcomes[outcome][reason] += rows
        for folder, path, rows, shard in result["files"]:
            if folder == "data" and shard in rewritten:
                path, rows = rewritten[shard]["path"], rewritten[shard]["rows"]
            if rows:
                files[folder].append({"path": path, "rows": rows})
    counts = {
        "read": sum(r["read"] for r in results),
        "kept": sum(f["rows"] for f in files["data"]),
        "dropped": dict(sorted(outcomes["dropped"].items())),
        "duplicates": sum(r["duplicates"] for r in rewrites),
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
    if counts["kept"] != outcomes["kept"][""] - counts["duplicates"]:
        raise RuntimeError(
            f"{STAGE}: the data files hold {counts['kept']} rows, not the {outcomes['kept']['']} kept "
            f"less {counts['duplicates']} duplicates; no manifest written"
        )
    for name in files:
        files[name].sort(key=lambda f: f["path"])
    return counts, files
