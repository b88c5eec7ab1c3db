"""Stage `evaluate`: C-MTEB-style retrieval metrics of the trained model, with a baseline beside it.

    each set (BEIR layout: corpus, queries, qrels/test), read on the driver (retrieval/io.py load_beir)
    for each model (evaluate.model, then evaluate.baseline):
      the corpus in shards of corpus_shard_rows, one Ray Data job each
        -> encoder actors (batched; GPU when runtime.num_gpus > 0), models/encoder.py; an actor encodes
           the set's judged queries (with the set's instruction) once, then its shard a few batches at a
           time, scores those passages against every query and keeps a running top_k per query and
           method (retrieval/topk.py TopK); only those batches' embeddings are ever held
             dense    inner product of the normalised CLS vectors
             sparse   lexical matching: sum over the token ids both texts hold of w_q * w_p
             colbert  MaxSim: each query token's best inner product over the passage tokens, averaged
                      over the query tokens (BGEM3FlagModel.colbert_score)
             hybrid   (w_d dense + w_s sparse + w_c colbert) / (w_d + w_s + w_c), w = hybrid_weights
                      (BGEM3FlagModel.compute_score "colbert+sparse+dense"; the division ranks nothing
                      differently)
      -> the shards' top_k merged on the driver: every method is exact over the whole corpus
      -> metrics of each run (retrieval/metrics.py: trec_eval's definitions, as C-MTEB via pytrec_eval)

    <out>/results.json                          set -> model|baseline -> method -> metric -> value
    <out>/results.md                            the model beside the baseline, and the difference
    <out>/runs/<set>/<model>-<method>.jsonl     {query_id, doc_id, rank, score}, top_k per query, best first
    <out>/_manifest.json                        written last; counts.main holds every nDCG@10

ColBERT and hybrid are exact here too, where the BGE-M3 paper (arXiv:2402.03216) reranks retrieved
candidates with the multi-vector score, so its numbers can differ a little from these. Exact ColBERT
costs about Q * Lq * D / (encoder parameters) of one corpus encoding (bge-m3 at Lq 16: Q / 35k), usually
less than re-encoding the candidates would, and no ColBERT vector is stored (a corpus's would be ~80 GB
for 100k passages of 200 tokens at D=1024).

Ties rank the lower corpus row first. A rerun on a complete output does nothing.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import pyarrow as pa
import ray
import torch
from torch.nn.utils.rnn import pad_sequence

from chuxin_ray import storage
from chuxin_ray.config import Config, ConfigError, EncoderRuntime, EvaluateConfig, StorageConfig
from chuxin_ray.llm.model_files import encoder_actors, is_remote
from chuxin_ray.models.encoder import EncodedTexts, Encoder
from chuxin_ray.models.m3 import colbert_scores, dense_scores, sparse_scores
from chuxin_ray.models.m3_folder import HEAD_FILES, ModelFolderError, local_folder
from chuxin_ray.ray_cluster import connect
from chuxin_ray.retrieval.io import RetrievalDataError, load_beir
from chuxin_ray.retrieval.metrics import MAIN_METRIC, coverage, evaluate_run
from chuxin_ray.retrieval.topk import TopK

log = logging.getLogger(__name__)

STAGE = "evaluate"
SUBDIRS = ("runs",)
SPLIT = "test"  # qrels/test.* (or qrels.*)
KS = (1, 3, 5, 10, 100)
REPORTED = (
    "ndcg_at_1",
    "ndcg_at_3",
    "ndcg_at_5",
    "ndcg_at_10",
    "recall_at_10",
    "recall_at_100",
    "mrr_at_10",
    "map_at_10",
)
NEED_HEADS = ("sparse", "colbert", "hybrid")
# encoder output -> the methods that score with it
USERS = {"dense": ("dense", "hybrid"), "sparse": ("sparse", "hybrid"), "colbert": ("colbert", "hybrid")}
QUERY_CHUNK = 1024  # queries scored at once; with ColBERT (1024, Lq, D) padded vectors: 256 MB at 64 x 1024
PASSAGE_BATCHES = 4  # encoder batches scored at once: with ColBERT their (B, Lp, D) vectors are held


@dataclass
class SetData:
    """One retrieval set as the stage uses it: passages in corpus order, the judged queries."""

    name: str
    uri: str
    instruction: str
    doc_ids: list[str]
    passages: list[str]  # "title text", stripped (mteb's and FlagEmbedding's C-MTEB corpus text)
    query_ids: list[str]  # the queries with judgments, in file order
    queries: list[str]
    qrels: dict[str, dict[str, int]]


@dataclass
class EvalPlan:
    cfg: EvaluateConfig
    out: storage.Location
    config_hash: str
    manifest: dict | None
    models: dict[str, str]  # "model" (and "baseline") -> folder URI
    sets: list[SetData]
    methods: dict[str, list[str]] = field(default_factory=dict)  # per model: a dense-only baseline, dense


def setup(cfg: Config, force: bool = False) -> EvalPlan:
    section: EvaluateConfig = cfg.require(STAGE)
    models = {"model": section.model or cfg.trained_model(STAGE)}
    if section.baseline:
        models["baseline"] = baseline_model(cfg, section.baseline)
    # The hash names the resolved model: an unset evaluate.model follows the training stages' outputs.
    digest = cfg.model_copy(update={STAGE: section.model_copy(update={"model": models["model"]})}).hash(STAGE)
    out = storage.resolve(cfg.stage_output(STAGE), cfg.storage)
    manifest = storage.begin_stage(STAGE, out, digest, force, SUBDIRS)
    if manifest is not None:
        return EvalPlan(section, out, digest, manifest, models, [])
    check_methods(section)
    if section.top_k < max(KS):
        log.warning(
            "%s: top_k=%d, so recall_at_100 counts the top %d only", STAGE, section.top_k, section.top_k
        )
    heads_for = [m for m in section.methods if m in NEED_HEADS]
    check_model(models["model"], f"{STAGE}.model", heads_for, cfg.storage)
    methods = {"model": list(section.methods)}
    if "baseline" in models:  # a dense-only starting model is compared on the dense scores it has
        dense_only = not check_model(models["baseline"], f"{STAGE}.baseline", [], cfg.storage)
        methods["baseline"] = (
            ["dense"] if dense_only and "dense" in section.methods else list(section.methods)
        )
        if dense_only and "dense" not in section.methods:
            raise ConfigError(
                f"{STAGE}.baseline: {models['baseline']} is dense-only; add dense to {STAGE}.methods"
            )
    sets = [read_set(section, i, cfg.storage) for i in range(len(section.sets))]
    return EvalPlan(section, out, digest, None, models, sets, methods)


def baseline_model(cfg: Config, value: str) -> str:
    """`evaluate.baseline`: a model folder, or a training stage's name for the model that stage wrote."""
    folders = {"pretrain": "encoder_model", "finetune": "model", "unified": "model"}
    if value in folders:
        if getattr(cfg, value, None) is None:
            raise ConfigError(f"{STAGE}.baseline: {value!r} names a stage the config has no section for")
        return storage.resolve(cfg.stage_output(value), cfg.storage).child(folders[value]).uri
    return value


def check_methods(section: EvaluateConfig) -> None:
    if len(set(section.methods)) != len(section.methods):
        raise ConfigError(f"{STAGE}.methods: each method once, got {section.methods}")
    weights = section.hybrid_weights
    if "hybrid" in section.methods and (min(weights) < 0 or sum(weights) <= 0):
        raise ConfigError(
            f"{STAGE}.hybrid_weights: weights >= 0 with a positive sum (dense, sparse, colbert), got {weights}"
        )


def check_model(uri: str, key: str, heads_for: list[str], storage_cfg: StorageConfig) -> bool:
    """The folder exists and holds a config, and the M3 heads when a method needs them: read from its
    file list, so a wrong folder fails before any weights are read or any Ray work starts. Returns
    whether it has the heads."""
    try:
        if is_remote(uri):
            loc = storage.resolve(uri, storage_cfg)
            names = {info.path.rsplit("/", 1)[-1] for info in storage.list_files(loc)}
        else:
            names = {p.name for p in local_folder(uri.removeprefix("file://")).iterdir()}
    except (ModelFolderError, storage.StorageError, OSError) as e:
        raise ConfigError(f"{key}: no model folder at {uri}: {e}") from None
    if "config.json" not in names:
        raise ConfigError(f"{key}: {uri} has no config.json; not a Hugging Face model folder")
    missing = [name for name in HEAD_FILES if name not in names]
    if heads_for and missing:
        raise ConfigError(
            f"{key}: {uri} is a dense-only folder (no {' or '.join(missing)}); methods {heads_for} need the "
            f"M3 heads. Evaluate it with methods [dense], or give an M3 folder (the unified stage's model)"
        )
    return not missing


def read_set(section: EvaluateConfig, index: int, storage_cfg: StorageConfig) -> SetData:
    """The whole set on the driver: a corpus's text is small beside its embeddings (C-MTEB's retrieval
    corpora hold 100-119k passages: 490 MB of dense vectors at H=1024, tens of GB of ColBERT vectors)."""
    spec = section.sets[index]
    key = f"{STAGE}.sets.{index}.uri"
    loc = storage.resolve(spec.uri, storage_cfg)
    try:
        data = load_beir(loc.path, SPLIT, loc.fs)
    except (RetrievalDataError, OSError) as e:
        raise ConfigError(f"{key}: set {spec.name!r} at {spec.uri}: {e}") from None
    query_ids = [qid for qid in data.queries if data.qrels.get(qid)]
    if not data.corpus or not query_ids:
        raise ConfigError(
            f"{key}: set {spec.name!r} at {spec.uri} has {len(data.corpus)} passages and "
            f"{len(query_ids)} queries with judgments in qrels/{SPLIT}; it needs both"
        )
    instruction = spec.query_instruction if spec.query_instruction is not None else section.query_instruction
    return SetData(
        name=spec.name,
        uri=spec.uri,
        instruction=instruction,
        doc_ids=list(data.corpus),
        passages=[f"{d['title']} {d['text']}".strip() for d in data.corpus.values()],
        query_ids=query_ids,
        queries=[data.queries[qid] for qid in query_ids],
        qrels=data.qrels,
    )


def run(plan: EvalPlan, cfg: Config) -> dict:
    if plan.manifest is not None:
        return storage.report_complete(STAGE, plan.out, plan.manifest)
    started = time.time()
    connect(cfg.ray)
    results: dict = {s.name: {} for s in plan.sets}  # set -> model -> method -> metric -> value
    runs: list[str] = []
    seconds: dict[str, float] = {}
    for key, uri in plan.models.items():
        t0 = time.time()
        section = plan.cfg.model_copy(update={"methods": plan.methods.get(key, plan.cfg.methods)})
        for s, by_method in zip(plan.sets, search_all(plan, cfg, uri, section), strict=True):
            for method, (rows, scores) in by_method.items():
                rel = f"runs/{s.name}/{key}-{method}.jsonl"
                write_run(plan.out.child(rel), s, rows, scores)
                runs.append(rel)
                results[s.name].setdefault(key, {})[method] = run_metrics(s, rows, scores)
        seconds[key] = round(time.time() - t0, 3)

    storage.write_json(plan.out.child("results.json"), results)
    storage.write_bytes(plan.out.child("results.md"), results_markdown(results, plan.models).encode("utf-8"))
    counts = {
        "main_metric": MAIN_METRIC,
        "main": {
            name: {key: {method: m[MAIN_METRIC] for method, m in by.items()} for key, by in r.items()}
            for name, r in results.items()
        },
        "sets": {
            s.name: {
                "passages": len(s.doc_ids),
                "queries_searched": len(s.query_ids),
                **asdict(coverage(dict.fromkeys(s.query_ids, {}), s.qrels)),
            }
            for s in plan.sets
        },
        "seconds": seconds,
    }
    manifest = storage.stage_manifest(
        STAGE,
        plan.config_hash,
        cfg.redacted()[STAGE],
        inputs=[*(s.uri for s in plan.sets), *plan.models.values()],
        counts=counts,
        files={"results": ["results.json", "results.md"], "runs": runs},
        started=started,
        models=plan.models,
    )
    storage.write_manifest(plan.out, manifest)
    for name, by_model in counts["main"].items():
        log.info("%s: %s %s %s", STAGE, name, MAIN_METRIC, json.dumps(by_model))
    return manifest


def main(cfg: Config, force: bool = False) -> dict:
    return run(setup(cfg, force), cfg)


def run_metrics(s: SetData, rows: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    run_ = {
        qid: {s.doc_ids[r]: float(v) for r, v in zip(rr, ss, strict=True)}
        for qid, rr, ss in zip(s.query_ids, rows, scores, strict=True)
    }
    metrics = evaluate_run(run_, s.qrels, KS)
    return {m: metrics[m] for m in REPORTED}


def outputs(methods: list[str]) -> list[str]:
    """The encoder outputs the methods score with."""
    return [out for out, users in USERS.items() if set(users) & set(methods)]


# --------------------------------------------------------------------------------------------------
# Search: an encoder actor per GPU (or CPU slot), one corpus shard per call
# --------------------------------------------------------------------------------------------------


def search_all(
    plan: EvalPlan, cfg: Config, uri: str, section: EvaluateConfig
) -> list[dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Every set searched with one model for `section.methods`: per set, method -> (rows (Q, k), scores
    (Q, k)) best first."""
    rt = section.runtime
    size = section.corpus_shard_rows
    jobs = [
        {"set": i, "first_row": start, "texts": s.passages[start : start + size]}
        for i, s in enumerate(plan.sets)
        for start in range(0, len(s.passages), size)
    ]
    shards = ray.data.from_items(jobs, override_num_blocks=len(jobs)).map_batches(
        SearchShards,
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=rt.num_cpus,
        num_gpus=rt.num_gpus,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=encoder_actors(rt, len(jobs))),
        fn_constructor_kwargs={"model": uri, "storage_cfg": cfg.storage, "runtime": rt},
        fn_kwargs={"sets": [(s.instruction, s.queries) for s in plan.sets], "section": section},
    )
    best: list[dict] = [{} for _ in plan.sets]  # set -> method -> (rows, scores), over the shards so far
    for batch in shards.iter_batches(batch_size=None, batch_format="pyarrow"):
        for i in range(batch.num_rows):
            index, method = batch["set"][i].as_py(), batch["method"][i].as_py()
            n_queries = len(plan.sets[index].query_ids)
            found = (
                batch["rows"][i].values.to_numpy().reshape(n_queries, -1),  # (Q, k')
                batch["scores"][i].values.to_numpy().reshape(n_queries, -1),  # (Q, k')
            )
            kept = best[index].get(method)
            best[index][method] = found if kept is None else merge(kept, found, section.top_k)
    return best


def merge(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray], k: int):
    """The best k of two shards' best lists, rows (Q, ka) and (Q, kb) with their scores: score
    descending, then row ascending, so shards may arrive in any order and ties still go to the lower row,
    as TopK's do within a shard. Returns rows (Q, k'), scores (Q, k')."""
    rows = np.concatenate([a[0], b[0]], axis=1)  # (Q, ka + kb)
    scores = np.concatenate([a[1], b[1]], axis=1)  # (Q, ka + kb)
    order = np.lexsort((rows, -scores), axis=1)[:, :k]  # (Q, k')
    return np.take_along_axis(rows, order, axis=1), np.take_along_axis(scores, order, axis=1)


@dataclass
class Reps:
    """Encoder outputs as the models/m3.py score functions take them: padded tensors on one device."""

    dense: torch.Tensor | None = None  # (N, H) unit rows
    sparse_ids: torch.Tensor | None = None  # (N, Ls) token ids, -1 at padding: it matches nothing
    sparse_weights: torch.Tensor | None = None  # (N, Ls) 0 at padding
    colbert: torch.Tensor | None = None  # (N, Lc, D) 0 at padding
    colbert_mask: torch.Tensor | None = None  # (N, Lc)

    @classmethod
    def of(cls, enc: EncodedTexts, device: torch.device) -> Reps:
        reps = cls()
        if enc.dense is not None:
            reps.dense = torch.from_numpy(enc.dense).to(device)  # (N, H)
        if enc.sparse is not None:
            # a -1 column first: every text has one entry, even when no token has a weight
            ids = [torch.tensor([-1, *w], dtype=torch.long) for w in enc.sparse]
            weights = [torch.tensor([0.0, *w.values()], dtype=torch.float32) for w in enc.sparse]
            reps.sparse_ids = pad_sequence(ids, batch_first=True, padding_value=-1).to(device)  # (N, Ls)
            reps.sparse_weights = pad_sequence(weights, batch_first=True).to(device)  # (N, Ls)
        if enc.colbert is not None:
            lengths = torch.tensor([len(v) for v in enc.colbert])  # (N,)
            reps.colbert = pad_sequence([torch.from_numpy(v) for v in enc.colbert], batch_first=True).to(
                device
            )  # (N, Lc, D)
            reps.colbert_mask = (torch.arange(reps.colbert.size(1))[None, :] < lengths[:, None]).to(
                device
            )  # (N, Lc)
        return reps

    def rows(self, start: int, stop: int) -> Reps:
        """Texts start..stop-1."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return Reps(**{name: None if t is None else t[start:stop] for name, t in values.items()})


def method_scores(q: Reps, p: Reps, methods: list[str], weights: tuple[float, float, float]) -> dict:
    """method -> scores (C, P) of C queries against P passages."""
    parts = {}
    if q.dense is not None:
        parts["dense"] = dense_scores(q.dense, p.dense)  # (C, P)
    if q.sparse_ids is not None:
        parts["sparse"] = sparse_scores(
            q.sparse_ids, q.sparse_weights, p.sparse_ids, p.sparse_weights
        )  # (C, P)
    if q.colbert is not None:
        parts["colbert"] = colbert_scores(q.colbert, q.colbert_mask, p.colbert, p.colbert_mask)  # (C, P)
    if "hybrid" in methods:
        w_dense, w_sparse, w_colbert = weights
        weighted = w_dense * parts["dense"] + w_sparse * parts["sparse"] + w_colbert * parts["colbert"]
        parts["hybrid"] = weighted / (w_dense + w_sparse + w_colbert)  # (C, P)
    return {m: parts[m] for m in methods}


class SearchShards:
    """A Ray Data actor holding one model. Per call, one corpus shard: its passages encoded a few batches
    at a time and scored against every query of the set, a running top_k per query and method."""

    def __init__(self, model: str, storage_cfg: StorageConfig, runtime: EncoderRuntime):
        torch.set_num_threads(max(1, round(runtime.num_cpus)))
        self.encoder = Encoder(model, storage_cfg, runtime)
        self._queries: dict[int, list[Reps]] = {}  # set index -> its queries, in chunks of QUERY_CHUNK

    def queries(self, index: int, instruction: str, texts: list[str], section: EvaluateConfig) -> list[Reps]:
        """A set's queries, encoded on first use and kept on the device (with ColBERT, (Q, Lq, D) float32:
        6 GB for T2Retrieval's 22.8k queries at Lq 64, D 1024)."""
        if index not in self._queries:
            want = outputs(section.methods)
            enc = self.encoder.encode(texts, section.query_max_length, instruction=instruction, want=want)
            reps = Reps.of(enc, self.encoder.device)
            self._queries[index] = [
                reps.rows(start, start + QUERY_CHUNK) for start in range(0, len(texts), QUERY_CHUNK)
            ]
        return self._queries[index]

    def __call__(
        self, batch: pa.Table, sets: list[tuple[str, list[str]]], section: EvaluateConfig
    ) -> pa.Table:
        return pa.concat_tables([self.search(job, *sets[job["set"]], section) for job in batch.to_pylist()])

    def search(
        self, job: dict, instruction: str, query_texts: list[str], section: EvaluateConfig
    ) -> pa.Table:
        """One row per method: the shard's best rows and their scores per query, flattened (Q * k')."""
        chunks = self.queries(job["set"], instruction, query_texts, section)
        merges = {m: [TopK(section.top_k) for _ in chunks] for m in section.methods}
        texts, want = job["texts"], outputs(section.methods)
        # Without ColBERT a shard's embeddings are small ((N, H) at most): encoded in one call, whose
        # batches are sorted by length over the whole shard.
        step = PASSAGE_BATCHES * self.encoder.batch_size if "colbert" in want else len(texts)
        for start in range(0, len(texts), step):
            enc = self.encoder.encode(texts[start : start + step], section.passage_max_length, want=want)
            passages = Reps.of(enc, self.encoder.device)
            first = job["first_row"] + start
            rows = np.arange(first, first + len(texts[start : start + step]))  # (P,) in corpus order
            for c, queries in enumerate(chunks):
                scored = method_scores(queries, passages, section.methods, section.hybrid_weights)
                for method, scores in scored.items():
                    merges[method][c].update(scores, rows)  # scores (C, P)
        best_rows, best_scores = [], []
        for per_chunk in merges.values():
            results = [m.result() for m in per_chunk]
            best_rows.append(np.concatenate([r for _, r in results]).ravel())  # (Q * k',)
            best_scores.append(torch.cat([s for s, _ in results]).numpy().ravel())  # (Q * k',)
        return pa.table(
            {
                "set": pa.array([job["set"]] * len(merges), pa.int64()),
                "method": list(merges),
                "rows": pa.array(best_rows, pa.list_(pa.int64())),
                "scores": pa.array(best_scores, pa.list_(pa.float32())),
            }
        )


def write_run(loc: storage.Location, s: SetData, rows: np.ndarray, scores: np.ndarray) -> None:
    lines = [
        json.dumps(
            {"query_id": qid, "doc_id": s.doc_ids[r], "rank": rank + 1, "score": float(v)}, ensure_ascii=False
        )
        for qid, rr, ss in zip(s.query_ids, rows, scores, strict=True)
        for rank, (r, v) in enumerate(zip(rr, ss, strict=True))
    ]
    storage.write_bytes(loc, ("\n".join(lines) + "\n").encode("utf-8"))


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def results_markdown(results: dict, models: dict[str, str]) -> str:
    """Two tables, the main score then every metric; with a baseline, its value and the difference
    (model - baseline) beside the model's."""
    baseline = "baseline" in models
    lines = ["# Retrieval evaluation", ""]
    lines += [f"- {key}: `{uri}`" for key, uri in models.items()]
    for title, metrics in ((f"{MAIN_METRIC} (main score)", (MAIN_METRIC,)), ("All metrics", REPORTED)):
        header = ["set", "method", *([] if len(metrics) == 1 else ["metric"]), "model"]
        header += ["baseline", "model - baseline"] if baseline else []
        lines += ["", f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for set_name, by_model in results.items():
            for method, values in by_model["model"].items():
                for metric in metrics:
                    cells = [set_name, method, *([] if len(metrics) == 1 else [metric])]
                    cells.append(f"{values[metric]:.4f}")
                    base = by_model.get("baseline", {}).get(method, {}).get(metric)
                    if baseline and base is None:  # a dense-only baseline has no sparse or ColBERT score
                        cells += ["-", "-"]
                    elif baseline:
                        cells += [f"{base:.4f}", f"{values[metric] - base:+.4f}"]
                    lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
