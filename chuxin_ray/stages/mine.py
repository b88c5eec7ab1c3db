"""Stage `mine`: hard negatives for each kept query -> FlagEmbedding training jsonl with provenance.

    corpus (ingest output) and queries (judge output), each cut into row ranges
      -> encoder actors (Ray Data, batched; GPU when runtime.num_gpus > 0): CLS vector, L2-normalised
         -> embeddings/corpus/shard-NNNNN.parquet {row, id, text, embedding}
         -> embeddings/queries/shard-NNNNN.parquet {query_id, passage_id, query, passage, source, embedding}
      -> one search task per query shard: exact top-`range_end` inner products, the corpus streamed
         shard by shard in row order (retrieval/topk.py: ties go to the lower row)
      -> candidates = ranks [range_start, range_end), positives removed BY ID; `negative_number`
         sampled (seeded per query); too few left and fill_random: random passages, as hn_mine does
      -> data/part-NNNNN.jsonl {query, pos, neg, query_id, pos_ids, neg_ids, neg_ranks, source}

FlagEmbedding's scripts/hn_mine.py is the reference: range_for_sampling 10-210, negative_number 15.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import random
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import torch

from chuxin_ray import storage
from chuxin_ray.config import Config, ConfigError, EncoderRuntime, MineConfig, StorageConfig
from chuxin_ray.data.row_ranges import InputFile, RowRange, plan_ranges, read_range, stage_inputs
from chuxin_ray.data.shards import write_parquet
from chuxin_ray.llm.model_files import encoder_actors, inference_device
from chuxin_ray.models.encoder import Encoder
from chuxin_ray.ray_cluster import connect
from chuxin_ray.retrieval.faiss_search import check_index_spec, search_faiss
from chuxin_ray.retrieval.topk import search_exact

log = logging.getLogger(__name__)

STAGE = "mine"
SUBDIRS = ("data", "embeddings")
CORPUS, QUERIES = "corpus", "queries"
QUERY_COLUMNS = ["query_id", "passage_id", "query", "passage", "source"]


@dataclass
class MinePlan:
    cfg: MineConfig
    queries: storage.Location
    corpus: storage.Location
    out: storage.Location
    query_files: list[InputFile]
    corpus_files: list[InputFile]
    upstream: dict
    config_hash: str
    manifest: dict | None
    encoder: str = ""


def setup(cfg: Config, force: bool = False) -> MinePlan:
    section: MineConfig = cfg.require(STAGE)
    out = storage.resolve(cfg.stage_output(STAGE), cfg.storage)
    config_hash = cfg.hash(STAGE)
    queries = storage.resolve(section.input or cfg.stage_output("judge"), cfg.storage)
    corpus = storage.resolve(section.corpus or cfg.stage_output("ingest"), cfg.storage)
    manifest = storage.begin_stage(STAGE, out, config_hash, force, SUBDIRS)
    if manifest is not None:
        return MinePlan(section, queries, corpus, out, [], [], {}, config_hash, manifest)
    if section.search == "faiss":  # before any Ray work: faiss installed, the index string valid
        check_index_spec(section.faiss_index, f"{STAGE}.faiss_index")
    query_files = stage_inputs(queries, f"{STAGE}.input")
    corpus_files = stage_inputs(corpus, f"{STAGE}.corpus")
    upstream = (storage.read_manifest(queries) or {}).get("counts", {}).get("funnel", {})
    encoder = section.encoder or default_encoder(cfg)
    return MinePlan(
        section, queries, corpus, out, query_files, corpus_files, upstream, config_hash, None, encoder
    )


def default_encoder(cfg: Config) -> str:
    """The finetune stage's model when its output is complete (a second mining round with the finetuned
    encoder, as the recipe's refinement data was mined), else the pretrain stage's encoder."""
    if cfg.finetune is not None:
        finetuned = storage.resolve(cfg.stage_output("finetune"), cfg.storage)
        if storage.read_manifest(finetuned) is not None:
            return finetuned.child("model").uri
    if cfg.pretrain is not None:
        return storage.resolve(cfg.stage_output("pretrain"), cfg.storage).child("encoder_model").uri
    raise ConfigError(
        f"{STAGE}.encoder: not set, and the config has no finetune or pretrain stage to take it from"
    )


def run(plan: MinePlan, cfg: Config) -> dict:
    if plan.manifest is not None:
        return storage.report_complete(STAGE, plan.out, plan.manifest)
    started = time.time()
    connect(cfg.ray)
    section = plan.cfg
    corpus_ranges = plan_ranges(plan.corpus_files, section.corpus_shard_rows)
    query_ranges = plan_ranges(plan.query_files, section.query_shard_rows)
    n_corpus = sum(f.rows for f in plan.corpus_files)
    if n_corpus == 0:
        raise RuntimeError(f"{STAGE}: the corpus at {plan.corpus.uri} is empty")

    embedded = embed_all(plan, cfg, corpus_ranges, query_ranges)
    t_embed = time.time() - started
    corpus_paths = [embedded[(CORPUS, r.shard)] for r in corpus_ranges]  # row order: ties stay stable
    rt = section.runtime
    search = ray.remote(search_shard).options(num_cpus=rt.num_cpus, num_gpus=rt.num_gpus)
    results = ray.get(
        [
            search.remote(plan.out, embedded[(QUERIES, r.shard)], corpus_paths, n_corpus, section, r.name)
            for r in query_ranges
        ]
    )
    counts = summarize(results, plan)
    counts["seconds"] = {
        "embed": round(t_embed, 3),
        "search_and_sample": round(time.time() - started - t_embed, 3),
    }
    files = {"data": [{"path": r["path"], "rows": r["queries"]} for r in results if r["path"]]}
    manifest = storage.stage_manifest(
        STAGE,
        plan.config_hash,
        cfg.redacted()[STAGE],
        inputs=[plan.queries.uri, plan.corpus.uri, plan.encoder],
        counts=counts,
        files=files,
        started=started,
    )
    storage.write_manifest(plan.out, manifest)
    elapsed = max(time.time() - started, 1e-9)
    log.info(
        "%s: %d queries x %d passages -> %d negatives in %.1f s (%.0f queries/s)",
        STAGE,
        counts["funnel"]["queries_mined"],
        n_corpus,
        counts["funnel"]["negatives_mined"],
        elapsed,
        counts["funnel"]["queries_mined"] / elapsed,
    )
    return manifest


def main(cfg: Config, force: bool = False) -> dict:
    return run(setup(cfg, force), cfg)


# --------------------------------------------------------------------------------------------------
# Embedding: an encoder actor per GPU (or CPU slot), one shard per call
# --------------------------------------------------------------------------------------------------


def embed_all(
    plan: MinePlan, cfg: Config, corpus_ranges: list[RowRange], query_ranges: list[RowRange]
) -> dict:
    section, rt = plan.cfg, plan.cfg.runtime
    jobs = [{"kind": CORPUS, "shard": r.shard} for r in corpus_ranges]
    jobs += [{"kind": QUERIES, "shard": r.shard} for r in query_ranges]
    ds = ray.data.from_items(jobs, override_num_blocks=len(jobs))
    summary = ds.map_batches(
        EmbedShards,
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=rt.num_cpus,
        num_gpus=rt.num_gpus,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=encoder_actors(rt, len(jobs))),
        fn_constructor_kwargs={"model": plan.encoder, "storage_cfg": cfg.storage, "runtime": rt},
        fn_kwargs={
            "out": plan.out,
            "ranges": {CORPUS: (plan.corpus.fs, corpus_ranges), QUERIES: (plan.queries.fs, query_ranges)},
            "section": section,
        },
    ).take_all()
    return {(row["kind"], row["shard"]): row["path"] for row in summary}


class EmbedShards:
    def __init__(self, model: str, storage_cfg: StorageConfig, runtime: EncoderRuntime):
        torch.set_num_threads(max(1, round(runtime.num_cpus)))
        self.encoder = Encoder(model, storage_cfg, runtime)
        self.batch_size = runtime.batch_size

    def embed(self, texts: list[str], max_length: int) -> np.ndarray:
        """(N, H) float32, rows of unit length (CLS pooling, or the folder's own)."""
        return self.encoder.encode(texts, max_length, self.batch_size).dense

    def __call__(self, batch: pa.Table, out: storage.Location, ranges: dict, section: MineConfig) -> pa.Table:
        summary = {"kind": [], "shard": [], "path": []}
        for kind, shard in zip(
            batch.column("kind").to_pylist(), batch.column("shard").to_pylist(), strict=True
        ):
            fs, kind_ranges = ranges[kind]
            r = kind_ranges[shard]
            if kind == CORPUS:
                table = read_range(fs, r, ["id", "text"])
                emb = self.embed(table.column("text").to_pylist(), section.passage_max_length)
                table = pa.table(
                    {
                        "row": pa.array(np.arange(r.offset + r.start, r.offset + r.stop), pa.int64()),
                        "id": table.column("id").cast(pa.string()),
                        "text": table.column("text"),
                    }
                )
            else:
                table = read_range(fs, r, QUERY_COLUMNS)
                texts = [section.query_instruction + q for q in table.column("query").to_pylist()]
                emb = self.embed(texts, section.query_max_length)
            table = table.append_column("embedding", embedding_array(emb))
            rel = f"embeddings/{kind}/{r.name}.parquet"
            write_parquet(out.child(rel), table)
            for name, value in zip(summary, (kind, shard, out.child(rel).path), strict=True):
                summary[name].append(value)
        return pa.table(summary)


def embedding_array(emb: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(
        pa.array(np.ascontiguousarray(emb, np.float32).ravel()), emb.shape[1]
    )


def embedding_matrix(column: pa.ChunkedArray) -> np.ndarray:
    """(N, H) float32 from a fixed-size-list column."""
    arr = column.combine_chunks()
    if len(arr) == 0:
        return np.zeros((0, arr.type.list_size), np.float32)
    # A copy: Arrow's buffers are read-only and torch.as_tensor warns on them (one shard: 200 MB at
    # 50k x 1024 float32, freed as the next shard is read).
    return arr.flatten().to_numpy(zero_copy_only=False).reshape(len(arr), arr.type.list_size).copy()


# --------------------------------------------------------------------------------------------------
# Search and sampling: one task per query shard
# --------------------------------------------------------------------------------------------------


def corpus_embeddings(out: storage.Location, corpus_paths: list[str]):
    """(embeddings (N_i, H), global rows (N_i,)) per corpus shard, in row order, one shard in memory."""
    for path in corpus_paths:
        with out.fs.open_input_file(path) as f:
            t = pq.read_table(f, columns=["row", "embedding"])
        yield embedding_matrix(t.column("embedding")), t.column("row").to_numpy()


def corpus_lookup(
    out: storage.Location, corpus_paths: list[str], rows: np.ndarray, column: str
) -> dict[int, str]:
    """`column` (id or text) of the given global rows, reading only that column of each shard."""
    wanted = pa.array(np.unique(rows), pa.int64())
    found: dict[int, str] = {}
    for path in corpus_paths:
        with out.fs.open_input_file(path) as f:
            t = pq.read_table(f, columns=["row", column])
        t = t.filter(pc.is_in(t.column("row"), value_set=wanted))
        found.update(zip(t.column("row").to_pylist(), t.column(column).to_pylist(), strict=True))
    return found


def top_rows(
    queries: np.ndarray, out: storage.Location, corpus_paths: list[str], k: int, section: MineConfig, device
):
    """Inner-product top-k global rows (Q, min(k, N)) and scores, best first: exact, or through faiss."""
    shards = corpus_embeddings(out, corpus_paths)
    if section.search == "faiss":
        scores, rows = search_faiss(queries, shards, k, section.faiss_index, section.faiss_nprobe)
    else:
        scores, rows = search_exact(queries, shards, k, section.query_chunk, device)
    return scores.numpy(), rows.astype(np.int64)


def query_rng(seed: int, query_id: str) -> random.Random:
    """A query's own stream: the sample does not depend on sharding or on the other queries."""
    return random.Random(
        int.from_bytes(hashlib.blake2b(f"{seed}:{query_id}".encode(), digest_size=8).digest(), "little")
    )


def search_shard(
    out: storage.Location,
    query_path: str,
    corpus_paths: list[str],
    n_corpus: int,
    section: MineConfig,
    name: str,
) -> dict:
    torch.set_num_threads(max(1, round(section.runtime.num_cpus)))
    device = inference_device(section.runtime.num_gpus)
    with out.fs.open_input_file(query_path) as f:
        q = pq.read_table(f)
    meta = q.select(QUERY_COLUMNS).to_pylist()
    rel = f"data/part-{name.removeprefix('shard-')}.jsonl"
    stats = {
        "path": rel,
        "queries": len(meta),
        "negatives": 0,
        "from_range": 0,
        "random_fill": 0,
        "short": 0,
        "positives_in_range": 0,
    }
    if not meta:  # no file: FlagEmbedding's loader fails on an empty jsonl
        return dict(stats, path=None)
    _, rows = top_rows(
        embedding_matrix(q.column("embedding")), out, corpus_paths, section.range_end, section, device
    )
    candidates = rows[:, section.range_start : section.range_end]  # (Q, <= range_end - range_start)
    rngs = [query_rng(section.seed, m["query_id"]) for m in meta]
    # Random reserve, drawn before ids are known: negative_number + 2 draws leave room for the positive
    # and one repeat; a query still short is counted in `short`.
    reserve = [
        [rng.randrange(n_corpus) for _ in range(section.negative_number + 2)] if section.fill_random else []
        for rng in rngs
    ]
    ids = corpus_lookup(
        out,
        corpus_paths,
        np.concatenate([candidates.ravel(), np.fromiter(itertools.chain.from_iterable(reserve), np.int64)]),
        "id",
    )
    chosen_rows: list[list[int]] = []
    chosen_ranks: list[list[int]] = []
    for i, m in enumerate(meta):
        positives = {m["passage_id"]}
        rank_of = {int(r): section.range_start + j for j, r in enumerate(candidates[i])}
        pool = [int(r) for r in candidates[i] if ids[int(r)] not in positives]
        stats["positives_in_range"] += len(candidates[i]) - len(pool)
        picked = (
            rngs[i].sample(pool, section.negative_number) if len(pool) > section.negative_number else pool
        )
        picked = sorted(picked, key=rank_of.__getitem__)
        ranks = [rank_of[r] for r in picked]
        stats["from_range"] += len(picked)
        for r in reserve[i]:
            if len(picked) >= section.negative_number:
                break
            if ids[r] not in positives and r not in picked:
                picked.append(r)
                ranks.append(-1)  # -1: a random passage, not from the ranked range
                stats["random_fill"] += 1
        stats["short"] += len(picked) < section.negative_number
        chosen_rows.append(picked)
        chosen_ranks.append(ranks)
    texts = corpus_lookup(
        out, corpus_paths, np.fromiter(itertools.chain.from_iterable(chosen_rows), np.int64), "text"
    )
    lines = []
    for m, picked, ranks in zip(meta, chosen_rows, chosen_ranks, strict=True):
        stats["negatives"] += len(picked)
        record = {
            "query": m["query"],
            "pos": [m["passage"]],
            "neg": [texts[r] for r in picked],
            "query_id": m["query_id"],
            "pos_ids": [m["passage_id"]],
            "neg_ids": [ids[r] for r in picked],
            "neg_ranks": ranks,
            "source": m["source"],
        }
        lines.append(json.dumps(record, ensure_ascii=False))
    storage.write_bytes(out.child(rel), ("\n".join(lines) + "\n").encode("utf-8"))
    return stats


def summarize(results: list[dict], plan: MinePlan) -> dict:
    total = {
        k: sum(r[k] for r in results)
        for k in ("queries", "negatives", "from_range", "random_fill", "short", "positives_in_range")
    }
    own = {
        "queries_mined": total["queries"],
        "negatives_mined": total["negatives"],
        "negatives_from_range": total["from_range"],
        "negatives_random_fill": total["random_fill"],
        "queries_short_of_negatives": total["short"],
        "positives_excluded_from_range": total["positives_in_range"],
        "corpus_passages": sum(f.rows for f in plan.corpus_files),
    }
    expected = sum(f.rows for f in plan.query_files)
    if total["queries"] != expected:
        raise RuntimeError(
            f"{STAGE}: {expected} queries in but {total['queries']} written; no manifest written"
        )
    return {"funnel": {**plan.upstream, **own}}
