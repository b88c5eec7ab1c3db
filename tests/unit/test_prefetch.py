"""train/prefetch.py against the plain stream: the same items in the same order, errors raised at the
consumer where they happened, and the thread stopped on close, also over an endless source."""

from __future__ import annotations

import itertools
import threading
import time

import pytest

from chuxin_ray.train.prefetch import Prefetched, prefetched


def slow_squares(n: int):
    for i in range(n):
        time.sleep(0.001)
        yield i * i


@pytest.mark.parametrize("depth", [1, 2, 5])
def test_same_items_in_order_as_the_plain_stream(depth):
    assert list(Prefetched(slow_squares(50), depth)) == list(slow_squares(50))


def test_depth_zero_is_the_source_itself():
    source = iter([1, 2])
    assert prefetched(source, 0) is source and isinstance(prefetched(iter([]), 1), Prefetched)
    with pytest.raises(ValueError, match="depth must be >= 1"):
        Prefetched(iter([]), 0)


def test_an_error_reaches_the_consumer_after_the_items_before_it():
    def failing():
        yield from range(3)
        raise RuntimeError("bad row 3")

    stream = Prefetched(failing(), 2)
    assert [next(stream) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(RuntimeError, match="bad row 3"):
        next(stream)
    with pytest.raises(StopIteration):
        next(stream)


def test_reads_ahead_at_most_depth_items_and_close_stops_an_endless_source():
    made = []

    def endless():
        for i in itertools.count():
            made.append(i)
            yield i

    stream = Prefetched(endless(), 2)
    assert next(stream) == 0
    time.sleep(0.3)
    # one consumed, `depth` queued, one made and waiting to be queued
    assert len(made) <= 1 + 2 + 1
    stream.close()
    assert not any(t.name == "prefetch" and t.is_alive() for t in threading.enumerate())
