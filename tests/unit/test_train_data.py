"""Length-bucketed micro-batches: padding, truncation, coverage, and exact resume from a DataPosition."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from chuxin_ray import storage
from chuxin_ray.config import ConfigError
from chuxin_ray.train.data import (
    DataPosition,
    bucket_order,
    length_bucketed_batches,
    pad_rows,
    token_shards,
)

PAD, BOS, EOS = 1, 0, 2


def rows_table(lengths: list[int], first_id: int = 0) -> pa.Table:
    """Rows <s> k k ... </s> of the given lengths, where k = 10 + row number (so rows are recognisable)."""
    ids = [
        [BOS] + [10 + first_id + i] * (n - 2) + [EOS] if n >= 2 else [BOS] * n for i, n in enumerate(lengths)
    ]
    return pa.table(
        {
            "id": [f"r{first_id + i}" for i in range(len(lengths))],
            "window": pa.array([0] * len(lengths), pa.int32()),
            "input_ids": pa.array(ids, pa.list_(pa.int32())),
            "length": pa.array([len(x) for x in ids], pa.int32()),
        }
    )


def test_pad_rows_pads_to_a_multiple_of_8_and_keeps_the_closing_token_of_cut_rows():
    table = rows_table([5, 3, 30])
    ids, mask = pad_rows(table.column("input_ids"), np.array([0, 1]), max_length=16, pad_id=PAD)
    assert ids.shape == mask.shape == (2, 8) and ids.dtype == torch.int64
    assert ids[0].tolist() == [BOS, 10, 10, 10, EOS, PAD, PAD, PAD]
    assert mask[1].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]

    ids, mask = pad_rows(table.column("input_ids"), np.array([2, 0]), max_length=12, pad_id=PAD)
    assert ids.shape == (2, 12)  # the multiple of 8 (16) is capped at max_length
    assert ids[0].tolist() == [BOS] + [12] * 10 + [EOS]  # first 11 tokens + the closing one
    assert mask[0].all()


def test_pad_rows_reads_a_sliced_column_and_empty_rows():
    table = rows_table([4, 6, 2, 0, 9])
    column = table.column("input_ids").combine_chunks().slice(1, 3)  # rows 1, 2, 3: offsets do not start at 0
    ids, mask = pad_rows(column, np.array([0, 1, 2]), max_length=64, pad_id=PAD)
    assert ids[0, :6].tolist() == [BOS, 11, 11, 11, 11, EOS]
    assert ids[1, :2].tolist() == [BOS, EOS] and mask[1].sum() == 2
    assert mask[2].sum() == 0 and (ids[2] == PAD).all()


def test_bucket_order_covers_every_row_once_and_cuts_padding():
    rng = np.random.default_rng(0)
    lengths = rng.zipf(1.6, 4096).clip(3, 512)  # (N,) heavy-tailed like real paragraphs
    batches = bucket_order(lengths, 32, np.random.default_rng(1))
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(lengths)))
    assert all(len(b) == 32 for b in batches)

    def padding(groups):
        slots = sum(len(g) * lengths[g].max() for g in groups)
        return 1 - lengths.sum() / slots

    random_batches = np.array_split(rng.permutation(len(lengths)), len(lengths) // 32)
    assert padding(batches) < 0.1 and padding(random_batches) > 0.9  # measured: 0.07 and 0.92


def chunked_epochs(tables: list[pa.Table], chunk_rows: int, reads: list[int] | None = None):
    whole = pa.concat_tables(tables)

    def read_epoch(epoch: int):
        if reads is not None:
            reads.append(epoch)
        for start in range(0, whole.num_rows, chunk_rows):
            yield whole.slice(start, chunk_rows)

    return read_epoch


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_stream_covers_each_epoch_once_and_resumes_exactly_anywhere():
    lengths = np.random.default_rng(3).integers(2, 40, 50).tolist()
    read_epoch = chunked_epochs([rows_table(lengths)], chunk_rows=12)  # chunks of 12, 12, 12, 12, 2 rows
    kwargs = dict(batch_size=4, bucket_batches=3, max_length=32, pad_id=PAD, seed=5, rank=1, record_rows=True)
    per_epoch = 3 + 3 + 3 + 3 + 1
    full = take(length_bucketed_batches(read_epoch, **kwargs), 3 * per_epoch)

    for epoch in range(3):
        batches = full[epoch * per_epoch : (epoch + 1) * per_epoch]
        assert [b.position for b in batches] == [DataPosition(epoch, i) for i in range(per_epoch)]
        assert sorted(r for b in batches for r in b.rows) == sorted(f"r{i}#0" for i in range(50))
    assert [b.rows for b in full[:per_epoch]] != [
        b.rows for b in full[per_epoch : 2 * per_epoch]
    ]  # reshuffled

    for resume_at in (1, 7, per_epoch - 1, per_epoch, per_epoch + 4):
        position = full[resume_at - 1].position.next()
        resumed = take(length_bucketed_batches(read_epoch, start=position, **kwargs), 5)
        for a, b in zip(full[resume_at : resume_at + 5], resumed, strict=True):
            assert a.position == b.position and a.seed == b.seed and a.rows == b.rows
            assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.attention_mask, b.attention_mask)


def test_batch_seeds_differ_across_ranks_and_batches():
    read_epoch = chunked_epochs([rows_table([5] * 16)], chunk_rows=8)
    kwargs = dict(batch_size=4, bucket_batches=2, max_length=16, pad_id=PAD, seed=5)
    rank0 = [b.seed for b in take(length_bucketed_batches(read_epoch, rank=0, **kwargs), 8)]
    rank1 = [b.seed for b in take(length_bucketed_batches(read_epoch, rank=1, **kwargs), 8)]
    assert len(set(rank0 + rank1)) == 16


def test_an_empty_shard_raises_instead_of_spinning():
    read_epoch = chunked_epochs([rows_table([])], chunk_rows=8)
    stream = length_bucketed_batches(
        read_epoch, batch_size=4, bucket_batches=2, max_length=16, pad_id=PAD, seed=0, rank=0
    )
    with pytest.raises(RuntimeError, match="no rows"):
        next(stream)


def test_token_shards_from_a_manifest_a_folder_or_an_error(tmp_path):
    out = storage.resolve(str(tmp_path / "tok"))
    with pytest.raises(ConfigError, match="pretrain.input: no token-id Parquet files"):
        token_shards(out, "pretrain.input")
    (tmp_path / "tok" / "data").mkdir(parents=True)
    for name in ("a", "b"):
        pq.write_table(rows_table([4]), tmp_path / "tok" / "data" / f"{name}.parquet")
    assert [p.rsplit("/", 1)[1] for p in token_shards(out, "pretrain.input")] == ["a.parquet", "b.parquet"]

    manifest = {"status": "running"}
    (tmp_path / "tok" / "_manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="incomplete stage output"):
        token_shards(out, "pretrain.input")
    manifest = {"status": "complete", "files": {"data": [{"path": "data/b.parquet", "rows": 1}]}}
    (tmp_path / "tok" / "_manifest.json").write_text(json.dumps(manifest))
    assert token_shards(out, "pretrain.input") == [str(tmp_path / "tok" / "data" / "b.parquet")]
