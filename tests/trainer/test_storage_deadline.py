"""A store that stops answering in the middle of a checkpoint's save or load (a real
S3-protocol server on 127.0.0.1, frozen with SIGSTOP) ends the rank after
trainer.storage_timeout_s with an error naming the checkpoint and the endpoint, instead of a wait
without end; once the store answers again, the newest complete checkpoint is the one before."""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from trainer.deadline import EXIT_CODE, endpoint
from tests.s3_server import s3_server

pytest.importorskip("moto.server")
ROOT = Path(__file__).resolve().parents[2]

# step 1 saved, then (after a line on stdin) step 2 saved, or step 1 loaded, under a 4 s deadline
SCRIPT = textwrap.dedent("""
    import logging, os, sys, torch
    import pyarrow.fs as pafs
    from trainer.checkpoint import CheckpointDir, load
    logging.basicConfig(level=logging.INFO)
    class NoOptim:
        optimizers = []
        def state_dict(self):
            return {}
        def load_state_dict(self, _):
            pass
    pafs.S3FileSystem(endpoint_override=os.environ["AWS_ENDPOINT_URL"], allow_bucket_creation=True).create_dir("ckpt")
    model = torch.nn.Linear(256, 256)
    ckpts = CheckpointDir("s3://ckpt/run", keep=0, timeout_s=4)
    ckpts.save(model, NoOptim(), 1)
    print("READY", flush=True)
    sys.stdin.readline()
    if sys.argv[1] == "save":
        ckpts.save(model, NoOptim(), 2)
    else:
        load("s3://ckpt/run/step-000000001", model, NoOptim(), parts=("model",), timeout_s=4)
    print("DONE", flush=True)
""")


@pytest.mark.parametrize("what", ["save", "load"])
def test_a_frozen_store_ends_the_rank_naming_the_endpoint(what):
    with s3_server() as url:
        server = _server_pid(url)
        proc = subprocess.Popen([sys.executable, "-c", SCRIPT, what], cwd=ROOT, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "READY", proc.stderr.read()[-3000:]
            os.kill(server, signal.SIGSTOP)
            t0 = time.time()
            proc.stdin.write("go\n")
            proc.stdin.flush()
            out, err = proc.communicate(timeout=120)
            waited = time.time() - t0
        finally:
            os.kill(server, signal.SIGCONT)
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == EXIT_CODE, err[-3000:]
        assert "DONE" not in out and waited < 60
        line = [ln for ln in err.splitlines() if "did not finish" in ln]
        assert line and f"checkpoint s3://ckpt/run/step-00000000{2 if what == 'save' else 1}" in line[0], err[-3000:]
        assert f"trainer.storage_timeout_s = 4s: the store (endpoint {url}) stopped answering" in line[0]
        if what == "save":  # the store answers again: the half-written step 2 is not taken
            assert _latest_when_answering("s3://ckpt/run") == "s3://ckpt/run/step-000000001"


def test_endpoint_names_where_bytes_go(tmp_path):
    assert endpoint(str(tmp_path)) == "a local or mounted file system"


def _server_pid(url: str) -> int:
    port = url.rsplit(":", 1)[1]
    for p in Path("/proc").iterdir():
        try:
            cmd = (p / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"moto.server" in cmd and port.encode() in cmd:
            return int(p.name)
    raise AssertionError("the S3-protocol server's process was not found")


def _latest_when_answering(uri: str, wait_s: float = 60.0):
    """The newest complete checkpoint, once the thawed server answers again (on a loaded machine
    it may take a while to drain the connections it held while frozen)."""
    import s3fs
    from botocore.exceptions import EndpointConnectionError
    from trainer.checkpoint import CheckpointDir
    # fsspec keeps one S3 client per set of options: an earlier test's, made for its own server's
    # endpoint (AWS_ENDPOINT_URL is read when a client is made), would be reused here
    s3fs.S3FileSystem.clear_instance_cache()
    deadline = time.time() + wait_s
    while True:
        try:
            return CheckpointDir(uri).latest()
        except (OSError, EndpointConnectionError):
            if time.time() > deadline:
                raise
            time.sleep(1)
