"""Make the next micro-batches in a background thread while the accelerator works on this one.

The finetune stages read, sample and tokenise their pairs inside the training worker (train/
pair_batches.py); without this, the GPU waits for that CPU work at every step. The tokenizer (Rust),
pyarrow and torch release the GIL, so the thread runs beside the step. The stream stays in order and
its errors reach the consumer at the item where they happened. A batch carries its own data position,
so a checkpoint records what the loop consumed, not what the thread has read ahead.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import TypeVar

T = TypeVar("T")

_END = object()


class Prefetched(Iterator[T]):
    """`depth` items of `source` made ahead in a daemon thread; close() (or exhaustion) stops it."""

    def __init__(self, source: Iterator[T], depth: int):
        if depth < 1:
            raise ValueError(f"depth must be >= 1 (got {depth})")
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._fill, args=(source,), name="prefetch", daemon=True)
        self._thread.start()

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self, source: Iterator[T]) -> None:
        try:
            for item in source:
                if not self._put(item):
                    return
            self._put(_END)
        except BaseException as e:  # handed to the consumer, raised there
            self._put(e)

    def __next__(self) -> T:
        if self._done:
            raise StopIteration
        item = self._queue.get()
        if item is _END:
            self._done = True
            raise StopIteration
        if isinstance(item, BaseException):
            self._done = True
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def prefetched(source: Iterator[T], depth: int) -> Iterator[T]:
    """`source` itself when depth is 0, else a Prefetched stream of it."""
    return Prefetched(source, depth) if depth > 0 else source
