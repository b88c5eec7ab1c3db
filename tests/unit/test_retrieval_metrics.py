"""Our retrieval metrics against pytrec_eval (trec_eval 9.x, what mteb and BEIR call) on the same runs.

MRR@10 has no trec_eval measure with a cutoff (recip_rank looks at the whole ranking), so it is checked
against a reference written here from the definition, and against recip_rank on runs cut to 10.
"""

from __future__ import annotations

import functools
import math
import random

import pytest
import pytrec_eval

from chuxin_ray.retrieval.metrics import coverage, evaluate_run, per_query_metrics, query_metrics, rank

TREC_MEASURES = {"ndcg_cut.1,3,5,10", "recall.10,100", "map_cut.10", "P.1,10"}
# ours -> pytrec_eval's name for the same number
SAME = {
    "ndcg_at_1": "ndcg_cut_1",
    "ndcg_at_3": "ndcg_cut_3",
    "ndcg_at_5": "ndcg_cut_5",
    "ndcg_at_10": "ndcg_cut_10",
    "recall_at_10": "recall_10",
    "recall_at_100": "recall_100",
    "map_at_10": "map_cut_10",
    "precision_at_1": "P_1",
    "precision_at_10": "P_10",
}
KS = (1, 3, 5, 10, 100)


def random_case(seed: int) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, int]]]:
    """A run and qrels with every awkward case: ties, graded and negative grades, several positives,
    ids whose string order differs from their numeric order, non-ASCII ids, and queries on one side only."""
    rng = random.Random(seed)
    docs = [f"d{i}" for i in range(120)] + ["文档a", "文档b", "Zeta", "alpha", "é"]
    run: dict[str, dict[str, float]] = {}
    qrels: dict[str, dict[str, int]] = {}
    for q in range(40):
        qid = f"q{q}"
        retrieved = rng.sample(docs, rng.randint(0, 110))
        # one decimal from a narrow range: many exact ties, some straddling the cutoffs
        run[qid] = {doc: round(rng.uniform(0.0, 1.5), 1) for doc in retrieved}
        judged = rng.sample(docs, rng.randint(1, 12))
        qrels[qid] = {doc: rng.choice([-1, 0, 0, 1, 1, 2, 3]) for doc in judged}
    qrels["q0"] = {"d1": 0, "d2": 0}  # judged, no positive: scored, 0 everywhere
    qrels["q1"] = {"never-retrieved": 2, "d0": 0}  # a positive the run cannot reach
    run["q1"]["d0"] = 9.0
    run["q2"] = {}  # an empty ranking: scored as 0
    run["only-in-run"] = {"d3": 1.0}
    qrels["only-in-qrels"] = {"d3": 1}
    qrels["q3"] = {}  # an empty judgment dict: dropped, as mteb drops it
    return run, qrels


@pytest.mark.parametrize("seed", range(6))
def test_matches_pytrec_eval_per_query_and_mean(seed: int):
    run, qrels = random_case(seed)
    theirs = pytrec_eval.RelevanceEvaluator(qrels, TREC_MEASURES).evaluate(run)
    ours = per_query_metrics(run, qrels, KS)

    assert set(ours) == set(theirs)  # the same queries are scored
    for qid, metrics in theirs.items():
        for our_key, their_key in SAME.items():
            assert ours[qid][our_key] == pytest.approx(metrics[their_key], abs=1e-6), (qid, our_key)

    means = evaluate_run(run, qrels, KS)
    for our_key, their_key in SAME.items():
        expected = sum(m[their_key] for m in theirs.values()) / len(theirs)
        assert means[our_key] == pytest.approx(expected, abs=1e-6), our_key


def reference_mrr_at_k(
    run: dict[str, dict[str, float]], qrels: dict[str, dict[str, int]], k: int
) -> dict[str, float]:
    """From the definition, with trec_eval's comparator (score descending, then doc id descending)."""

    def trec_order(a: tuple[str, float], b: tuple[str, float]) -> int:
        if a[1] != b[1]:
            return -1 if a[1] > b[1] else 1
        return -1 if a[0] > b[0] else (1 if a[0] < b[0] else 0)

    out = {}
    for qid, doc_scores in run.items():
        if not qrels.get(qid):
            continue
        ranked = sorted(doc_scores.items(), key=functools.cmp_to_key(trec_order))
        out[qid] = next(
            (1.0 / r for r, (doc, _) in enumerate(ranked[:k], 1) if qrels[qid].get(doc, 0) > 0), 0.0
        )
    return out


@pytest.mark.parametrize("seed", range(6))
def test_mrr_at_10_matches_reference_and_recip_rank_on_cut_runs(seed: int):
    run, qrels = random_case(seed)
    reference = reference_mrr_at_k(run, qrels, 10)
    ours = per_query_metrics(run, qrels, KS)
    for qid, value in reference.items():
        assert ours[qid]["mrr_at_10"] == pytest.approx(value, abs=1e-12), qid

    # pytrec_eval's recip_rank over each ranking cut to its first 10 is MRR@10.
    cut = {qid: {doc: docs[doc] for doc in rank(docs)[:10]} for qid, docs in run.items()}
    theirs = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(cut)
    for qid, metrics in theirs.items():
        assert ours[qid]["mrr_at_10"] == pytest.approx(metrics["recip_rank"], abs=1e-6), qid
    assert evaluate_run(run, qrels, KS)["mrr_at_10"] == pytest.approx(
        sum(reference.values()) / len(reference), abs=1e-9
    )


def test_ties_break_by_doc_id_descending_like_trec_eval():
    # Three equal scores: trec_eval ranks z, d1, a, so the relevant d1 is second.
    run = {"q": {"a": 1.0, "d1": 1.0, "z": 1.0}}
    qrels = {"q": {"d1": 1}}
    assert rank(run["q"]) == ["z", "d1", "a"]
    m = evaluate_run(run, qrels, (1, 3))
    assert m["mrr_at_3"] == 0.5
    assert m["ndcg_at_3"] == pytest.approx(1 / math.log2(3))  # linear gain, log2(rank + 1) discount
    assert m["ndcg_at_1"] == 0.0
    # insertion order of the run does not matter
    assert evaluate_run({"q": {"z": 1.0, "a": 1.0, "d1": 1.0}}, qrels, (1, 3)) == m


def test_graded_ndcg_by_hand():
    # grades by rank: 0, 2, 3; ideal order 3, 2, 1 (the 1 is never retrieved)
    judgments = {"b": 2, "c": 3, "x": 1}
    m = query_metrics(["a", "b", "c"], judgments, ks=(3,))
    dcg = 2 / math.log2(3) + 3 / math.log2(4)
    ideal = 3 + 2 / math.log2(3) + 1 / math.log2(4)
    assert m["ndcg_at_3"] == pytest.approx(dcg / ideal)
    assert m["recall_at_3"] == pytest.approx(2 / 3)
    assert m["map_at_3"] == pytest.approx((1 / 2 + 2 / 3) / 3)
    assert m["precision_at_3"] == pytest.approx(2 / 3)
    assert m["mrr_at_3"] == 0.5


def test_which_queries_are_averaged():
    run = {"q1": {"d1": 1.0}, "q2": {"d9": 1.0}, "extra": {"d1": 1.0}, "q4": {"d1": 1.0}}
    qrels = {"q1": {"d1": 1}, "q2": {"d2": 0}, "q3": {"d3": 1}, "q4": {}}
    # scored: q1 (1.0) and q2 (no positive: 0); q3 missing from the run; extra and q4 unjudged
    assert evaluate_run(run, qrels, (10,))["ndcg_at_10"] == 0.5
    c = coverage(run, qrels)
    assert (c.scored, c.without_positives, c.missing_from_run, c.unjudged_in_run) == (2, 1, 1, 2)
    # trec_eval -c: a judged query the run lacks scores 0
    assert evaluate_run(run, qrels, (10,), missing_as_zero=True)["ndcg_at_10"] == pytest.approx(1 / 3)


def test_ignore_identical_ids_drops_the_query_itself():
    run = {"q": {"q": 2.0, "d": 1.0}}
    qrels = {"q": {"d": 1}}
    assert evaluate_run(run, qrels, (1,))["ndcg_at_1"] == 0.0
    assert evaluate_run(run, qrels, (1,), ignore_identical_ids=True)["ndcg_at_1"] == 1.0


def test_errors():
    with pytest.raises(ValueError, match="no query to score"):
        evaluate_run({"a": {"d": 1.0}}, {"b": {"d": 1}})
    with pytest.raises(ValueError, match="NaN"):
        evaluate_run({"a": {"d": float("nan")}}, {"a": {"d": 1}})
    with pytest.raises(ValueError, match="positive integers"):
        evaluate_run({"a": {"d": 1.0}}, {"a": {"d": 1}}, ks=(0, 10))
