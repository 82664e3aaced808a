"""A daily training loop to copy: day 1 trains from scratch on its date partition, each later
day warm-starts from the day before (`--set trainer.init_from=...`) on its own partition, on
whatever number of ranks that day gets (2, then 1, then 2).

    python docs/examples/daily_loop.py            # partitions and runs on the local disk
    python docs/examples/daily_loop.py --s3       # on a local S3-protocol server (moto): logs
                                                  # and checkpoints under s3://, out_dirs local

Each day runs `mbrec launch` as a user would; the data are the demo's synthetic logs, one
seed per day, written as `dt=YYYY-MM-DD/{train,eval}/part-*.parquet`.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DAYS = ["2026-12-01", "2026-12-02", "2026-12-03"]
RANKS = {"2026-12-01": 2, "2026-12-02": 1, "2026-12-03": 2}
CONFIG = "launch/configs/demo.toml"
SMALL = ["synth.train_files=2", "synth.eval_files=1", "synth.rows_per_file=40000", "synth.row_group_size=8192"]


def mbrec(*args: str, env=None) -> None:
    cmd = [str(Path(sys.executable).parent / "mbrec"), *args]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True, env=env)


def sets(*pairs: str) -> list:
    return [a for p in pairs for a in ("--set", p)]


def write_partitions(base: Path) -> None:
    for i, day in enumerate(DAYS):
        if not (base / f"dt={day}" / "train").is_dir():
            mbrec("synth", CONFIG, *sets(f"synth.out_dir={base}/dt={day}", f"synth.seed={100 + i}", *SMALL))


def run_days(logs: str, runs: Path, ckpt_root: str = "", env=None) -> None:
    parent = ""
    for day in DAYS:
        out = runs / day
        overrides = [f"data.train=['{logs}/dt={day}/train']", f"data.eval=['{logs}/dt={day}/eval']",
                     f"trainer.out_dir={out}", "trainer.progress_bar=false"]
        if ckpt_root:
            overrides.append(f"trainer.checkpoint_dir={ckpt_root}/{day}")
        if parent:
            overrides.append(f"trainer.init_from={parent}")  # yesterday's model, optimizer and balancer
        mbrec("launch", CONFIG, "-s", "local_cwd", "-j", f"1x{RANKS[day]}", *sets(*overrides), env=env)
        summary = json.loads((out / "summary.json").read_text())
        print(f"{day}: {summary['world_size']} rank(s), {summary['steps']} steps from {summary['start']['from']}"
              f" {summary['start'].get('checkpoint') or ''}; eval NE "
              + ", ".join(f"{t}={m['ne']:.4f}" for t, m in summary["eval"].items()), flush=True)
        parent = f"{ckpt_root}/{day}" if ckpt_root else str(out)


def s3_server():
    """moto's S3-protocol server on 127.0.0.1 (what the test suite uses): returns the process."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_REGION="us-east-1",
                      AWS_EC2_METADATA_DISABLED="true", AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("the S3-protocol server did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--s3", action="store_true", help="logs and checkpoints on a local S3-protocol server")
    args = parser.parse_args()
    local = ROOT / "datasets" / "daily"
    write_partitions(local)
    if not args.s3:
        run_days(str(local), ROOT / "runs" / "daily")
        return
    import pyarrow.fs as pafs
    proc = s3_server()
    try:
        fs = pafs.S3FileSystem(endpoint_override=os.environ["AWS_ENDPOINT_URL"], allow_bucket_creation=True)
        fs.create_dir("logs")
        pafs.copy_files(str(local), "logs/daily", destination_filesystem=fs)
        run_days("s3://logs/daily", ROOT / "runs" / "daily-s3", ckpt_root="s3://logs/checkpoints", env=os.environ)
    finally:
        proc.terminate()


if __name__ == "__main__":
    main()
