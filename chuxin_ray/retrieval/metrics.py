"""Retrieval metrics of a run against qrels, as C-MTEB / BEIR report them.

C-MTEB and BEIR score retrieval through mteb's `RetrievalEvaluator`, which hands nDCG, MAP, recall and
precision to pytrec_eval (trec_eval 9.x inside) and computes MRR itself. These functions reproduce those
numbers without either dependency (tests check them against pytrec_eval to 1e-6):

    run    query id -> {doc id: score}         higher score = ranked higher
    qrels  query id -> {doc id: relevance}     integer grades; >= 1 relevant, <= 0 not

Ranking (trec_eval `form_res_rels.c`): documents sorted by score descending, ties broken by doc id
descending (strcmp on the UTF-8 bytes, which is Python's code-point order). The ranking never
depends on the run's dict order.

Per query, with rel(d) the grade (a document absent from the qrels has grade 0) and R the number of
documents in the qrels with grade >= `relevance_level` (trec_eval's -l, default 1):

    ndcg_at_k       sum_{i<=k} max(rel_i, 0) / log2(i + 1) over the ideal ordering of the qrels' grades
                    (linear gain; 0 when the qrels have no positive grade)
    recall_at_k     relevant in the top k / R                     (0 when R = 0)
    map_at_k        sum over relevant ranks i <= k of precision@i, / R   (trec_eval map_cut; 0 when R = 0)
    precision_at_k  relevant in the top k / k                     (k, not the number retrieved)
    mrr_at_k        1 / rank of the first relevant document within the top k, else 0

Which queries are averaged (mteb 2.x `AbsTaskRetrieval._evaluate_subset` + pytrec_eval):
  * a query is scored when it is in the run and its qrels hold at least one judgment. A query whose
    judgments are all <= 0 is scored and contributes 0 to every metric (mteb keeps it in the mean);
    a query whose judgment dict is empty is dropped (mteb's `_filter_queries_without_positives`).
  * a run query absent from the qrels is ignored (pytrec_eval skips it; mteb never searches it).
  * a qrels query absent from the run is ignored too, as pytrec_eval does; `missing_as_zero=True`
    scores it 0 instead, as `trec_eval -c` does. An empty ranking ({}) is present and scores 0.
`coverage` counts each case so a stage can record them.

One deliberate difference from mteb: mteb's MRR sorts by score alone (Python's stable sort, so equal
scores keep the run's insertion order), while the other metrics use trec_eval's order. Here MRR uses
trec_eval's order too, so all metrics see one ranking; the two agree whenever the top k has no tie.
mteb also rounds its means to 5 decimals; these are unrounded.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

Run = Mapping[str, Mapping[str, float]]
Qrels = Mapping[str, Mapping[str, int]]

DEFAULT_KS = (1, 3, 5, 10, 100)
MAIN_METRIC = "ndcg_at_10"  # C-MTEB's main score for retrieval
METRICS = ("ndcg", "map", "recall", "precision", "mrr")


@dataclass(frozen=True)
class Coverage:
    """How the queries of a run and of the qrels overlap; `scored` is the denominator of every mean."""

    scored: int  # in the run and judged (non-empty qrels)
    without_positives: int  # scored, but no judgment >= relevance_level: 0 on every metric
    missing_from_run: int  # judged but absent from the run: skipped, or 0 with missing_as_zero
    unjudged_in_run: int  # in the run but not in the qrels (or judged with an empty dict): ignored


def rank(doc_scores: Mapping[str, float]) -> list[str]:
    """Doc ids in trec_eval order: score descending, then doc id descending."""
    return [doc for doc, _ in sorted(doc_scores.items(), key=lambda item: (item[1], item[0]), reverse=True)]


def query_metrics(
    ranking: Sequence[str],
    judgments: Mapping[str, int],
    ks: Iterable[int] = DEFAULT_KS,
    relevance_level: int = 1,
) -> dict[str, float]:
    """Every metric at every cutoff for one query, given its ranking (best first) and its qrels."""
    ks = _check_ks(ks)
    depth = max(ks)
    grades = [judgments.get(doc, 0) for doc in ranking[:depth]]
    gains = [max(g, 0) for g in grades]  # trec_eval adds only positive gains
    hits = [g >= relevance_level for g in grades]
    num_relevant = sum(1 for g in judgments.values() if g >= relevance_level)
    ideal = sorted((g for g in judgments.values() if g > 0), reverse=True)[:depth]

    # Prefix sums over rank i = 1..depth; log2(i + 1) is the discount (trec_eval 9.x ndcg_cut).
    dcg, ideal_dcg, hit_count, precision_sum = [0.0], [0.0], [0], [0.0]
    first_hit = 0
    for i in range(1, depth + 1):
        gain = gains[i - 1] if i <= len(gains) else 0
        hit = i <= len(hits) and hits[i - 1]
        dcg.append(dcg[-1] + gain / math.log2(i + 1))
        ideal_gain = ideal[i - 1] if i <= len(ideal) else 0
        ideal_dcg.append(ideal_dcg[-1] + ideal_gain / math.log2(i + 1))
        hit_count.append(hit_count[-1] + hit)
        precision_sum.append(precision_sum[-1] + (hit_count[-1] / i if hit else 0.0))
        if hit and not first_hit:
            first_hit = i

    out: dict[str, float] = {}
    for k in ks:
        out[f"ndcg_at_{k}"] = dcg[k] / ideal_dcg[k] if ideal_dcg[k] > 0 else 0.0
        out[f"map_at_{k}"] = precision_sum[k] / num_relevant if num_relevant else 0.0
        out[f"recall_at_{k}"] = hit_count[k] / num_relevant if num_relevant else 0.0
        out[f"precision_at_{k}"] = hit_count[k] / k
        out[f"mrr_at_{k}"] = 1.0 / first_hit if 0 < first_hit <= k else 0.0
    return out


def per_query_metrics(
    run: Run,
    qrels: Qrels,
    ks: Iterable[int] = DEFAULT_KS,
    *,
    relevance_level: int = 1,
    missing_as_zero: bool = False,
    ignore_identical_ids: bool = False,
) -> dict[str, dict[str, float]]:
    """query id -> metrics, for the queries `evaluate_run` averages (see the module docstring).

    ignore_identical_ids: drop a document whose id equals the query id from its ranking, as mteb does
    for tasks that set it (ArguAna, Quora: the query is itself a corpus document).
    """
    ks = _check_ks(ks)
    out: dict[str, dict[str, float]] = {}
    for qid, doc_scores in run.items():
        judgments = qrels.get(qid)
        if not judgments:
            continue
        for doc, score in doc_scores.items():
            if math.isnan(score):
                raise ValueError(f"run query {qid!r}: score of document {doc!r} is NaN")
        if ignore_identical_ids and qid in doc_scores:
            doc_scores = {doc: score for doc, score in doc_scores.items() if doc != qid}
        out[qid] = query_metrics(rank(doc_scores), judgments, ks, relevance_level)
    if missing_as_zero:
        for qid, judgments in qrels.items():
            if judgments and qid not in run:
                out[qid] = query_metrics([], judgments, ks, relevance_level)
    return out


def evaluate_run(
    run: Run,
    qrels: Qrels,
    ks: Iterable[int] = DEFAULT_KS,
    *,
    relevance_level: int = 1,
    missing_as_zero: bool = False,
    ignore_identical_ids: bool = False,
) -> dict[str, float]:
    """Mean of each metric over the scored queries: keys `{ndcg,map,recall,precision,mrr}_at_{k}`
    (mteb's names). Raises ValueError when no query is scored, where mteb would divide by zero."""
    per_query = per_query_metrics(
        run,
        qrels,
        ks,
        relevance_level=relevance_level,
        missing_as_zero=missing_as_zero,
        ignore_identical_ids=ignore_identical_ids,
    )
    if not per_query:
        raise ValueError(
            f"no query to score: {len(run)} run queries, {len(qrels)} qrels queries, none in both with judgments"
        )
    keys = next(iter(per_query.values())).keys()
    # math.fsum: the mean does not depend on the order of the queries.
    return {key: math.fsum(m[key] for m in per_query.values()) / len(per_query) for key in keys}


def coverage(run: Run, qrels: Qrels, relevance_level: int = 1) -> Coverage:
    """Count the queries `evaluate_run` scores, and those it leaves out, by reason."""
    judged = {qid for qid, judgments in qrels.items() if judgments}
    scored = judged.intersection(run)
    return Coverage(
        scored=len(scored),
        without_positives=sum(1 for qid in scored if max(qrels[qid].values()) < relevance_level),
        missing_from_run=len(judged) - len(scored),
        unjudged_in_run=len(run) - len(scored),
    )


def _check_ks(ks: Iterable[int]) -> tuple[int, ...]:
    ks = tuple(sorted(set(ks)))
    if not ks or any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in ks):
        raise ValueError(f"cutoffs must be positive integers, got {ks}")
    return ks
