"""mbrec-hash64 against a literal per-byte implementation of its definition, golden values
(a release that changes them would move every trained id), and string ids in the reader."""
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.batch import COUNTERS
from data.errors import DataError
from data.hashing import hash64_distinct, hash_strings
from data.reader import DataSource
from data.schema import DataConfig, SparseFeature, Task

M64 = (1 << 64) - 1


def reference(b: bytes) -> int:
    """The definition in data/hashing.py, one byte string at a time."""
    h = 0xCBF29CE484222325
    for k in range(0, len(b), 8):
        h = ((h ^ int.from_bytes(b[k:k + 8].ljust(8, b"\0"), "little")) * 0x9E3779B97F4A7C15) & M64
    h ^= len(b)
    h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & M64
    h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & M64
    return h ^ (h >> 31)


def test_matches_the_definition_and_golden_values():
    values = ["", "a", "ab", "ab\0", "user_000123", "é日本", "x" * 17, "https://example.com/item/" + "9" * 40]
    got = hash64_distinct(pa.array(values))
    assert [int(g) for g in got] == [reference(v.encode()) for v in values]
    assert int(got[1]) == 0x80C4B0952EDD6A61 and int(got[4]) == reference(b"user_000123")
    sliced = pa.array(values).slice(3)  # an array with an offset into its buffers
    assert [int(g) for g in hash64_distinct(sliced)] == [reference(v.encode()) for v in values[3:]]


def test_binary_dictionary_and_plain_strings_agree():
    plain = pa.array(["u1", "u2", "u1", "u3"])
    rows = hash_strings(plain, 1000)
    assert rows[0] == rows[2] and ((rows >= 0) & (rows < 1000)).all()
    assert (hash_strings(plain.dictionary_encode(), 1000) == rows).all()
    assert (hash_strings(plain.cast(pa.binary()), 1000) == rows).all()
    assert (hash_strings(plain.cast(pa.large_string()), 1000) == rows).all()


def _write(path, **cols):
    pq.write_table(pa.table(cols), path, row_group_size=4)


def test_reader_hashes_string_columns_and_lists(tmp_path):
    n = 10
    _write(tmp_path / "a.parquet", y=pa.array([0, 1] * 5, pa.int8()), x=pa.array(np.arange(n, dtype=np.float32)),
           user=pa.array([f"u{i % 3}" if i != 4 else None for i in range(n)]),
           hist=pa.array([[f"i{i}", f"i{i + 1}"][: i % 3] for i in range(n)], pa.list_(pa.string())),
           cat=pa.array([b"k%d" % (i % 2) for i in range(n)], pa.binary()).dictionary_encode())
    cfg = DataConfig(train=[str(tmp_path)], sparse=[SparseFeature("user", 97), SparseFeature("hist", 97),
                                                    SparseFeature("cat", 5)],
                     dense=["x"], tasks=[Task("y")], batch_size=n, num_workers=0, dense_transform="none")
    src = DataSource(cfg.train, cfg, 0, 1)
    (batch,) = list(src.epoch())
    kjt = batch.sparse_features.to_dict()
    user = kjt["user"]
    assert user.lengths().tolist() == [1, 1, 1, 1, 0, 1, 1, 1, 1, 1]  # a null id: no id (counted)
    assert user.values().tolist() == hash_strings(pa.array([f"u{i % 3}" for i in range(n) if i != 4]), 97).tolist()
    assert kjt["hist"].lengths().tolist() == [i % 3 for i in range(n)]
    assert kjt["cat"].values().tolist() == hash_strings(pa.array([b"k%d" % (i % 2) for i in range(n)]), 5).tolist()
    c = dict(zip(COUNTERS, src.counters.tolist()))
    assert c["ids_hashed"] == 9 + sum(i % 3 for i in range(n)) + n and c["ids_null"] == 1


def test_every_bad_column_named_at_once(tmp_path):
    _write(tmp_path / "a.parquet", y=pa.array(["0", "1"]), x=pa.array(["1.5", "2"]), u=pa.array([0.5, 1.5]))
    cfg = DataConfig(train=[str(tmp_path)], sparse=[SparseFeature("u", 5), SparseFeature("v", 5)], dense=["x"],
                     tasks=[Task("y")])
    with pytest.raises(DataError) as e:
        DataSource(cfg.train, cfg, 0, 1)
    msg = str(e.value)
    assert msg.startswith(str(tmp_path / "a.parquet"))
    for part in ("column 'u' (sparse) has type double", "missing column 'v'", "column 'x' (dense) has type string",
                 "column 'y' (label) has type string"):
        assert part in msg, (part, msg)


def test_one_column_two_types_across_files(tmp_path):
    _write(tmp_path / "a.parquet", y=pa.array([0, 1]), u=pa.array([1, 2]))
    _write(tmp_path / "b.parquet", y=pa.array([0, 1]), u=pa.array(["1", "2"]))
    cfg = DataConfig(train=[str(tmp_path)], sparse=[SparseFeature("u", 5)], tasks=[Task("y")])
    with pytest.raises(DataError, match=r"column 'u' holds integer \(int64\) in .*a.parquet but string \(string\) in "
                                        r".*b.parquet"):
        DataSource(cfg.train, cfg, 0, 1)
