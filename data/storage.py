"""Where Parquet files live: local paths, or URIs of any filesystem pyarrow knows (`file://`,
`s3://`, `gs://`, `hdfs://`, `abfs://`), or else any fsspec knows (through
`pyarrow.fs.FSSpecHandler`). Credentials and endpoints are taken the way those libraries
take them (for S3: AWS_* variables, ~/.aws, instance roles; `AWS_ENDPOINT_URL`, or URI query
parameters such as `s3://bucket/logs?endpoint_override=host:9000&scheme=http`).

Files are named by the URI the user wrote (scheme and query kept), so errors, run identities
and logs show where a file is, and any process can reopen it.
"""
from __future__ import annotations

import functools
import os
import re
from typing import List, Sequence, Tuple
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from data.errors import DataError

GLOB_CHARS = "*?["


def is_uri(path: str) -> bool:
    return re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", path) is not None


@functools.lru_cache(maxsize=32)
def _filesystem(prefix: str, pid: int) -> Tuple[pafs.FileSystem, str]:
    """-> (filesystem, the path of the URI's authority inside it: "bucket" for s3://bucket, ""
    for hdfs://namenode:8020), once per scheme://authority?query and process (`pid`: a forked
    DataLoader worker must not reuse its parent's S3 client, whose threads did not survive
    the fork). Files then cost no filesystem construction of their own."""
    try:
        fs, root = pafs.FileSystem.from_uri(prefix)
        return fs, root.rstrip("/")
    except pa.ArrowInvalid as e:  # a scheme pyarrow does not know: fsspec may (memory://, az://...)
        if "Unrecognized filesystem type" not in str(e):
            raise
        import fsspec
        fs, _ = fsspec.core.url_to_fs(prefix)
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), urlsplit(prefix).netloc


def split(uri: str) -> Tuple[pafs.FileSystem, str]:
    """-> (filesystem, path inside it). Local paths stay as they are."""
    if not is_uri(uri):
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    parts = urlsplit(uri)
    if parts.scheme == "file":
        return pafs.LocalFileSystem(), parts.path
    prefix = f"{parts.scheme}://{parts.netloc}" + (f"?{parts.query}" if parts.query else "")
    try:
        fs, root = _filesystem(prefix, os.getpid())
    except (OSError, pa.ArrowException, ImportError, ValueError) as e:
        raise DataError(f"{uri}: no filesystem for this URI: {e}") from e
    return fs, root + parts.path


def glob_regex(pattern: str) -> re.Pattern:
    """Shell glob over '/'-separated paths: `*` and `?` stay within a directory, `**` spans
    directories, `[...]` is a character class."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
            continue
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            j = pattern.find("]", i + 1)
            if j < 0:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1:j]
                out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
                i = j
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out) + r"\Z")


def _visible(path: str) -> bool:
    """Parquet data files: not the `_SUCCESS` / `_metadata` / `.crc` side files of writers."""
    return path.endswith(".parquet") and not any(p.startswith(("_", ".")) for p in path.split("/") if p)


def _infos(fs: pafs.FileSystem, base: str, uri: str) -> List[pafs.FileInfo]:
    try:
        return fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{uri}: cannot list: {e}") from e


def _listed(fs: pafs.FileSystem, base: str, uri: str) -> List[str]:
    return [i.path for i in _infos(fs, base, uri) if i.type == pafs.FileType.File]


def _globbed(fs: pafs.FileSystem, inside: str, uri: str) -> List[str]:
    """A glob's files: those it matches (writers' side files, `_*` and `.*`, left out), and the
    visible Parquet files of the directories it matches (`logs/dt=2026-11-*/`)."""
    first = min(inside.find(ch) for ch in GLOB_CHARS if ch in inside)
    base = inside[:first].rsplit("/", 1)[0]
    rx = glob_regex(inside.rstrip("/"))
    infos = _infos(fs, base, uri)
    dirs = [i.path.rstrip("/") + "/" for i in infos if i.type == pafs.FileType.Directory and rx.match(i.path.rstrip("/"))]
    out = []
    for i in infos:
        if i.type != pafs.FileType.File:
            continue
        under = next((d for d in dirs if i.path.startswith(d)), None)
        if under is not None and _visible(i.path[len(under):]):
            out.append(i.path)
        elif under is None and rx.match(i.path) and not i.base_name.startswith(("_", ".")):
            out.append(i.path)
    return out


def _expand(pattern: str) -> List[str]:
    """One pattern -> paths inside its filesystem (a file, a directory's Parquet files, a glob)."""
    fs, inside = split(pattern)
    if any(ch in inside for ch in GLOB_CHARS):
        return _globbed(fs, inside, pattern)
    try:
        info = fs.get_file_info(inside)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{pattern}: cannot reach: {e}") from e
    if info.type == pafs.FileType.Directory:
        return [p for p in _listed(fs, inside, pattern) if _visible(p[len(inside.rstrip("/")):])]
    return [inside] if info.type == pafs.FileType.File else []


def uri_of(pattern: str, path: str) -> str:
    """The name of `path` (inside the filesystem of `pattern`) in the user's terms."""
    if not is_uri(pattern):
        return path if os.path.isabs(pattern) else os.path.relpath(path)
    parts = urlsplit(pattern)
    query = f"?{parts.query}" if parts.query else ""
    if parts.scheme == "file":
        return f"file://{path}"
    inside = split(pattern)[1]
    # pyarrow's path for s3/gs/hdfs is "bucket/key" (the authority and path of the URI), or
    # the URI's path alone where the authority is a host (hdfs://namenode:8020/...)
    if inside.startswith(parts.netloc):
        return f"{parts.scheme}://{path}{query}"
    return f"{parts.scheme}://{parts.netloc}{'' if path.startswith('/') else '/'}{path}{query}"


def resolve_files(patterns: Sequence[str]) -> List[str]:
    """Files, directories (every visible *.parquet below) or globs, local or remote -> sorted,
    de-duplicated names. A pattern that matches nothing is an error naming it."""
    if not patterns:
        raise DataError("no input files configured (data.train / data.eval is empty)")
    files: List[str] = []
    for pat in patterns:
        found = sorted(uri_of(pat, p) for p in _expand(pat))
        if not found:
            raise DataError(f"{pat}: {_missing_bucket(pat) or 'no such Parquet file (or the directory/glob matched nothing)'}")
        files.extend(found)
    return sorted(set(files))


def _missing_bucket(pattern: str) -> str:
    """For an object-store URI whose bucket does not exist: says so ("" otherwise)."""
    if not is_uri(pattern) or urlsplit(pattern).scheme not in ("s3", "gs", "gcs"):
        return ""
    fs, inside = split(pattern)
    bucket = inside.split("/")[0]
    try:
        missing = fs.get_file_info(bucket).type == pafs.FileType.NotFound
    except (OSError, pa.ArrowException):
        return ""
    return f"bucket {bucket!r} does not exist (or these credentials cannot see it)" if missing else ""


def open_parquet(uri: str, dictionary_columns: Sequence[str] = ()) -> pq.ParquetFile:
    """Opens a file named by `resolve_files` (reads its footer). `dictionary_columns` (top-level
    names, lists included) are read as Arrow dictionaries: string ids come without being
    materialised row by row, and each distinct value once (Parquet's own dictionary pages)."""
    fs, inside = split(uri)
    f = fs.open_input_file(inside)
    if not dictionary_columns:
        return pq.ParquetFile(f)
    meta = pq.read_metadata(f)
    wanted = set(dictionary_columns)
    leaves = [meta.schema.column(i).path for i in range(meta.num_columns)
              if meta.schema.column(i).path.split(".")[0] in wanted]
    return pq.ParquetFile(f, metadata=meta, read_dictionary=leaves)
