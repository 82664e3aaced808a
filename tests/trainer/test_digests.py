"""Digests of a checkpoint's files in pieces (trainer.digests), with DCP's own writer and reader
in one process: computed as written, checked as read, each piece before DCP sees its bytes."""
import json

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter

from trainer.digests import Digesting, document
from trainer.errors import CheckpointError

PIECE = 4096


def _save(path, state):
    writer = FileSystemWriter(str(path), single_file_per_rank=False)
    writer.fs = Digesting(writer.fs, str(path), chunk=PIECE)
    dcp.save(state, storage_writer=writer, no_dist=True)
    (path / "digests.json").write_text(json.dumps(document(writer.fs.written, PIECE)))
    return writer.fs.written


def _load(path, state):
    doc = json.loads((path / "digests.json").read_text())
    reader = FileSystemReader(str(path))
    reader.fs = Digesting(reader.fs, str(path), doc["files"], doc["chunk_bytes"])
    dcp.load(state, storage_reader=reader, no_dist=True)


def _error(path, state) -> str:
    with pytest.raises(BaseException) as e:
        _load(path, state)
    found = e.value if isinstance(e.value, CheckpointError) else next(
        f[0] for f in e.value.failures.values() if isinstance(f[0], CheckpointError))
    return str(found)


def test_pieces_are_digested_as_written_and_checked_as_read(tmp_path):
    big = torch.arange(10_000, dtype=torch.float32)  # 40 kB: 10 pieces
    written = _save(tmp_path, {"w": big[1000:9000], "b": torch.ones(3)})
    sizes = {p.name: p.stat().st_size for p in tmp_path.iterdir() if p.name != "digests.json"}
    assert {k: v["bytes"] for k, v in written.items()} == sizes  # every file, .metadata too
    assert max(len(v["crc32"]) for v in written.values()) == -(-max(sizes.values()) // PIECE)
    out = {"w": torch.zeros(8000), "b": torch.zeros(3)}
    _load(tmp_path, out)
    assert torch.equal(out["w"], big[1000:9000]) and torch.equal(out["b"], torch.ones(3))


def test_a_flipped_byte_names_its_file_and_piece_before_any_tensor_holds_it(tmp_path):
    _save(tmp_path, {"w": torch.arange(10_000, dtype=torch.float32)})
    shard = max(tmp_path.glob("*.distcp"), key=lambda p: p.stat().st_size)
    data = bytearray(shard.read_bytes())
    data[PIECE + 10] ^= 1
    shard.write_bytes(bytes(data))
    out = {"w": torch.full((10_000,), 7.0)}
    msg = _error(tmp_path, out)
    assert f"file {shard.name} differs from what the save wrote (bytes {PIECE}-{2 * PIECE}: their crc32 is" in msg
    assert bool((out["w"] == 7.0).all())  # nothing was copied into the tensor


def test_a_file_the_save_did_not_write_is_refused(tmp_path):
    _save(tmp_path, {"w": torch.ones(10)})
    doc = json.loads((tmp_path / "digests.json").read_text())
    name = next(n for n in doc["files"] if n.endswith(".distcp"))
    del doc["files"][name]
    (tmp_path / "digests.json").write_text(json.dumps(doc))
    assert f"file {name} was not written by the save" in _error(tmp_path, {"w": torch.zeros(10)})
