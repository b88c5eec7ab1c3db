"""Exact deduplication across the whole corpus: each text's key is a hash of its normalised text.

`text_hashes` gives a 128-bit blake2b hash of each normalised text as two int64 halves. 128 bits: at
1e9 texts a 64-bit hash would already merge two distinct texts with probability ~3%, 128 bits ~1e-21.
`partition_of` spreads keys over the claim partitions (data/key_claims.py, one Ray actor each), so
every copy of a text is claimed in one partition and no worker holds every key.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa

from chuxin_ray.data.cleaning import normalize_for_dedup, string_bytes


def text_hashes(texts: pa.Array, mode: str) -> np.ndarray:
    """(n, 2) int64: blake2b-128 of each normalised text."""
    # each text's UTF-8 bytes hashed where Arrow holds them, no Python string made
    offsets, data = string_bytes(normalize_for_dedup(texts, mode))  # (n + 1,)
    bounds = zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True)
    digests = b"".join([hashlib.blake2b(data[start:end], digest_size=16).digest() for start, end in bounds])
    return np.frombuffer(digests, dtype="<i8").reshape(-1, 2)  # (n, 2)


def first_copies(keys: np.ndarray) -> np.ndarray:
    """(f,) ascending indices of the first row of each distinct key among (n, 2) `keys`."""
    return np.sort(np.unique(keys, axis=0, return_index=True)[1])


def partition_of(values: np.ndarray, parts: int) -> np.ndarray:
    """(n,) int64 in [0, parts) for (n,) int64 `values`: a multiplicative hash (Fibonacci hashing) of
    each, so values with structure in their low bits spread as evenly as random ones."""
    mixed = values.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)  # wraps mod 2**64
    return ((mixed >> np.uint64(32)) % np.uint64(parts)).astype(np.int64)
