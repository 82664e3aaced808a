"""A real S3-protocol server on 127.0.0.1 for tests: moto's server mode, as a subprocess.
Clients reach it the way they reach any S3 endpoint: AWS_ENDPOINT_URL and credentials in the
environment (which spawned ranks inherit)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from typing import Iterator

import pyarrow.fs as pafs

from tests.dist_utils import free_port

ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
       "AWS_EC2_METADATA_DISABLED": "true"}


@contextmanager
def s3_server() -> Iterator[str]:
    """Starts the server, sets the environment; yields the endpoint URL."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in [*ENV, "AWS_ENDPOINT_URL"]}
    try:
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError("the S3-protocol server did not start")
                time.sleep(0.2)
        os.environ.update(ENV, AWS_ENDPOINT_URL=endpoint)
        yield endpoint
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        proc.terminate()
        proc.wait(timeout=30)


def upload(local_dir: str, bucket_prefix: str, endpoint: str) -> None:
    """Copies a local directory tree to s3://bucket_prefix/ (creating the bucket)."""
    fs = pafs.S3FileSystem(endpoint_override=endpoint, allow_bucket_creation=True)
    fs.create_dir(bucket_prefix.split("/")[0])
    pafs.copy_files(local_dir, bucket_prefix, destination_filesystem=fs)
