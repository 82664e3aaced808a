"""A bound on calls into a store (a checkpoint's save or load): object-storage clients retry and
wait without end when an endpoint stops answering mid-request (no collective is waiting, so
trainer.pg_timeout_s never fires). A call still running after its deadline cannot be interrupted
from Python: the rank logs an error naming the store and exits; torchrun's restart (or the user's
rerun) resumes from the newest complete checkpoint."""
from __future__ import annotations

import logging
import os
import threading
from contextlib import contextmanager
from typing import Iterator

import fsspec

log = logging.getLogger(__name__)
EXIT_CODE = 4  # a rank ended by a store's deadline


def endpoint(uri: str) -> str:
    """Where a URI's bytes go: the object store's endpoint (s3: its endpoint URL), or the path."""
    try:
        fs, _ = fsspec.core.url_to_fs(uri)
    except (ImportError, ValueError) as e:
        return f"{uri} ({e})"
    url = getattr(fs, "endpoint_url", None) or getattr(fs, "client_kwargs", {}).get("endpoint_url")
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    if "s3" in protocols:
        url = url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        return f"endpoint {url}" if url else "AWS's endpoint for the bucket's region"
    return f"endpoint {url}" if url else "a local or mounted file system"


@contextmanager
def deadline(what: str, uri: str, timeout_s: float) -> Iterator[None]:
    """Runs the block; if it has not finished after `timeout_s` (0: no bound), logs an error that
    names `what`, `uri` and its endpoint, and ends this process with EXIT_CODE."""
    if not timeout_s or timeout_s <= 0:
        yield
        return
    done = threading.Event()

    def expire() -> None:
        if done.wait(timeout_s):
            return
        log.error("%s %s did not finish within trainer.storage_timeout_s = %gs: the store (%s) stopped answering; "
                  "ending this rank (a restart or a rerun resumes from the newest complete checkpoint)",
                  what, uri, timeout_s, endpoint(uri))
        for h in logging.root.handlers:
            h.flush()
        os._exit(EXIT_CODE)

    watch = threading.Thread(target=expire, name="storage-deadline", daemon=True)
    watch.start()
    try:
        yield
    finally:
        done.set()
