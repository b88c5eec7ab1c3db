"""The contrastive data path without Ray: pair rows checked and quarantined, the seeded same-dataset
batch plan (coverage, rank slices, exact resume), negative sampling, per-dataset instructions."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow.fs as pafs
import pytest
import torch

from chuxin_ray import demo, storage
from chuxin_ray.config import FinetuneConfig, TrainingConfig
from chuxin_ray.data.pairs import PairFile, dataset_name, read_pairs
from chuxin_ray.stages.finetune import instruction_for, plan_datasets, prepare_file
from chuxin_ray.train.data import DataPosition
from chuxin_ray.train.pair_batches import (
    BLOCK_ROWS,
    PlanSpec,
    Tokenize,
    epoch_plan,
    pair_batches,
    window_batch_counts,
    window_row_ids,
)
from tests.pairs_data import BAD_REASONS, write_pairs


def test_dataset_names():
    assert dataset_name("/d/news.jsonl", "/d") == "news"
    assert dataset_name("/d/more/news2.jsonl.gz", "/d") == "more/news2"
    assert dataset_name("/d/score/data/part-00003.jsonl", "/d/score/data") == "data"
    assert dataset_name("/d/x/part-00001.jsonl", "/d") == "x"
    assert dataset_name("/d/single.jsonl.zst", "/d/single.jsonl.zst") == "single"


def test_bad_rows_are_quarantined_by_reason(tmp_path):
    write_pairs(tmp_path, demo.people_daily()[:60])
    file = PairFile(
        pafs.LocalFileSystem(), str(tmp_path / "news.jsonl"), str(tmp_path / "news.jsonl"), "news", 0
    )
    kept = bad = 0
    reasons: Counter = Counter()
    for k, q in read_pairs(file, group_size=4, need_scores=False, batch_rows=7):
        kept, bad = kept + k.num_rows, bad + q.num_rows
        reasons.update(q.column("reason").to_pylist())
        assert all(raw for raw in q.column("raw").to_pylist())  # the original bytes are kept
    lines = (tmp_path / "news.jsonl").read_bytes().count(b"\n")
    assert kept + bad == lines
    assert dict(reasons) == BAD_REASONS
    # distillation asks for scores: every row without them is quarantined as missing_scores
    reasons = Counter()
    for _, q in read_pairs(file, group_size=4, need_scores=True):
        reasons.update(q.column("reason").to_pylist())
    assert reasons["missing_scores"] == kept


def test_windows_cover_every_row_once():
    spec = PlanSpec(workers=2, batch_size=3, window_batches=5, group_size=4, seed=7)
    for rows in (1, 29, 30, 31, BLOCK_ROWS * 3 + 17):
        counts = window_batch_counts(rows, spec)
        windows = -(-rows // spec.window_rows)
        ids = np.concatenate([window_row_ids(rows, w, spec, epoch=2, dataset=1) for w in range(windows)])
        assert sorted(ids.tolist()) == list(range(rows))
        assert sum(counts) == rows // spec.window_rows * 5 + (rows % spec.window_rows) // spec.global_batch
    rows = BLOCK_ROWS * 3 + 17  # blocks of 30 // 16 = 1 row here

    def epoch_order(epoch: int) -> np.ndarray:
        return np.concatenate(
            [window_row_ids(rows, w, spec, epoch, dataset=1) for w in range(rows // 30 + 1)]
        )

    assert np.array_equal(epoch_order(2), epoch_order(2))
    assert not np.array_equal(epoch_order(2), epoch_order(3))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """The two test datasets checked and written as the finetune stage's pairs/ shards."""
    from transformers import AutoTokenizer

    from tests.pairs_data import tokenizer_dir

    root = tmp_path_factory.mktemp("pairs")
    write_pairs(root / "data", demo.people_daily()[:700], scores=True, bad=False)
    out = storage.resolve(str(root / "out"))
    fs = pafs.LocalFileSystem()
    files = [
        PairFile(
            fs,
            str(root / "data" / name),
            str(root / "data" / name),
            dataset_name(str(root / "data" / name), str(root / "data")),
            i,
        )
        for i, name in enumerate(["more/news2.jsonl.gz", "news.jsonl"])
    ]
    results = [prepare_file(f, out, group_size=4, need_scores=False) for f in files]
    index = {"datasets": [{"name": r["dataset"], "files": r["files"]} for r in results]}
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir(root)))
    return out, index, tokenizer


def stream(prepared, spec, rank, start=None, same_dataset=True, section=None):
    out, index, tokenizer = prepared
    section = section or FinetuneConfig(training=TrainingConfig(steps=1))
    tokenize = Tokenize(tokenizer, 32, 64, instruction_for(section))
    datasets = plan_datasets(index, out, same_dataset)
    return pair_batches(out.fs, datasets, spec, rank, tokenize, start, record_rows=True)


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_plan_slices_batches_across_ranks_one_dataset_each(prepared):
    spec = PlanSpec(workers=2, batch_size=4, window_batches=8, group_size=4, seed=3)
    out, index, _ = prepared
    datasets = plan_datasets(index, out, True)
    per_epoch = len(epoch_plan(datasets, spec, 0))
    ranks = [take(stream(prepared, spec, r), per_epoch + 3) for r in range(2)]
    seen = Counter()
    for i, (a, b) in enumerate(zip(*ranks, strict=True)):
        assert a.position == b.position == DataPosition(i // per_epoch, i % per_epoch)
        assert len(a.rows) == len(b.rows) == 4
        assert not set(a.rows) & set(b.rows)
        names = {r.split("#")[0] for r in a.rows + b.rows}
        assert len(names) == 1  # same-dataset batches
        assert a.passages["input_ids"].size(0) == 4 * 4
        assert a.teacher_scores is not None and a.teacher_scores.shape == (4, 4)
        if i < per_epoch:
            seen.update(a.rows + b.rows)
    assert max(seen.values()) == 1  # no row twice in an epoch
    total = sum(d.rows for d in datasets)
    assert len(seen) == per_epoch * spec.global_batch > total - 2 * spec.global_batch * len(datasets)


def test_resume_continues_the_stream_exactly(prepared):
    spec = PlanSpec(workers=2, batch_size=4, window_batches=8, group_size=4, seed=3)
    out, index, _ = prepared
    per_epoch = len(epoch_plan(plan_datasets(index, out, True), spec, 0))
    full = take(stream(prepared, spec, 1), per_epoch + 4)
    for start in (5, per_epoch - 1, per_epoch + 1):
        resumed = take(stream(prepared, spec, 1, DataPosition(start // per_epoch, start % per_epoch)), 3)
        for a, b in zip(full[start : start + 3], resumed, strict=True):
            assert a.position == b.position and a.rows == b.rows
            assert torch.equal(a.queries["input_ids"], b.queries["input_ids"])
            assert torch.equal(a.passages["input_ids"], b.passages["input_ids"])
            assert torch.equal(a.teacher_scores, b.teacher_scores)


def test_mixed_batches_and_instructions(prepared):
    spec = PlanSpec(workers=1, batch_size=16, window_batches=4, group_size=4, seed=1)
    section = FinetuneConfig(
        training=TrainingConfig(steps=1), query_instruction="默认：", query_instructions={"news": "新闻："}
    )
    _, _, tokenizer = prepared
    batches = take(stream(prepared, spec, 0, same_dataset=False, section=section), 6)
    assert any(len({r.split("#")[0] for r in b.rows}) == 2 for b in batches)  # datasets mix
    for b in batches:
        texts = tokenizer.batch_decode(b.queries["input_ids"], skip_special_tokens=True)
        for row, text in zip(b.rows, texts, strict=True):
            prefix = "新闻：" if row.startswith("news#") else "默认："
            assert text.replace(" ", "").startswith(prefix)


def test_too_few_negatives_are_resampled_from_the_list(prepared, tmp_path):
    from chuxin_ray.train.pair_batches import draw_group

    spec = PlanSpec(workers=1, batch_size=1, window_batches=1, group_size=8, seed=0)
    row = {
        "dataset": "d",
        "row": 5,
        "query": "q",
        "prompt": None,
        "pos": ["p0", "p1"],
        "neg": ["n0", "n1", "n2"],
        "pos_scores": [0.9, 0.8],
        "neg_scores": [0.1, 0.2, 0.3],
    }
    group = draw_group(row, spec, epoch=0, dataset=0)
    assert len(group.passages) == 8 and group.passages[0] in ("p0", "p1")
    assert Counter(group.passages[1:]) <= Counter({"n0": 3, "n1": 3, "n2": 3})
    assert set(group.passages[1:]) == {"n0", "n1", "n2"}  # 7 of 3 x 3: every negative at least once
    scores = dict(zip(["p0", "p1", "n0", "n1", "n2"], [0.9, 0.8, 0.1, 0.2, 0.3], strict=True))
    assert group.scores == [scores[p] for p in group.passages]
    assert draw_group(row, spec, epoch=0, dataset=0) == group  # seeded by the row
    assert draw_group(row, spec, epoch=1, dataset=0) != group
