"""Stage `score`: a cross-encoder scores every (query, pos) and (query, neg) of the mined jsonl, drops
false positives and false negatives, and records the scores for distillation.

    mine output data/part-NNNNN.jsonl
      -> reranker actors (Ray Data, one file per call; GPU when runtime.num_gpus > 0)
         scoring as FlagReranker.compute_score does: query cut to query_max_length (3/4 of
         max_length by default), passage cut so the pair fits max_length, raw logits
      -> the rule (score.mode): absolute thresholds on the raw scores, or relative ones on sigmoid
         scores against the query's best other side
      -> data/part-NNNNN.jsonl {query, pos, neg, pos_scores, neg_scores, + provenance}

Every pair ends in exactly one of: kept, positive below the threshold, negative above it, or part
of a query dropped for having no positive or too few negatives left.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import ray
import torch

from chuxin_ray import storage
from chuxin_ray.config import Config, ConfigError, EncoderRuntime, ScoreConfig, StorageConfig
from chuxin_ray.llm.model_files import inference_device, inference_dtype, local_model_dir
from chuxin_ray.ray_cluster import connect

log = logging.getLogger(__name__)

STAGE = "score"
SUBDIRS = ("data",)
ALIGNED = {"pos": ("pos_ids",), "neg": ("neg_ids", "neg_ranks")}  # provenance lists kept in step


@dataclass
class ScorePlan:
    cfg: ScoreConfig
    src: storage.Location
    out: storage.Location
    files: list[dict]  # {path (filesystem), rows}
    upstream: dict
    config_hash: str
    manifest: dict | None


def setup(cfg: Config, force: bool = False) -> ScorePlan:
    section: ScoreConfig = cfg.require(STAGE)
    out = storage.resolve(cfg.stage_output(STAGE), cfg.storage)
    config_hash = cfg.hash(STAGE)
    src = storage.resolve(section.input or cfg.stage_output("mine"), cfg.storage)
    manifest = storage.begin_stage(STAGE, out, config_hash, force, SUBDIRS)
    if manifest is not None:
        return ScorePlan(section, src, out, [], {}, config_hash, manifest)
    upstream_manifest = storage.read_manifest(src)
    if upstream_manifest is not None:
        files = [
            {"path": src.child(f["path"]).path, "rows": f["rows"]} for f in upstream_manifest["files"]["data"]
        ]
        upstream = upstream_manifest.get("counts", {}).get("funnel", {})
    else:
        files = [{"path": f.path, "rows": None} for f in storage.list_files(src, (".jsonl",))]
        upstream = {}
    if not files:
        raise ConfigError(
            f"{STAGE}.input: no jsonl files at {src.uri}; run `mine` first or set {STAGE}.input"
        )
    return ScorePlan(section, src, out, files, upstream, config_hash, None)


def run(plan: ScorePlan, cfg: Config) -> dict:
    if plan.manifest is not None:
        return storage.report_complete(STAGE, plan.out, plan.manifest)
    started = time.time()
    connect(cfg.ray)
    rt = plan.cfg.runtime
    actors = rt.actors or (
        max(1, int(ray.cluster_resources().get("GPU", 0) // rt.num_gpus)) if rt.num_gpus else 1
    )
    ds = ray.data.from_items(
        [{"file": i} for i in range(len(plan.files))], override_num_blocks=len(plan.files)
    )
    results = ds.map_batches(
        ScoreFiles,
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=rt.num_cpus,
        num_gpus=rt.num_gpus,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=min(actors, len(plan.files))),
        fn_constructor_kwargs={"section": plan.cfg, "storage_cfg": cfg.storage},
        fn_kwargs={"src": plan.src, "out": plan.out, "files": plan.files},
    ).take_all()
    results.sort(key=lambda r: r["path"])
    counts = summarize(results, plan)
    files = {"data": [{"path": r["path"], "rows": r["queries_out"]} for r in results if r["queries_out"]]}
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
        "%s: %d pairs scored, %d dropped by the reranker, %d queries out in %.1f s",
        STAGE,
        f["pairs_scored"],
        f["pairs_dropped"]["positive_below_threshold"] + f["pairs_dropped"]["negative_above_threshold"],
        f["queries_out"],
        time.time() - started,
    )
    return manifest


def main(cfg: Config, force: bool = False) -> dict:
    return run(setup(cfg, force), cfg)


# --------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------


class Reranker:
    """Any sequence-classification checkpoint, scored as FlagEmbedding's FlagReranker scores it
    (encoder_only/base.py compute_score): the same truncation, length-sorted batches, raw logits."""

    def __init__(
        self,
        model: str,
        storage_cfg: StorageConfig | None,
        runtime: EncoderRuntime,
        max_length: int = 512,
        query_max_length: int | None = None,
    ):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = local_model_dir(model, storage_cfg)
        self.device = inference_device(runtime.num_gpus)
        dtype = inference_dtype(runtime.precision, self.device)
        self.tok = AutoTokenizer.from_pretrained(path)
        self.model = (
            AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype).to(self.device).eval()
        )
        self.batch_size = runtime.batch_size
        self.max_length = max_length
        self.query_max_length = query_max_length or max_length * 3 // 4

    @torch.inference_mode()
    def score(self, pairs: list[tuple[str, str]]) -> np.ndarray:
        """(P,) float32 raw scores (logits), in the order of `pairs`."""
        if not pairs:
            return np.zeros(0, np.float32)
        q_ids = self.tok(
            [q for q, _ in pairs], add_special_tokens=False, max_length=self.query_max_length, truncation=True
        )["input_ids"]
        p_ids = self.tok(
            [p for _, p in pairs], add_special_tokens=False, max_length=self.max_length, truncation=True
        )["input_ids"]
        items = [
            self.tok.prepare_for_model(
                q, p, truncation="only_second", max_length=self.max_length, padding=False
            )
            for q, p in zip(q_ids, p_ids, strict=True)
        ]
        order = np.argsort([-len(x["input_ids"]) for x in items], kind="stable")
        scores = np.zeros(len(items), np.float32)
        for start in range(0, len(items), self.batch_size):
            idx = order[start : start + self.batch_size]
            batch = self.tok.pad([items[i] for i in idx], padding=True, return_tensors="pt").to(self.device)
            scores[idx] = self.model(**batch, return_dict=True).logits.view(-1).float().cpu().numpy()
        return scores


class ScoreFiles:
    def __init__(self, section: ScoreConfig, storage_cfg: StorageConfig):
        torch.set_num_threads(max(1, round(section.runtime.num_cpus)))
        self.section = section
        self.reranker = Reranker(
            section.reranker, storage_cfg, section.runtime, section.max_length, section.query_max_length
        )

    def __call__(
        self, batch: pa.Table, src: storage.Location, out: storage.Location, files: list[dict]
    ) -> pa.Table:
        results = []
        for i in batch.column("file").to_pylist():
            path = files[i]["path"]
            records = read_jsonl(storage.Location(src.fs, path, src.uri_of(path)))
            pairs = [(r["query"], p) for r in records for p in (*r["pos"], *r["neg"])]
            scores = self.reranker.score(pairs)
            kept, stats, at = [], Counter(), 0
            for r in records:
                n_pos, n_neg = len(r["pos"]), len(r["neg"])
                pos_s, neg_s = scores[at : at + n_pos], scores[at + n_pos : at + n_pos + n_neg]
                at += n_pos + n_neg
                row = apply_rule(r, pos_s, neg_s, self.section, stats)
                if row is not None:
                    kept.append(row)
            rel = f"data/part-{i:05d}.jsonl"
            if kept:  # no empty files: FlagEmbedding's loader fails on them
                body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept)
                storage.write_bytes(out.child(rel), body.encode("utf-8"))
            stats.update(queries_in=len(records), queries_out=len(kept), pairs_scored=len(pairs))
            results.append({"path": rel, **{k: int(stats[k]) for k in STAT_KEYS}})
        return pa.Table.from_pylist(results)


STAT_KEYS = (
    "queries_in",
    "queries_out",
    "pairs_scored",
    "pairs_out",
    "positive_below_threshold",
    "negative_above_threshold",
    "query_dropped",
    "no_positive",
    "too_few_negatives",
)


def apply_rule(
    record: dict, pos_s: np.ndarray, neg_s: np.ndarray, section: ScoreConfig, stats: Counter
) -> dict | None:
    """The record with dropped pairs removed and their scores recorded, or None when the query goes."""
    keep_pos, keep_neg = keep_masks(pos_s, neg_s, section)
    stats["positive_below_threshold"] += int((~keep_pos).sum())
    stats["negative_above_threshold"] += int((~keep_neg).sum())
    left_pairs = int(keep_pos.sum() + keep_neg.sum())
    reason = (
        "no_positive"
        if not keep_pos.any()
        else ("too_few_negatives" if keep_neg.sum() < section.min_negatives else "")
    )
    if reason:
        stats[reason] += 1
        stats["query_dropped"] += left_pairs  # pairs that survived the rule but leave with their query
        return None
    stats["pairs_out"] += left_pairs
    out = dict(record)
    for side, mask, s in (("pos", keep_pos, pos_s), ("neg", keep_neg, neg_s)):
        out[side] = [x for x, k in zip(record[side], mask, strict=True) if k]
        out[f"{side}_scores"] = [round(float(v), 6) for v, k in zip(s, mask, strict=True) if k]
        for name in ALIGNED[side]:
            if name in record:
                out[name] = [x for x, k in zip(record[name], mask, strict=True) if k]
    return out


def keep_masks(pos_s: np.ndarray, neg_s: np.ndarray, section: ScoreConfig) -> tuple[np.ndarray, np.ndarray]:
    """absolute: pos kept iff s >= pos_threshold, neg kept iff s <= neg_threshold (raw logits).
    relative (sigmoid scores): pos kept iff s >= pos_threshold x best negative; neg kept iff
    s <= neg_threshold x best kept positive (NV-Retriever's TopK-PercPos with 0.95)."""
    keep_pos = np.ones(len(pos_s), bool)
    keep_neg = np.ones(len(neg_s), bool)
    if section.mode == "absolute":
        if section.pos_threshold is not None:
            keep_pos = pos_s >= section.pos_threshold
        if section.neg_threshold is not None:
            keep_neg = neg_s <= section.neg_threshold
        return keep_pos, keep_neg
    sp, sn = _sigmoid(pos_s), _sigmoid(neg_s)
    if section.pos_threshold is not None and len(sn):
        keep_pos = sp >= section.pos_threshold * sn.max()
    if section.neg_threshold is not None and len(sp):
        best_pos = sp[keep_pos].max() if keep_pos.any() else sp.max()
        keep_neg = sn <= section.neg_threshold * best_pos
    return keep_pos, keep_neg


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x.astype(np.float64)))


def read_jsonl(loc: storage.Location) -> list[dict]:
    return [json.loads(line) for line in storage.read_bytes(loc).decode("utf-8").splitlines() if line.strip()]


def summarize(results: list[dict], plan: ScorePlan) -> dict:
    total = {k: sum(r[k] for r in results) for k in STAT_KEYS}
    own = {
        "queries_score_in": total["queries_in"],
        "pairs_scored": total["pairs_scored"],
        "pairs_dropped": {
            "positive_below_threshold": total["positive_below_threshold"],
            "negative_above_threshold": total["negative_above_threshold"],
            "with_dropped_query": total["query_dropped"],
        },
        "queries_dropped": {
            "no_positive": total["no_positive"],
            "too_few_negatives": total["too_few_negatives"],
        },
        "queries_out": total["queries_out"],
        "pairs_out": total["pairs_out"],
    }
    if total["pairs_scored"] != total["pairs_out"] + sum(own["pairs_dropped"].values()):
        raise RuntimeError(f"{STAGE}: pairs scored do not add up to pairs out + dropped; no manifest written")
    expected = [f["rows"] for f in plan.files]
    if None not in expected and sum(expected) != total["queries_in"]:
        raise RuntimeError(f"{STAGE}: {sum(expected)} queries listed but {total['queries_in']} read")
    return {"funnel": {**plan.upstream, **own}}
