"""Stage `ingest`: raw corpus files -> cleaned, deduplicated Parquet of {id, text, source}.

    files (jsonl / .gz / .zst / parquet)                       one read task per file
      -> records: one row per source record, bad ones marked   data/records.py
      -> rules: kept rows failing a rule become `dropped`      data/cleaning.py
      -> hash shuffle on the normalised-text hash              repartition(keys=[dedup_key])
      -> per partition: duplicates marked, shards written      data/dedup.py, data/shards.py
      -> manifest with counts by outcome and reason            only if every row is accounted for

Output: <out>/data/ (kept), <out>/quarantine/ (bad records with reason, file and row, raw bytes),
<out>/dropped/ (rule failures with reason), <out>/_manifest.json.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
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
PARTITION_BYTES = 64 * 2**20  # input bytes per dedup partition when not configured
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
    tally = ReadTally.remote()
    n_bytes = sum(f.size for f in plan.files)
    log.info("%s: %d files, %.1f MB -> %s", STAGE, len(plan.files), n_bytes / 1e6, plan.out.uri)

    ds = ray.data.from_items(
        [{"file": i} for i in range(len(plan.files))], override_num_blocks=len(plan.files)
    )
    ds = ds.map_batches(
        read_files,
        batch_size=1,
        batch_format="pyarrow",
        fn_kwargs={"files": plan.files, "batch_rows": section.read_batch_rows, "tally": tally},
    )
    ds = ds.map_batches(
        clean,
        batch_format="pyarrow",
        batch_size=None,
        fn_kwargs={"rules": section.rules, "dedup_mode": section.dedup.normalize},
    )
    if section.dedup.enabled:
        partitions = section.dedup.num_partitions or max(
            available_cpus(), math.ceil(n_bytes / PARTITION_BYTES)
        )
        # As Ray's own GroupedData.map_groups: after a keyed repartition, a map_batches call with
        # batch_size=None sees one whole partition, so every copy of a text is in the same call.
        ds = ds.repartition(partitions, keys=[dedup.KEY])
    summary = ds.map_batches(
        finish_partition,
        batch_format="pyarrow",
        batch_size=None,
        fn_kwargs={"out": plan.out, "dedup_enabled": section.dedup.enabled},
    ).take_all()

    counts, files = summarize(summary, read=ray.get(tally.total.remote()))
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
class ReadTally:
    """Records read per file, counted where they are read: the independent side of the invariant.
    Keyed by file, so a retried read task overwrites rather than adds."""

    def __init__(self):
        self.rows: dict[str, int] = {}

    def record(self, uri: str, rows: int) -> None:
        self.rows[uri] = rows

    def total(self) -> int:
        return sum(self.rows.values())


def read_files(batch: pa.Table, files: list[SourceFile], batch_rows: int, tally):
    for index in batch.column("file").to_pylist():
        file = files[index]
        rows = 0
        for table in read_records(file, batch_rows):
            rows += table.num_rows
            yield table
        ray.get(tally.record.remote(file.uri, rows))


def clean(table: pa.Table, rules, dedup_mode: str) -> pa.Table:
    return dedup.add_dedup_key(apply_rules(table, RuleSet(rules)), dedup_mode)


def finish_partition(table: pa.Table, out: storage.Location, dedup_enabled: bool) -> pa.Table:
    """Mark duplicates in one hash partition, write its shards, return what was written."""
    table = dedup.mark_duplicates(table) if dedup_enabled else table.drop_columns([dedup.KEY, dedup.KEY_LOW])
    outcome = table.column("outcome")
    summary: dict[str, list] = {"outcome": [], "reason": [], "rows": [], "file": []}

    def add(outcome_, reason, rows, file=""):
        for key, value in zip(summary, (outcome_, reason, rows, file), strict=True):
            summary[key].append(value)

    for name, folder, columns in (
        ("kept", "data", DATA_COLUMNS),
        ("quarantined", "quarantine", QUARANTINE_COLUMNS),
        ("dropped", "dropped", DROPPED_COLUMNS),
    ):
        part = table.filter(pc.equal(outcome, name)).select(columns)
        if part.num_rows:
            add(name, "", part.num_rows, write_shard(out, folder, part))
    for (name, reason), rows in Counter(
        zip(outcome.to_pylist(), table.column("reason").to_pylist(), strict=True)
    ).items():
        add(name, reason, rows)
    return pa.table(
        summary,
        schema=pa.schema(
            [("outcome", pa.string()), ("reason", pa.string()), ("rows", pa.int64()), ("file", pa.string())]
        ),
    )


def summarize(summary: list[dict], read: int) -> tuple[dict, dict]:
    """Counts by outcome and reason plus the file lists; checks rows read = rows accounted for."""
    by_reason: dict[str, Counter] = {
        "kept": Counter(),
        "dropped": Counter(),
        "duplicate": Counter(),
        "quarantined": Counter(),
    }
    files: dict[str, list] = {"data": [], "quarantine": [], "dropped": []}
    folder = {"kept": "data", "quarantined": "quarantine", "dropped": "dropped"}
    for row in summary:
        if row["file"]:
            files[folder[row["outcome"]]].append({"path": row["file"], "rows": row["rows"]})
        else:
            by_reason[row["outcome"]][row["reason"]] += row["rows"]
    counts = {
        "read": read,
        "kept": sum(by_reason["kept"].values()),
        "dropped": dict(sorted(by_reason["dropped"].items())),
        "duplicates": sum(by_reason["duplicate"].values()),
        "quarantined": dict(sorted(by_reason["quarantined"].items())),
    }
    accounted = (
        counts["kept"]
        + sum(counts["dropped"].values())
        + counts["duplicates"]
        + sum(counts["quarantined"].values())
    )
    if accounted != read:
        raise RuntimeError(
            f"{STAGE}: {read} records read but {accounted} accounted for "
            f"(kept + dropped + duplicates + quarantined); no manifest written"
        )
    for name in files:
        files[name].sort(key=lambda f: f["path"])
    return counts, files
