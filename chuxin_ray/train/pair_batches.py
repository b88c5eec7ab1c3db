"""Contrastive training batches: a seeded plan of same-dataset global batches that a resumed run
continues exactly, read lazily from the prepared pair shards.

    prepared pairs (Parquet, BLOCK_ROWS-row groups, one dataset per file list)
      -> per dataset and epoch: blocks of `block_rows` rows in a seeded order, cut into windows of
         `window_batches` global batches; in a window rows are shuffled, sorted by passage length and
         cut into global batches of `workers * batch_size` rows, whose order is shuffled again
      -> the epoch's plan: every dataset's batch count, interleaved in a seeded order
         (same_dataset_batches: each global batch comes from one dataset)
      -> global batch j -> rank r takes rows [r*B, (r+1)*B); each row draws its positive and G-1
         negatives (seeded by the row), then the worker tokenises queries and passages

Every draw is seeded by (seed, epoch, dataset, window or row), never by the rank or the history, so
the batch at position (epoch, j) is the same on every run: a checkpoint stores (epoch, j) and a resumed
worker starts there, reading only the window that holds batch j. All ranks read the same windows (each
keeps its slice); a window holds `window_batches * workers * batch_size` rows of one dataset.

FlagEmbedding's same-dataset sampler shuffles each dataset fully in memory; here the shuffle is by block
then within a window, so memory stays bounded by a window per dataset at any corpus size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from chuxin_ray.data.row_ranges import InputFile
from chuxin_ray.models.sentencepiece_ids import SentencePieceIds
from chuxin_ray.train.data import PAD_MULTIPLE, DataPosition, pad_rows

BLOCK_ROWS = 256  # rows per row group of the prepared pairs: the unit of a random read
COLUMNS = ["dataset", "row", "query", "pos", "neg", "pos_scores", "neg_scores", "prompt"]


@dataclass(frozen=True)
class PairDataset:
    """The prepared shards of one dataset (or of all, mixed), in order; rows are numbered across them."""

    name: str
    files: tuple[InputFile, ...]

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)


@dataclass(frozen=True)
class PlanSpec:
    workers: int
    batch_size: int  # per worker
    window_batches: int  # global batches per shuffle window
    group_size: int
    seed: int

    @property
    def global_batch(self) -> int:
        return self.workers * self.batch_size

    @property
    def window_rows(self) -> int:
        return self.window_batches * self.global_batch

    @property
    def block_rows(self) -> int:
        """Rows kept together by the shuffle: a row group, or less, so that a window spans >= 16 blocks
        (small windows would otherwise hold one or two row groups' rows only)."""
        return max(1, min(BLOCK_ROWS, self.window_rows // 16))


def window_batch_counts(rows: int, spec: PlanSpec) -> list[int]:
    """Global batches in each window of a dataset of `rows` rows; the last window's leftover rows (fewer
    than a global batch) sit the epoch out."""
    full, rest = divmod(rows, spec.window_rows)
    counts = [spec.window_batches] * full
    if rest // spec.global_batch:
        counts.append(rest // spec.global_batch)
    return counts


def epoch_plan(datasets: list[PairDataset], spec: PlanSpec, epoch: int) -> np.ndarray:
    """Dataset index of each global batch of the epoch: (batches,) int64, interleaved in a seeded order."""
    labels = np.concatenate(
        [np.full(sum(window_batch_counts(d.rows, spec)), i, dtype=np.int64) for i, d in enumerate(datasets)]
    )  # (batches,)
    return np.random.default_rng([spec.seed, epoch]).permutation(labels)  # (batches,)


def window_row_ids(rows: int, window: int, spec: PlanSpec, epoch: int, dataset: int) -> np.ndarray:
    """Dataset row numbers of one window, in block order: (<= window_rows,) int64."""
    size = spec.block_rows
    blocks = math.ceil(rows / size)
    order = np.random.default_rng([spec.seed, epoch, dataset]).permutation(blocks)  # (blocks,)
    sizes = np.minimum(size, rows - order * size)  # (blocks,)
    ends = np.cumsum(sizes)  # (blocks,) position after each block in the permuted sequence
    start, stop = window * spec.window_rows, min((window + 1) * spec.window_rows, rows)
    first, last = np.searchsorted(ends, start, "right"), np.searchsorted(ends, stop - 1, "right")
    ids = np.concatenate(
        [
            np.arange(b * size, b * size + s)
            for b, s in zip(order[first : last + 1], sizes[first : last + 1], strict=True)
        ]
    )  # rows of the blocks that overlap the window
    offset = start - (ends[first] - sizes[first])  # window start within the first block
    return ids[offset : offset + stop - start]


def read_rows(fs: pafs.FileSystem, files: tuple[InputFile, ...], ids: np.ndarray) -> pa.Table:
    """Rows `ids` (dataset row numbers) of the shards, in that order. Only the row groups holding them
    are decoded; the shards have BLOCK_ROWS-row groups (the last of a file may be shorter)."""
    starts = np.cumsum([0] + [f.rows for f in files])  # (F+1,) dataset row of each shard's row 0
    file_of = np.searchsorted(starts, ids, "right") - 1  # (N,)
    index = np.empty(len(ids), dtype=np.int64)  # (N,) position in the concatenated groups
    parts, at = [], 0
    for i in np.unique(file_of):
        mine = file_of == i
        local = ids[mine] - starts[i]  # rows within the shard
        groups = np.unique(local // BLOCK_ROWS)  # sorted; only the shard's last group is short
        with fs.open_input_file(files[i].path) as f:
            table = pq.ParquetFile(f).read_row_groups(groups.tolist(), columns=COLUMNS)
        index[mine] = at + np.searchsorted(groups, local // BLOCK_ROWS) * BLOCK_ROWS + local % BLOCK_ROWS
        parts.append(table)
        at += table.num_rows
    return pa.concat_tables(parts).take(pa.array(index))


def passage_lengths(table: pa.Table) -> np.ndarray:
    """Mean characters per listed passage of each row: the length the batches are bucketed by. (N,)"""
    lengths = []
    for name in ("pos", "neg"):
        column = table.column(name).combine_chunks()
        chars = pc.utf8_length(pc.list_flatten(column)).to_numpy(zero_copy_only=False)  # (P,)
        offsets = column.offsets.to_numpy()  # (N+1,)
        sums = np.add.reduceat(np.append(chars, 0), offsets[:-1]) * (np.diff(offsets) > 0)  # (N,)
        lengths.append((sums, np.diff(offsets)))
    total = lengths[0][0] + lengths[1][0]
    count = np.maximum(lengths[0][1] + lengths[1][1], 1)
    return total / count  # (N,)


def window_batches(
    table: pa.Table, spec: PlanSpec, epoch: int, dataset: int, window: int
) -> list[np.ndarray]:
    """A window's rows cut into global batches of similar passage length, in seeded random order."""
    rng = np.random.default_rng([spec.seed, epoch, dataset, window, 1])
    perm = rng.permutation(table.num_rows)  # (N,)
    order = perm[np.argsort(passage_lengths(table)[perm], kind="stable")]  # (N,)
    batches = [
        order[i : i + spec.global_batch]
        for i in range(0, table.num_rows - spec.global_batch + 1, spec.global_batch)
    ]
    return [batches[i] for i in rng.permutation(len(batches))]


@dataclass
class Group:
    """One example: the query, and G passages with the positive first."""

    dataset: str
    row: int
    query: str
    prompt: str | None
    passages: list[str]
    scores: list[float] | None


def draw_group(row: dict, spec: PlanSpec, epoch: int, dataset: int) -> Group:
    """The positive and G-1 negatives of one row, seeded by the row: a random positive; negatives
    without replacement, or resampled from the list repeated when it is too short (FlagEmbedding's
    rule)."""
    rng = np.random.default_rng([spec.seed, epoch, dataset, row["row"], 2])
    pos_index = int(rng.integers(len(row["pos"])))
    negatives = spec.group_size - 1
    neg_index: list[int] = []
    if negatives:
        pool = np.arange(len(row["neg"]))
        if len(pool) < negatives:
            pool = np.tile(pool, math.ceil(negatives / len(pool)))
        neg_index = rng.choice(pool, size=negatives, replace=False).tolist()
    scores = None
    if row["pos_scores"] is not None and row["neg_scores"] is not None:
        scores = [row["pos_scores"][pos_index], *(row["neg_scores"][i] for i in neg_index)]
    return Group(
        dataset=row["dataset"],
        row=row["row"],
        query=row["query"],
        prompt=row["prompt"],
        passages=[row["pos"][pos_index], *(row["neg"][i] for i in neg_index)],
        scores=scores,
    )


@dataclass
class PairBatch:
    """One worker's micro-batch: B queries and B*G passages (B groups of G, positive first)."""

    queries: dict[str, torch.Tensor]  # input_ids, attention_mask: (B, Lq)
    passages: dict[str, torch.Tensor]  # input_ids, attention_mask: (B*G, Lp)
    teacher_scores: torch.Tensor | None  # (B, G) float32, positive first; None without scores
    position: DataPosition
    rows: list[str] | None = field(default=None)  # "dataset#row", when recorded

    @property
    def samples(self) -> int:
        return self.queries["input_ids"].size(0)

    @property
    def tokens(self) -> int:
        return int(self.queries["attention_mask"].sum() + self.passages["attention_mask"].sum())

    @property
    def slots(self) -> int:
        return self.queries["attention_mask"].numel() + self.passages["attention_mask"].numel()

    def to(self, device: torch.device) -> PairBatch:
        def move(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {k: v.to(device, non_blocking=True) for k, v in d.items()}

        teacher = self.teacher_scores
        return replace(
            self,
            queries=move(self.queries),
            passages=move(self.passages),
            teacher_scores=teacher.to(device) if teacher is not None else None,
        )


@dataclass
class Tokenize:
    """Queries (with their instruction) and passages -> padded id tensors. An XLM-R tokenizer's ids
    come from SentencePiece's encoder when it qualifies (models/sentencepiece_ids.py: the same ids,
    ~10x faster on Chinese text); `sentencepiece=False` keeps the tokenizer's own path."""

    tokenizer: object
    query_max_length: int
    passage_max_length: int
    instruction: Callable[[Group], str]
    sentencepiece: bool = True

    def __post_init__(self):
        self.fast = SentencePieceIds.for_tokenizer(self.tokenizer) if self.sentencepiece else None

    def encode(self, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
        if self.fast is not None:
            ids = pa.array(self.fast.ids(texts, max_length), pa.list_(pa.int32()))
            input_ids, attention_mask = pad_rows(
                ids, np.arange(len(ids)), max_length, self.tokenizer.pad_token_id
            )
            return {"input_ids": input_ids, "attention_mask": attention_mask}
        out = self.tokenizer(
            texts,
            max_length=max_length,
            truncation=True,
            padding="longest",
            pad_to_multiple_of=PAD_MULTIPLE,
            return_tensors="pt",
            return_token_type_ids=False,
        )
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}

    def __call__(self, groups: list[Group]) -> tuple[dict, dict]:
        queries = self.encode([self.instruction(g) + g.query for g in groups], self.query_max_length)
        passages = self.encode([p for g in groups for p in g.passages], self.passage_max_length)
        return queries, passages


class _DatasetCursor:
    """The batches of one dataset in one epoch, by index, holding one window at a time."""

    def __init__(self, fs: pafs.FileSystem, dataset: PairDataset, index: int, spec: PlanSpec, epoch: int):
        self.fs, self.dataset, self.index, self.spec, self.epoch = fs, dataset, index, spec, epoch
        self.ends = np.cumsum(window_batch_counts(dataset.rows, spec))  # (windows,)
        self.window = -1
        self.table: pa.Table | None = None
        self.batches: list[np.ndarray] = []

    def batch(self, k: int) -> pa.Table:
        window = int(np.searchsorted(self.ends, k, "right"))
        if window != self.window:
            ids = window_row_ids(self.dataset.rows, window, self.spec, self.epoch, self.index)
            self.table = read_rows(self.fs, self.dataset.files, ids)
            self.batches = window_batches(self.table, self.spec, self.epoch, self.index, window)
            self.window = window
        first = int(self.ends[window - 1]) if window else 0
        return self.table.take(pa.array(self.batches[k - first]))


def pair_batches(
    fs: pafs.FileSystem,
    datasets: list[PairDataset],
    spec: PlanSpec,
    rank: int,
    tokenize: Tokenize,
    start: DataPosition | None = None,
    record_rows: bool = False,
) -> Iterator[PairBatch]:
    """This rank's micro-batches from `start` on, epoch after epoch, without end."""
    position = start or DataPosition()
    epoch, j = position.epoch, position.batch
    while True:
        plan = epoch_plan(datasets, spec, epoch)
        if len(plan) == 0:
            raise RuntimeError(
                f"no dataset has a global batch of {spec.global_batch} rows "
                f"({spec.workers} workers x batch_size {spec.batch_size})"
            )
        if j > len(plan):
            raise RuntimeError(
                f"resume position {position} is past the end of epoch {epoch} ({len(plan)} batches): "
                "the data or the batch settings changed since the checkpoint"
            )
        cursors: dict[int, _DatasetCursor] = {}
        seen = np.zeros(len(datasets), dtype=np.int64)
        np.add.at(seen, plan[:j], 1)  # batches of each dataset before position j
        for index in range(j, len(plan)):
            d = int(plan[index])
            if d not in cursors:
                cursors[d] = _DatasetCursor(fs, datasets[d], d, spec, epoch)
            table = cursors[d].batch(int(seen[d]))
            seen[d] += 1
            mine = table.slice(rank * spec.batch_size, spec.batch_size).to_pylist()
            groups = [draw_group(row, spec, epoch, d) for row in mine]
            queries, passages = tokenize(groups)
            teacher = None
            if all(g.scores is not None for g in groups):
                teacher = torch.tensor([g.scores for g in groups], dtype=torch.float32)  # (B, G)
            yield PairBatch(
                queries=queries,
                passages=passages,
                teacher_scores=teacher,
                position=DataPosition(epoch, index),
                rows=[f"{g.dataset}#{g.row}" for g in groups] if record_rows else None,
            )
        epoch, j = epoch + 1, 0
