"""The claim table against a plain dict that does the same: the lowest order owns each key."""

from __future__ import annotations

import numpy as np

from chuxin_ray.data.key_claims import ClaimTable


class PlainClaims:
    """The reference: key -> (order, shard), one key at a time."""

    def __init__(self):
        self.owner: dict[tuple[int, int], tuple[int, int]] = {}
        self.displaced: list[tuple[int, int, int]] = []

    def claim(self, high, low, order, shard) -> list[bool]:
        owned = []
        for key in zip(high.tolist(), low.tolist(), strict=True):
            o = int(order[len(owned)])
            held = self.owner.get(key)
            if held is None or o < held[0]:
                if held is not None:
                    self.displaced.append((held[1], *key))
                self.owner[key] = (o, shard)
            owned.append(self.owner[key][0] == o)
        return owned


def blocks_of(rng, n_keys: int, n_blocks: int, rows: int, shared_high: bool):
    """Blocks of distinct keys drawn from a pool (so blocks share keys), with increasing orders;
    with `shared_high` half the keys share their high half: only the pair tells them apart."""
    pool = rng.integers(-(2**63), 2**63 - 1, size=(n_keys, 2), dtype=np.int64)
    if shared_high:
        pool[: n_keys // 2, 0] = 7  # and half share the high half: only the pair tells them apart
        pool = np.unique(pool, axis=0)
    blocks = []
    for b in range(n_blocks):
        pick = rng.choice(len(pool), size=min(rows, len(pool)), replace=False)
        blocks.append((b, pool[pick, 0], pool[pick, 1], b * 10_000 + np.arange(len(pick), dtype=np.int64)))
    return blocks


def run_both(blocks, table: ClaimTable):
    plain = PlainClaims()
    for shard, high, low, order in blocks:
        got = table.claim(high, low, order, shard)
        assert got.tolist() == plain.claim(high, low, order, shard)
    return plain


def test_claims_match_the_plain_reference_in_any_block_order_and_growing():
    rng = np.random.default_rng(0)
    for shared_high in (False, True):
        blocks = blocks_of(rng, 3000, 40, 400, shared_high)
        rng.shuffle(blocks)  # blocks claim out of corpus order: later copies come first
        table = ClaimTable(capacity=8)  # grows many times
        plain = run_both(blocks, table)
        assert table.size == len(plain.owner)
        d = table.all_displaced()
        assert sorted(zip(d.shard.tolist(), d.high.tolist(), d.low.tolist(), strict=True)) == sorted(
            plain.displaced
        )
        assert len(plain.displaced) > 100  # shuffled blocks displace copies


def test_in_order_blocks_displace_nothing_and_a_retried_block_owns_the_same_keys():
    rng = np.random.default_rng(1)
    blocks = blocks_of(rng, 2000, 20, 300, False)
    table = ClaimTable()
    owned = [table.claim(h, lo, o, s).copy() for s, h, lo, o in blocks]
    assert len(table.all_displaced().shard) == 0
    assert sum(int(x.sum()) for x in owned) == table.size < 20 * 300  # blocks share keys
    for (s, h, lo, o), first in zip(blocks, owned, strict=True):  # every block retried
        assert table.claim(h, lo, o, s).tolist() == first.tolist()
    assert len(table.all_displaced().shard) == 0


def test_an_empty_claim():
    empty = np.zeros(0, np.int64)
    table = ClaimTable()
    assert table.claim(empty, empty, empty, 3).tolist() == []
    assert table.size == 0
