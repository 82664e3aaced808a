"""Checkpoint digests in the same pass as the bytes: computed from the bytes as DCP writes them
and checked from the bytes as DCP reads them, so that a save reads nothing back and a load
reads each byte once (on object storage: no download after a save, one per resume).

DCP writes and reads every file through its storage's `fs.create_stream`; `Digesting` wraps
that file system. A file is digested in CHUNK-byte pieces: a reader may need a part of a file
only (another rank's replicated dense weights, a reshard), and a piece can be checked on its
own. A piece is checked when it is first read, before any of its bytes reach DCP: a flipped
byte fails the load before a tensor holds it.

The digest is CRC-32 (zlib's), not a cryptographic hash: it is there for damage (a flipped bit
on a disk, a truncated or mixed-up copy between stores), which it finds with certainty for any
error burst up to 32 bits in a piece and otherwise but for a 2^-32 chance, at 3.4 GiB/s here
(SHA-256: 1.5 GiB/s, which doubled a load's time). Nothing here defends against a deliberate
change of a checkpoint.

digests.json (format 2): {"format": 2, "algorithm": "crc32", "chunk_bytes": CHUNK, "files":
{name: {"bytes": n, "crc32": [per piece]}}}. Format 1 ({name: [sha256 of the file, bytes]},
earlier releases) is checked by reading its files once before the load
(`checkpoint.verify_whole`)."""
from __future__ import annotations

import io
import zlib
import os
import threading
from contextlib import contextmanager
from typing import Dict, Iterator, Optional

from trainer.errors import CheckpointError

CHUNK = 8 * 2**20
FORMAT = 2
ALGORITHM = "crc32"


def _name(path) -> str:
    return os.path.basename(os.fspath(path).rstrip("/"))


class _Hashing:
    """A write stream that digests the bytes going through it, CHUNK by CHUNK (DCP writes each
    file front to back: torch.save into a stream, and raw bytes)."""

    def __init__(self, raw, chunk: int):
        self.raw, self.chunk, self.size, self.pieces = raw, chunk, 0, []
        self._crc = 0

    def write(self, b) -> int:
        view = memoryview(b).cast("B")
        n = self.raw.write(view)
        n = len(view) if n is None else n  # (buffered streams write everything or raise)
        done = 0
        while done < n:
            take = min(self.chunk - self.size % self.chunk, n - done)
            self._crc = zlib.crc32(view[done:done + take], self._crc)
            done += take
            self.size += take
            if self.size % self.chunk == 0:
                self.pieces.append(self._crc)
                self._crc = 0
        return n

    def tell(self) -> int:
        return self.raw.tell()

    def entry(self) -> dict:
        tail = [self._crc] if self.size % self.chunk or not self.pieces else []
        return {"bytes": self.size, ALGORITHM: self.pieces + tail}

    def __getattr__(self, name):  # flush, fileno (fsync), close, writable ...
        return getattr(self.raw, name)


class _Verified(io.RawIOBase):
    """A read stream over a digested file: every CHUNK piece is read once from the file, checked,
    and served from memory (the file's last piece, where torch.load's zip directory lives, is
    kept until the stream closes; one other piece besides)."""

    def __init__(self, raw, where: str, entry: dict, chunk: int):
        super().__init__()
        self.raw, self.where, self.entry, self.chunk = raw, where, entry, chunk
        self.size, self.pos = int(entry["bytes"]), 0
        self.last = max(0, -(-self.size // chunk) - 1)
        self.cache: Dict[int, memoryview] = {}

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = base + offset
        return self.pos

    def readinto(self, b) -> int:
        view, n = memoryview(b).cast("B"), 0
        while n < len(view) and self.pos < self.size:
            i, within = divmod(self.pos, self.chunk)
            length = min(self.chunk, self.size - i * self.chunk)
            if within == 0 and len(view) - n >= length and i not in self.cache:
                self._read(i, view[n:n + length])  # a whole piece asked for: read and checked in place
                take = length
            else:
                piece = self._piece(i)
                take = min(len(view) - n, length - within)
                view[n:n + take] = piece[within:within + take]
            n += take
            self.pos += take
        return n

    def _piece(self, i: int) -> memoryview:
        """Piece i, read once and kept (the file's last one until the stream closes, one other)."""
        if i not in self.cache:
            piece = memoryview(bytearray(min(self.chunk, self.size - i * self.chunk)))
            self._read(i, piece)
            for k in [k for k in self.cache if k != self.last]:
                del self.cache[k]
            self.cache[i] = piece
        return self.cache[i]

    def _read(self, i: int, into: memoryview) -> None:
        """Piece i into `into` (its size), checked against its digest (CheckpointError if not)."""
        start, want, got = i * self.chunk, len(into), 0
        self.raw.seek(start)
        while got < want and (n := self.raw.readinto(into[got:])):
            got += n
        digest = zlib.crc32(into[:got])
        if got != want or digest != self.entry[ALGORITHM][i]:
            found = (f"only {got} of them are there" if got != want else
                     f"their crc32 is {digest:08x}, the save wrote {self.entry[ALGORITHM][i]:08x}")
            raise CheckpointError(f"{self.where} differs from what the save wrote (bytes {start}-{start + want}: "
                                  f"{found}): it was changed or damaged after the save; load an earlier "
                                  f"checkpoint (trainer.init_from) or restore this one")


class Digesting:
    """DCP's storage file system (`FileSystem` / fsspec's), with digests: the files this process
    writes are digested as written (`written`: {name: entry}), and the files named in `expected`
    (a digests.json's "files") are checked as read. A file read that `expected` does not name
    is refused when `expected` is given (it was not written by the save)."""

    def __init__(self, inner, ckpt: str = "", expected: Optional[dict] = None, chunk: int = CHUNK):
        self.inner, self.ckpt, self.expected, self.chunk = inner, ckpt, expected, chunk
        self.written: Dict[str, dict] = {}
        self._lock = threading.Lock()  # DCP may write with several threads

    @contextmanager
    def create_stream(self, path, mode: str) -> Iterator[io.IOBase]:
        name = _name(path)
        with self.inner.create_stream(path, mode) as raw:
            if "w" in mode:
                stream = _Hashing(raw, self.chunk)
                yield stream
                with self._lock:
                    self.written[name] = stream.entry()
            elif self.expected is None:
                yield raw
            elif name not in self.expected:
                raise CheckpointError(f"checkpoint {self.ckpt}: file {name} was not written by the save (it is "
                                      f"not in its digests): it was changed after the save")
            else:
                yield _Verified(raw, f"checkpoint {self.ckpt}: file {name}", self.expected[name], self.chunk)

    def rename(self, path, new_path) -> None:
        self.inner.rename(path, new_path)  # DCP writes .metadata under a temporary name first
        with self._lock:
            if _name(path) in self.written:
                self.written[_name(new_path)] = self.written.pop(_name(path))

    def __getattr__(self, name):  # concat_path, init_path, mkdir, exists, rm_file, ls ...
        return getattr(self.inner, name)


def document(written: Dict[str, dict], chunk: int = CHUNK) -> dict:
    """digests.json's content for the files every rank wrote."""
    return {"format": FORMAT, "algorithm": ALGORITHM, "chunk_bytes": chunk, "files": written}
