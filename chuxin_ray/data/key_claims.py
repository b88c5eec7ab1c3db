"""Which copy of each text survives deduplication, decided while the corpus is read.

A `ClaimTable` holds one partition of the dedup keys (128-bit hashes of normalised texts, see
data/dedup.py) with the copy that owns each: its global `order` (file, then row) and the shard it
was written to. A block claims its keys before it writes; the copy with the lowest order owns a key:
  - a key nobody holds: the block owns it and writes the row;
  - held by a lower order: the row is a duplicate and is not written;
  - held by the same order: a retried block claiming again, it still owns it (claims are idempotent);
  - held by a higher order (a later copy whose block ran first): the block takes it over, and the
    shard of the copy it displaces is recorded, to be rewritten without it when every block is in.
So the survivor is the first copy in corpus order whatever order the blocks run in, and only shards
holding a displaced copy are written twice. Blocks run roughly in corpus order, so that is rare.

The table is open addressing with linear probing over numpy arrays, claimed a whole block at a time:
32 bytes a slot, at most half the slots used. `KeyClaims` is the Ray actor that holds one partition's
table; it lives here, not in stages/ingest.py, so that starting one imports numpy and Ray only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import ray

EMPTY = -1  # `order` of an unused slot (orders are >= 0)
MAX_LOAD = 0.5


@dataclass
class Displaced:
    """Copies that lost their key to an earlier copy after they were written: (m,) each."""

    shard: np.ndarray  # int64, where the copy was written
    high: np.ndarray  # int64, its key
    low: np.ndarray  # int64

    @classmethod
    def concat(cls, parts: list[Displaced]) -> Displaced:
        """All of `parts` as one."""
        if not parts:
            return cls(*(np.zeros(0, np.int64) for _ in range(3)))
        return cls(*(np.concatenate([getattr(d, f) for d in parts]) for f in ("shard", "high", "low")))


class ClaimTable:
    def __init__(self, capacity: int = 1 << 16):
        self._allocate(max(8, 1 << (capacity - 1).bit_length()))
        self.size = 0
        self.displaced: list[Displaced] = []

    def _allocate(self, capacity: int) -> None:
        self.mask = capacity - 1
        self.high = np.zeros(capacity, np.int64)  # (S,) key, high 64 bits
        self.low = np.zeros(capacity, np.int64)  # (S,) key, low 64 bits; the probe starts from these
        self.order = np.full(capacity, EMPTY, np.int64)  # (S,) the owner's order; EMPTY: free slot
        self.shard = np.zeros(capacity, np.int64)  # (S,) the owner's shard

    def claim(self, high: np.ndarray, low: np.ndarray, order: np.ndarray, shard: int) -> np.ndarray:
        """(n,) bool: which of n keys (distinct, all of one block written to `shard`) the block owns
        after this call. Keys taken over from a later copy add that copy to `self.displaced`."""
        self._reserve(self.size + len(high))
        owned = np.zeros(len(high), dtype=bool)
        slot, found = self._locate(high, low)  # (n,), (n,)

        held = np.flatnonzero(found)  # keys someone holds
        theirs, ours = self.order[slot[held]], order[held]  # (h,), (h,)
        owned[held] = ours <= theirs
        taken = held[ours < theirs]
        if len(taken):
            self.displaced.append(Displaced(self.shard[slot[taken]].copy(), high[taken], low[taken]))
            self.order[slot[taken]], self.shard[slot[taken]] = order[taken], shard

        new = np.flatnonzero(~found)  # keys nobody holds
        self._insert(high[new], low[new], order[new], np.full(len(new), shard, np.int64), slot[new])
        owned[new] = True
        return owned

    def _insert(self, high, low, order, shard, slot) -> None:
        """Put n keys nobody holds into the table, each into the free `slot` its probe found."""
        todo = np.arange(len(high))
        while len(todo):
            # two keys may have found the same free slot: the first takes it, the rest probe on
            _, first = np.unique(slot[todo], return_index=True)
            placed, s = todo[first], slot[todo[first]]
            self.high[s], self.low[s], self.order[s], self.shard[s] = (
                high[placed],
                low[placed],
                order[placed],
                shard[placed],
            )
            self.size += len(placed)
            todo = np.delete(todo, first)
            slot[todo], _ = self._locate(high[todo], low[todo])

    def _locate(self, high: np.ndarray, low: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(n,) slot of each key: where it is held, or the first free slot on its probe sequence;
        (n,) bool: held."""
        slot = low.view(np.uint64) & np.uint64(self.mask)  # (n,) the hash is random: its bits will do
        slot = slot.astype(np.int64)
        found = np.zeros(len(high), dtype=bool)
        todo = np.arange(len(high))
        while len(todo):
            s = slot[todo]
            used = self.order[s] != EMPTY
            hit = used & (self.high[s] == high[todo]) & (self.low[s] == low[todo])
            found[todo[hit]] = True
            on = used & ~hit  # another key sits here: try the next slot
            slot[todo[on]] = (s[on] + 1) & self.mask
            todo = todo[on]
        return slot, found

    def _reserve(self, size: int) -> None:
        """Grow (doubling) until `size` keys keep the table at most MAX_LOAD full."""
        capacity = self.mask + 1
        if size <= capacity * MAX_LOAD:
            return
        while size > capacity * MAX_LOAD:
            capacity *= 2
        used = np.flatnonzero(self.order != EMPTY)
        held = self.high[used], self.low[used], self.order[used], self.shard[used]
        self._allocate(capacity)
        self.size = 0
        self._insert(*held, self._locate(held[0], held[1])[0])

    def all_displaced(self) -> Displaced:
        """Every copy displaced so far."""
        return Displaced.concat(self.displaced)


@ray.remote(num_cpus=0)
class KeyClaims:
    """One hash partition of the ingest stage's dedup keys and the copy that owns each."""

    def __init__(self):
        self.table = ClaimTable()

    def claim(self, high: np.ndarray, low: np.ndarray, order: np.ndarray, shard: int) -> np.ndarray:
        return self.table.claim(high, low, order, shard)

    def all_displaced(self) -> Displaced:
        return self.table.all_displaced()
