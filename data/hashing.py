"""Id hashing, defined here once and for good: a model trained on ids hashed by one release
must see the same rows for the same ids in every later release, process and machine (no
Python `hash`, no seed).

- `hash_ids`: int64 ids outside [0, num_embeddings) under id_policy = "hash".
- `hash_strings`: string / binary ids (UTF-8 bytes as stored), "mbrec-hash64":
      h = 0xCBF29CE484222325                            (FNV-1a's offset basis)
      for each 8-byte little-endian word w of the bytes, the last one zero-padded:
          h = (h XOR w) * 0x9E3779B97F4A7C15 mod 2^64   (an odd multiplier: a bijection of h)
      h = splitmix64_finalizer(h XOR byte_length)
      row = (h >> 1) mod num_embeddings
  Two values of equal length that differ anywhere never collide before the final modulo
  (each step is a bijection of h and injective in w); otherwise collisions are those of a
  64-bit hash. Vectorised over the distinct values of a row group (dictionary encoding), so
  each distinct string is hashed once per row group, not once per row.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

OFFSET = np.uint64(0xCBF29CE484222325)
MULT = np.uint64(0x9E3779B97F4A7C15)


def hash_ids(ids: np.ndarray, num_embeddings: int) -> np.ndarray:
    """Deterministic map of arbitrary int64 ids into [0, num_embeddings): a Fibonacci
    multiplicative hash (x * 0x9E3779B97F4A7C15 mod 2^64, xor-folded by 32 bits), then modulo."""
    h = ids.astype(np.uint64) * MULT
    h ^= h >> np.uint64(32)
    return (h % np.uint64(num_embeddings)).astype(np.int64)


def _finalize(h: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer (Steele et al. 2014): every input bit reaches every output bit."""
    h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


def hash64_distinct(values: pa.Array) -> np.ndarray:
    """mbrec-hash64 of each value of a string / binary array without nulls -> uint64 [n]."""
    values = values.cast(pa.large_binary())
    n = len(values)
    offsets = np.frombuffer(values.buffers()[1], np.int64, n + 1, values.offset * 8)
    data = values.buffers()[2]
    data = np.frombuffer(data, np.uint8) if data is not None else np.zeros(0, np.uint8)
    data = np.concatenate([data[offsets[0]:offsets[-1]], np.zeros(8, np.uint8)])  # padded for the last word
    starts, lengths = offsets[:-1] - offsets[0], np.diff(offsets)
    h = np.full(n, OFFSET, np.uint64)
    byte = np.arange(8)
    with np.errstate(over="ignore"):
        for k in range(int(-(-lengths.max() // 8)) if n else 0):
            active = lengths > 8 * k  # [n]: values with a k-th word
            idx = starts[active, None] + 8 * k + byte  # [a, 8] byte positions
            word = np.where(byte < (lengths[active, None] - 8 * k), data[idx], 0).astype(np.uint8)
            w = np.ascontiguousarray(word).view("<u8").ravel()  # [a] little-endian words
            h[active] = (h[active] ^ w) * MULT
        return _finalize(h ^ lengths.astype(np.uint64))


def hash_strings(arr: pa.Array, num_embeddings: int) -> np.ndarray:
    """String / binary ids (plain or dictionary-encoded, no nulls) -> rows in [0, num_embeddings), int64 [n]."""
    if not pa.types.is_dictionary(arr.type):
        arr = pc.dictionary_encode(arr)
    rows = (hash64_distinct(arr.dictionary) >> np.uint64(1)) % np.uint64(num_embeddings)
    return rows.astype(np.int64)[arr.indices.to_numpy(zero_copy_only=False)]
