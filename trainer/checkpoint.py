"""Checkpoints with torch.distributed.checkpoint: the DMP state dict (sharded tables, dense
weights, balancer buffers), both optimizers (fused embedding state and the dense one), the
step and the data position (trainer.start: the epoch, and which of its units were consumed).

Layout: `ROOT/step-000000123/` (DCP writes `.metadata` last, on the coordinator, once every
rank's part is written: a directory without it is incomplete) and `ROOT/latest`, the name of
the newest complete checkpoint, replaced atomically after each save (a rename locally; one
PUT on object storage). ROOT is a local directory or any fsspec URI (`trainer.checkpoint_dir
= "s3://bucket/run/checkpoints"`; DCP's fsspec storage writes there, which needs the store's
fsspec package: s3fs for s3://, gcsfs for gs://). Resume takes `latest`
if it names a complete checkpoint, else (with a warning) the newest complete one; incomplete
directories are removed at start; the newest `keep` complete ones are kept.

Each step directory also holds `digests.json`: CRC-32 digests of every file DCP wrote, by piece,
computed from the bytes as they are written and checked from the bytes as they are read
(`trainer.digests`: no pass of its own over the checkpoint). DCP checks no content: a shard
damaged after the save (a bit flip on disk, a partial copy between stores) that still decodes
to finite numbers would otherwise be trained on, silently.

Memory: DCP writes one file per tensor (`single_file_per_rank=False`). Its writer keeps every
tensor of a file staged until the file is closed (a clone of a table that is a view into
fbgemm's weights; a host copy of a GPU tensor), so one file per rank would hold a copy of the
rank's whole shard during every save; one file per tensor holds one tensor at a time.

Readers of another run's checkpoints (a warm start, predict, export) pin the one they picked
(`ROOT/.readers/`) while they read it: that run's clean-up keeps a pinned checkpoint (a pin is
honoured for PIN_TTL_S, so a crashed reader holds nothing for long). On a local or shared file
system picking and pinning, and the clean-up's check and removal, hold a lock on `ROOT/.lock`,
so that no checkpoint is removed between a reader's pick and its pin; object stores have no
locks: there the reader checks the checkpoint again after pinning it.

Every save and load is bounded by trainer.storage_timeout_s (`deadline`): a store that stops
answering ends the rank with an error naming the store, instead of a wait that never ends.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import fsspec
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader, FileSystemWriter, Metadata
# DCP's own storage for URIs (what dcp.save picks for one), not exported by the package
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.staging import AsyncStager
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
from torchrec.optim.keyed import KeyedOptimizerWrapper

from data.errors import detailed
from trainer import digests as digesting
from trainer.deadline import deadline
from trainer.errors import CheckpointError, CheckpointWriteError, NoCheckpoint
from trainer.identity import write_atomic
from trainer.preflight import agreed

log = logging.getLogger(__name__)
LATEST = "latest"
STEP_DIR = re.compile(r"^step-(\d+)$")
DIGESTS = "digests.json"
DIGEST_CHUNK = 8 * 2**20
READERS = ".readers"  # pins of the readers of a checkpoint (another process reading it now)
PIN_TTL_S = 6 * 3600.0  # a pin older than this is a crashed reader's, and ignored
RETIRED = ".retired-"  # a checkpoint the clean-up is removing (no longer listed)
STORAGE_TIMEOUT_S = 900.0  # trainer.storage_timeout_s's default, for readers without a run config


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier(group=None) -> None:
    if dist.is_initialized():
        dist.barrier(group)


PARTS = ("model", "optim", "balancer")
BALANCER_PREFIX = "balancer."  # the balancer's buffers in the DMP state dict


def checkpoint_state(dmp, optimizer, step: int, position: str = "", totals: Optional[torch.Tensor] = None) -> dict:
    """What a checkpoint holds. `position`: the data position as JSON (trainer.start), kept as a
    uint8 tensor of its bytes (written like every tensor, and sized by the checkpoint's metadata
    when read back). `totals`: the run's reader counters and training seconds up to `step`, over
    every attempt and rank (float64 [len(COUNTERS) + 1]), so that a resumed run's summary counts
    the whole run."""
    progress = {"step": torch.tensor(step, dtype=torch.int64), "position": _encode(position)}
    if totals is not None:
        progress["totals"] = totals.double().cpu()
    return {"model": dmp.state_dict(), "optim": optimizer.state_dict(), "progress": progress}


def _encode(text: str) -> torch.Tensor:
    return torch.tensor(list(text.encode()), dtype=torch.uint8)


def _decode(t: Optional[torch.Tensor]) -> Optional[str]:
    return bytes(t.tolist()).decode() if t is not None else None


def _progress(meta: Dict[str, object]) -> dict:
    """An empty progress state shaped as the checkpoint's (no position before it was recorded)."""
    out = {"step": torch.tensor(0, dtype=torch.int64)}
    if "progress.position" in meta:
        out["position"] = torch.zeros(list(meta["progress.position"].size), dtype=torch.uint8)
    if "progress.totals" in meta:
        out["totals"] = torch.zeros(list(meta["progress.totals"].size), dtype=torch.float64)
    return out


def step_of(checkpoint: str) -> int:
    return int(STEP_DIR.match(os.path.basename(str(checkpoint).rstrip("/"))).group(1))


def is_remote(uri: str) -> bool:
    return re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", uri) is not None and not uri.startswith("file://")


class CheckpointDir:
    """The checkpoints of one run under `root` (a path or a URI). Checkpoints are named by
    their id: the path or URI DCP saves to and loads from."""

    def __init__(self, root: str | Path, keep: int = 0, timeout_s: float = STORAGE_TIMEOUT_S,
                 asynchronous: bool = False):
        self.uri, self.keep, self.timeout_s = str(root).rstrip("/"), keep, timeout_s
        self.asynchronous = asynchronous
        self._pending: Optional[Future] = None
        self._save_group = None
        self._executor: Optional[ThreadPoolExecutor] = None
        self._staging: Dict[str, torch.Tensor] = {}  # background saves' host copies, reused
        self.remote = is_remote(self.uri)
        self.fs, self.root = fsspec.core.url_to_fs(self.uri)

    def child(self, name: str) -> str:
        return f"{self.uri}/{name}"

    def _names(self) -> List[str]:
        """Names of the step directories, oldest first."""
        self.fs.invalidate_cache()  # listings may be cached (s3fs); DCP wrote through another client
        try:
            entries = self.fs.ls(self.root, detail=True)
        except FileNotFoundError:
            return []
        names = [os.path.basename(e["name"].rstrip("/")) for e in entries if e["type"] == "directory"]
        return sorted((n for n in names if STEP_DIR.match(n)), key=step_of)

    def is_complete(self, name: str) -> bool:
        return self.fs.isfile(f"{self.root}/{name}/.metadata")

    def complete(self) -> List[str]:
        """Complete checkpoints, oldest first."""
        return [self.child(n) for n in self._names() if self.is_complete(n)]

    def latest(self) -> Optional[str]:
        """The checkpoint to resume from: `latest` if it names a complete one, else the newest
        complete one (a crash between DCP's save and the pointer's update, or a lost pointer)."""
        marker = f"{self.root}/{LATEST}"
        has_marker = self.fs.isfile(marker)
        named = self.fs.cat_file(marker).decode().strip() if has_marker else ""
        if named and STEP_DIR.match(named) and self.is_complete(named):
            return self.child(named)
        found = self.complete()
        if has_marker or found:
            log.warning("checkpoint pointer %s %s; resuming from the newest complete checkpoint: %s",
                        self.child(LATEST), f"names {named!r}, not a complete checkpoint" if named
                        else "is missing or empty", os.path.basename(found[-1]) if found else "none")
        return found[-1] if found else None

    def prepare(self) -> None:
        """Before training, on every rank: the directory exists and takes a file (else a
        CheckpointError now, not at the first save); on rank 0, incomplete checkpoints of an
        earlier attempt go."""
        probe = f"{self.root}/.probe-{os.getpid()}-{dist.get_rank() if dist.is_initialized() else 0}"
        try:
            if not self.remote:  # (object stores have no directories; never create a bucket)
                self.fs.makedirs(self.root, exist_ok=True)
            self.fs.pipe_file(probe, b"0")
            self.fs.rm(probe)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"checkpoint directory {self.uri} is not writable: {type(e).__name__}: {e}") from e
        if _is_main():
            for name in self._names():
                if not self.is_complete(name):
                    log.warning("removing incomplete checkpoint %s", self.child(name))
                    self.fs.rm(f"{self.root}/{name}", recursive=True)
            if not self.remote:  # what an interrupted clean-up was removing
                for old in Path(self.root).glob(f"{RETIRED}*"):
                    shutil.rmtree(old, ignore_errors=True)

    def put(self, name: str, text: str) -> None:
        """A small file beside the checkpoints (run.json, dense_stats.json: a checkpoint directory
        on object storage then says by itself what trained it, for a warm start from it)."""
        if self.remote:
            self.fs.pipe_file(f"{self.root}/{name}", text.encode())
        else:
            write_atomic(Path(self.root) / name, text)

    def save(self, dmp, optimizer, step: int, position: str = "", totals: Optional[torch.Tensor] = None) -> str:
        """Saves checkpoint `step`. With `asynchronous`, the state is staged (copied to host
        memory) and written by a thread while training goes on; `latest` names it once written,
        and the next save, or `wait`, waits for it first."""
        self.wait()
        ckpt = self.child(f"step-{step:09d}")
        writer = _writer(ckpt)
        state = checkpoint_state(dmp, optimizer, step, position, totals)
        if not self.asynchronous:
            with deadline("writing checkpoint", ckpt, self.timeout_s):
                self._saved(ckpt, lambda: dcp.save(state, storage_writer=writer), writer, None)
            return ckpt
        t0 = time.perf_counter()
        group = self._group()
        with deadline("staging checkpoint", ckpt, self.timeout_s):
            staged = self._saving(ckpt, lambda: dcp.async_save(host_copy(state, self._staging), storage_writer=writer,
                                                               process_group=group, async_stager=_Staged()))
        self._pending = self._thread().submit(self._finish, ckpt, staged, writer, group)
        log.info("checkpoint %s staged in %.2f s; written in the background", ckpt, time.perf_counter() - t0)
        return ckpt

    def wait(self) -> None:
        """Until the checkpoint being written in the background (if any) is complete and named
        by `latest`; its failure is raised here."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def _finish(self, ckpt: str, staged, writer, group) -> None:
        with deadline("writing checkpoint", ckpt, self.timeout_s):
            self._saved(ckpt, staged.result, writer, group)

    def _saved(self, ckpt: str, write, writer, group) -> None:
        """write() the checkpoint's files, then its digests, `latest` and the clean-up (rank 0)."""
        self._saving(ckpt, write)
        written = _gathered(writer.fs.written, group)
        if _is_main():  # after every rank finished its part
            name = os.path.basename(ckpt)
            self.fs.pipe_file(f"{self.root}/{name}/{DIGESTS}",
                              json.dumps(digesting.document(written), sort_keys=True).encode())
            if self.remote:  # one PUT: readers see the old object or the new one
                self.fs.pipe_file(f"{self.root}/{LATEST}", name.encode())
            else:
                write_atomic(Path(self.root) / LATEST, name)
            self._retain()
        _barrier(group)
        log.info("saved checkpoint %s", ckpt)

    def _saving(self, ckpt: str, write):
        try:
            return write()
        except (Exception, CheckpointException) as e:  # DCP gathers every rank's failure into one
            full = "; the disk is full: No space left on device" if self._full() else ""
            raise CheckpointWriteError(f"saving checkpoint {ckpt} failed ({self._free()}{full}): "
                                       f"{_cause(e)}") from e

    def _group(self):
        """The process group of background saves (gloo, created once, on every rank at the same
        save): their collectives must not interleave with training's on the default group."""
        if self._save_group is None and dist.is_initialized():
            self._save_group = dist.new_group(backend="gloo")
        return self._save_group

    def _thread(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="mbrec-checkpoint")
        return self._executor

    @contextmanager
    def _lock(self, exclusive: bool) -> Iterator[None]:
        """Held while a reader picks and pins (shared) and while the clean-up removes (exclusive);
        object stores have none (see the module's docstring)."""
        if self.remote:
            yield
            return
        try:
            f = open(Path(self.root) / ".lock", "a")
        except OSError:  # a read-only copy of a run: nothing there removes checkpoints
            yield
            return
        with f:
            fcntl.flock(f, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _pinned(self) -> set:
        """Names of the checkpoints a reader holds a live pin on."""
        self.fs.invalidate_cache()
        try:
            pins = self.fs.ls(f"{self.root}/{READERS}", detail=False)
        except FileNotFoundError:
            return set()
        live = set()
        for p in pins:
            try:
                pin = json.loads(self.fs.cat_file(p))
            except (OSError, ValueError):
                continue  # removed meanwhile, or being written (its reader checks again after writing)
            if time.time() - float(pin.get("time", 0)) < PIN_TTL_S:
                live.add(pin.get("checkpoint"))
        return live

    def _retain(self) -> None:
        retired = []
        with self._lock(exclusive=True):
            done = [n for n in self._names() if self.is_complete(n)]
            pinned = self._pinned()
            for old in done[:-self.keep] if self.keep else []:
                if old in pinned:
                    log.info("keeping checkpoint %s beyond trainer.keep_checkpoints: a reader has it pinned",
                             self.child(old))
                elif self.remote:
                    self.fs.rm(f"{self.root}/{old}", recursive=True)
                else:  # out of every listing at once, removed after the lock is let go
                    os.replace(Path(self.root) / old, Path(self.root) / f"{RETIRED}{old}")
                    retired.append(Path(self.root) / f"{RETIRED}{old}")
        for path in retired:
            shutil.rmtree(path, ignore_errors=True)

    @contextmanager
    def reading(self, name: Optional[str] = None) -> Iterator[str]:
        """The checkpoint `name` (None: the one `latest()` picks), pinned against the clean-up of
        the run that writes here until the block ends. NoCheckpoint if there is none; CheckpointError
        if the one named is gone or incomplete."""
        for _ in range(5):  # (object stores: a pick removed before its pin was seen is picked again)
            with self._lock(exclusive=False):
                ckpt = self.child(name) if name else self.latest()
                if ckpt is None:
                    raise NoCheckpoint(f"{self.uri}: no complete checkpoint there")
                pin = self._pin(os.path.basename(ckpt))
            if self.is_complete(os.path.basename(ckpt)):
                break
            self._unpin(pin)
            if name:
                raise CheckpointError(f"checkpoint {ckpt} is incomplete or was removed (no .metadata)")
        else:
            raise CheckpointError(f"{self.uri}: its checkpoints were removed as fast as they were picked")
        try:
            yield ckpt
        finally:
            self._unpin(pin)

    def _pin(self, name: str) -> str:
        path = f"{self.root}/{READERS}/{name}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        if not self.remote:
            self.fs.makedirs(f"{self.root}/{READERS}", exist_ok=True)
        body = {"checkpoint": name, "time": time.time(), "host": socket.gethostname(), "pid": os.getpid()}
        try:
            self.fs.pipe_file(path, json.dumps(body).encode())
        except (OSError, ValueError) as e:  # a read-only copy of a run: nobody cleans it up either
            log.debug("cannot pin %s (%s): reading it unpinned", name, e)
            return ""
        return path

    def _unpin(self, path: str) -> None:
        if path:
            try:
                self.fs.rm(path)
            except OSError:
                pass

    def _full(self) -> bool:
        """After a failed save: the local disk is (nearly) full, whatever torch's writer said (its
        zip writer reports a short write as "unexpected pos", without the system's error)."""
        if self.remote:
            return False
        try:
            return shutil.disk_usage(self.root).free < 2**20
        except OSError:
            return False

    def _free(self) -> str:
        if self.remote:
            return f"object storage at {self.uri}"
        try:
            return f"{shutil.disk_usage(self.root).free / 2**30:.2f} GiB free at {self.root}"
        except OSError:
            return f"free space at {self.root} unknown"


class _Staged(AsyncStager):
    """dcp.async_save's stager for a state dict that `host_copy` staged already."""
    _synchronize_after_execute = False

    def stage(self, state_dict):
        return state_dict

    def synchronize_staging(self) -> None:
        pass

    def close(self) -> None:
        pass


def host_copy(state: dict, buffers: Dict[str, torch.Tensor], prefix: str = "") -> dict:
    """A copy of `state` (a checkpoint_state) whose tensors, and sharded tensors' local shards,
    are copies in host memory of just their size: what a background save writes while training
    changes the originals. `state` itself is left as it is: torchrec's state_dict returns the
    same ShardedTensor objects on every call, whose shards are views of the model's weights. The
    copies go into `buffers`, kept from one save to the next (copying into memory already in
    place runs at memory speed; fresh memory is first faulted in by the kernel, several times
    slower). (DCP's own stager deep-copies a sharded tensor before replacing its shards, and a
    deep copy of a table, a view into its fused kernel's weights, copies all of them: 33 s per
    save for 1.4 GB of tables.)"""
    out: dict = {}
    for key, value in state.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out[key] = host_copy(value, buffers, f"{name}.")
        elif isinstance(value, ShardedTensor):
            shards = [Shard(_host(s.tensor, buffers, f"{name}#{i}"), s.metadata) for i, s in enumerate(value.local_shards())]
            # the same global metadata, other local tensors (no collective: the ranks' keys differ)
            out[key] = ShardedTensor._init_from_local_shards_and_global_metadata(shards, value.metadata())
        elif hasattr(value, "to_local"):
            raise CheckpointError(f"{name}: a DTensor; trainer.async_checkpoint stages ShardedTensors and tensors "
                                  f"only: set it to false")
        else:
            out[key] = _host(value, buffers, name) if isinstance(value, torch.Tensor) else value
    return out


def _host(t: torch.Tensor, buffers: Dict[str, torch.Tensor], name: str) -> torch.Tensor:
    kept = buffers.get(name)
    if kept is None or kept.shape != t.shape or kept.dtype != t.dtype:
        kept = buffers[name] = torch.empty(t.shape, dtype=t.dtype, device="cpu")
    return kept.copy_(t.detach())


def state_bytes(dmp, optimizer) -> Tuple[int, int]:
    """This rank's share of a checkpoint and its largest tensor, in bytes (local shards of
    sharded tensors): a save stages one tensor at a time (see the module's docstring)."""
    total = largest = 0
    for sd in (dmp.state_dict(), optimizer.state_dict()):
        stack = [sd]
        while stack:
            node = stack.pop()
            if isinstance(node, dict):
                stack.extend(node.values())
            elif isinstance(node, (list, tuple)):
                stack.extend(node)
            else:  # a ShardedTensor's or DTensor's local part, or a tensor
                for t in _local(node):
                    total += t.numel() * t.element_size()
                    largest = max(largest, t.numel() * t.element_size())
    return total, largest


class _Peek(DefaultLoadPlanner):
    """Keeps the checkpoint's metadata (DCP's public planner hook): its keys and global shapes."""
    metadata: Optional[Metadata] = None

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False):
        self.metadata = metadata
        super().set_up_planner(state_dict, metadata, is_coordinator)


def read_metadata(path: str) -> Dict[str, object]:
    """{flattened key: storage metadata (`.size` for tensors)} of a complete checkpoint; this
    process alone reads it (no collective)."""
    peek = _Peek()
    try:
        with deadline("reading checkpoint", str(path), STORAGE_TIMEOUT_S):
            dcp.load({}, storage_reader=storage_reader(str(path)), planner=peek, no_dist=True)
    except (Exception, CheckpointException) as e:
        raise load_failure(path, e, "reading") from e
    return dict(peek.metadata.state_dict_metadata)


def read_progress(path: str) -> Tuple[int, Optional[str]]:
    """(step, data position as JSON or None) of a checkpoint, read by this process alone."""
    state = {"progress": _progress(read_metadata(path))}
    try:
        with deadline("reading checkpoint", str(path), STORAGE_TIMEOUT_S):
            dcp.load(state, storage_reader=storage_reader(str(path)), no_dist=True)
    except (Exception, CheckpointException) as e:
        raise load_failure(path, e, "reading") from e
    return int(state["progress"]["step"]), _decode(state["progress"].get("position"))


def part_of(key: str) -> str:
    """The part ("model", "balancer", "optim", "progress") of a flattened checkpoint key."""
    top, _, rest = key.partition(".")
    return "balancer" if top == "model" and rest.startswith(BALANCER_PREFIX) else top


def _writer(ckpt: str) -> FileSystemWriter:
    """DCP's writer for `ckpt` (its fsspec one for a URI), one file per tensor, digesting."""
    writer = (FsspecWriter if "://" in ckpt else FileSystemWriter)(ckpt, single_file_per_rank=False)
    writer.fs = digesting.Digesting(writer.fs, ckpt)
    return writer


def storage_reader(ckpt: str, warn: bool = False) -> FileSystemReader:
    """DCP's reader for `ckpt`, checking every piece it reads against the save's digests."""
    reader = (FsspecReader if "://" in str(ckpt) else FileSystemReader)(str(ckpt))
    doc = _written_digests(str(ckpt), warn)
    reader.fs = digesting.Digesting(reader.fs, str(ckpt), doc and doc["files"],
                                    doc["chunk_bytes"] if doc else digesting.CHUNK)
    return reader


def _gathered(mine: Dict[str, dict], group=None) -> Dict[str, dict]:
    """Every rank's {file: digest entry}, on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return dict(mine)
    gathered: List[Dict[str, dict]] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, mine, group)
    return {k: v for p in gathered for k, v in p.items()}


def _written_digests(ckpt: str, warn: bool) -> Optional[dict]:
    """The save's digests.json (format 2), or None: no digests (a checkpoint of an earlier
    release: a warning if `warn`), or whole-file digests of format 1, checked here by reading
    the files once (`verify_whole`)."""
    fs, root = fsspec.core.url_to_fs(ckpt)
    fs.invalidate_cache()
    try:
        doc = json.loads(fs.cat_file(f"{root}/{DIGESTS}"))
    except FileNotFoundError:
        if warn and _is_main():
            log.warning("checkpoint %s has no %s (written by an earlier release): its files cannot be checked",
                        ckpt, DIGESTS)
        return None
    if doc.get("format") != digesting.FORMAT:
        if warn:
            verify_whole(ckpt, doc)
        return None
    return doc


def _share(names: Sequence[str]) -> List[str]:
    """This rank's share of a checkpoint's files to hash: every world-th name."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    return sorted(names)[rank::world]


def _hash(fs, path: str) -> List:
    h, size = hashlib.sha256(), 0
    with fs.open(path, "rb") as f:
        while chunk := f.read(DIGEST_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return [h.hexdigest(), size]


def verify_whole(path: str, written: Dict[str, List]) -> None:
    """Format-1 digests (whole files, earlier releases): on each rank, its share of the files
    are those the save digested (CheckpointError naming the first that differs)."""
    fs, root = fsspec.core.url_to_fs(path)
    names = [os.path.basename(p) for p in fs.ls(root, detail=False) if os.path.basename(p) != DIGESTS]
    for name in _share(set(written) | set(names)):
        found = _hash(fs, f"{root}/{name}") if name in names else None
        if found != written.get(name):
            what = ("is missing" if found is None else "was not written by the save" if name not in written
                    else f"differs from what the save wrote ({found[1]} bytes, sha256 {found[0][:12]}... against "
                         f"{written[name][1]} bytes, sha256 {written[name][0][:12]}...)")
            raise CheckpointError(f"checkpoint {path}: file {name} {what}: it was changed or damaged after the "
                                  f"save; load an earlier checkpoint (trainer.init_from) or restore this one")


@dataclass
class Loaded:
    step: int
    position: Optional[str]  # None: a checkpoint written before positions were recorded
    totals: Optional[torch.Tensor] = None  # reader counters and seconds up to the step (see _state)


def load(path: str, dmp, optimizer, parts: Sequence[str] = PARTS, timeout_s: float = STORAGE_TIMEOUT_S) -> Loaded:
    """Loads `parts` of a checkpoint in place (DCP reshards to this world and plan), after
    checking that they fit this model (every key there, same global shapes) and, after
    loading, that every loaded tensor is finite (agreed across ranks); bounded by `timeout_s`."""
    with deadline("reading checkpoint", path, timeout_s):
        return _load(path, dmp, optimizer, parts)


def _load(path: str, dmp, optimizer, parts: Sequence[str]) -> Loaded:
    reader = agreed(lambda: storage_reader(path, warn=True))  # (format-1 digests: checked here)
    meta = read_metadata(path)
    if "optim" in parts:
        # Dense optimizer state (e.g. Adam's moments) is created lazily at the first step; DCP
        # loads in place, so it must exist first. Fused embedding optimizers have theirs already.
        for _, opt in optimizer.optimizers:
            if isinstance(opt, KeyedOptimizerWrapper):
                opt.init_state()
    state = checkpoint_state(dmp, optimizer, 0)
    state["progress"] = _progress(meta)
    chosen = {k: v for k, v in _flat(state) if part_of(k) in (*parts, "progress")}
    agreed(lambda: check_fits(path, meta, chosen, parts, _all_ranks(chosen)))
    present = _without_empty(_select(state, chosen))
    try:
        dcp.load(present, storage_reader=reader)
    except (Exception, CheckpointException) as e:
        raise load_failure(path, e) from e
    _merge(state, present)
    agreed(lambda: check_finite(path, present))
    dmp.load_state_dict(state["model"])
    if "optim" in parts:
        optimizer.load_state_dict(state["optim"])
    step = int(state["progress"]["step"])
    log.info("loaded %s of %s (step %d)", ", ".join(parts), path, step)
    return Loaded(step, _decode(state["progress"].get("position")), state["progress"].get("totals"))


def _flat(d: dict, prefix: str = "") -> Iterator[Tuple[str, object]]:
    """(key, leaf) of a nested dict, keys joined by dots as DCP flattens them."""
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def _select(d: dict, keys: Dict[str, object], prefix: str = "") -> dict:
    """The sub-dict of `d` (same leaves) whose flattened keys are in `keys`."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out[k] = _select(v, keys, f"{prefix}{k}.")
        elif f"{prefix}{k}" in keys:
            out[k] = v
    return out


def _global_shape(t) -> Optional[List[int]]:
    if hasattr(t, "local_shards") or hasattr(t, "to_local") or isinstance(t, torch.Tensor):
        return list(t.size())  # a ShardedTensor's or DTensor's global size
    return None


def _all_ranks(keys) -> set:
    """The union of every rank's keys (a rank's fused optimizer state holds its own tables only)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return set(keys)
    gathered: List = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, sorted(keys))
    return set().union(*gathered)


def check_fits(path: str, meta: Dict[str, object], chosen: Dict[str, object], parts: Sequence[str],
               everywhere: set) -> None:
    """Raises CheckpointError naming every tensor of `parts` that is missing from the checkpoint,
    of another shape there, or only there (`everywhere`: the keys of every rank)."""
    problems = []
    for key, value in chosen.items():
        want = _global_shape(value)
        if key not in meta:
            problems.append(f"{key} missing from the checkpoint")
        elif want is not None and list(getattr(meta[key], "size", [])) != want:
            problems.append(f"{key}: {list(meta[key].size)} in the checkpoint, {want} here")
    problems += [f"{key} only in the checkpoint" for key in meta if part_of(key) in parts and key not in everywhere]
    if problems:
        raise CheckpointError(detailed(f"checkpoint {path} does not fit this model ({', '.join(parts)}; "
                                       f"{len(problems)} problem(s) below)", problems))


def _local(t) -> List[torch.Tensor]:
    if hasattr(t, "local_shards"):  # ShardedTensor
        return [s.tensor for s in t.local_shards()]
    if hasattr(t, "to_local"):  # DTensor
        return [t.to_local()]
    return [t] if isinstance(t, torch.Tensor) else []


def check_finite(path: str, loaded: dict) -> None:
    """Every loaded tensor (this rank's shards) is finite, else a CheckpointError naming each
    tensor and its count: a checkpoint holding NaN or inf (a corrupted copy, an optimizer slot
    that overflowed) must not be trained from."""
    bad = []
    for key, value in _flat(loaded):
        n = sum(_non_finite(t) for t in _local(value) if t.is_floating_point())
        if n:
            bad.append(f"{key} ({n} non-finite value(s))")
    if bad:
        raise CheckpointError(detailed(f"checkpoint {path} holds non-finite values in {len(bad)} tensor(s) "
                                       f"(below): not training from it", bad))


def load_failure(path: str, e: BaseException, doing: str = "loading") -> CheckpointError:
    """A failed DCP load as one CheckpointError: a digest's own error as it is (it names the
    file and bytes), others with the checkpoint and every rank's cause."""
    found = e if isinstance(e, CheckpointError) else next(
        (f[0] for f in getattr(e, "failures", {}).values() if isinstance(f[0], CheckpointError)), None)
    return found or CheckpointError(f"{doing} checkpoint {path} failed: {_cause(e)}")


def _non_finite(t: torch.Tensor) -> int:
    """How many values of `t` are NaN or inf. Its sum first: one vectorised pass at memory speed
    (~18 GiB per CPU-second here, against 0.24 for counting), finite unless a value is not (or
    the sum overflows: then the values are counted)."""
    if t.numel() == 0 or bool(torch.isfinite(t.sum())):
        return 0
    return int((~torch.isfinite(t)).sum())


def _cause(e: BaseException) -> str:
    """The root failures of a DCP exception, one line per rank (CheckpointException is a
    BaseException whose text holds every rank's whole traceback)."""
    if isinstance(e, CheckpointException):
        return "; ".join(f"rank {r}: {type(f[0]).__name__}: {f[0]}" for r, f in sorted(e.failures.items()))
    return f"{type(e).__name__}: {e}"


def _without_empty(d: dict) -> dict:
    """`d` without empty sub-dicts (at any depth): a stateless optimizer (fused SGD) has an
    empty state per parameter, which DCP saves as nothing and then cannot find when loading.
    New dicts, same leaves: tensors still load in place."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            v = _without_empty(v)
            if not v:
                continue
        out[k] = v
    return out


def _merge(into: dict, loaded: dict) -> None:
    """Copies the loaded leaves (non-tensor values are replaced, not loaded in place) back."""
    for k, v in loaded.items():
        if isinstance(v, dict):
            _merge(into[k], v)
        else:
            into[k] = v
