"""`mbrec launch` through torchx's local_cwd scheduler: 1 node x 2 ranks, tiny size."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data.synth import data_section

ROOT = Path(__file__).resolve().parents[2]


def _launch(tiny_synth, out: Path, j: str) -> dict:
    d = data_section(tiny_synth)
    overrides = [f"data.train={json.dumps(d['train'])}", f"data.eval={json.dumps(d['eval'])}",
                 "data.batch_size=256", "trainer.max_steps=6", f"trainer.out_dir={out}",
                 "trainer.progress_bar=false", "model.embedding_dim=8"]
    # the demo's table sizes are larger than the tiny data's ids need: fine
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    cmd = [sys.executable, "-m", "launch.cli", "launch", "launch/configs/demo.toml", "-s", "local_cwd", "-j", j]
    for o in overrides:
        cmd += ["--set", o]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "summary.json").read_text())


def test_launch_demo_config_local_cwd(tiny_synth, tmp_path):
    summary = _launch(tiny_synth, tmp_path / "run", "1x2")
    assert summary["world_size"] == 2 and summary["steps"] == 6


@pytest.mark.slow
def test_two_nodes_agree_with_one_node_of_two_ranks(tiny_synth, tmp_path):
    """2 nodes x 1 rank (two torchrun agents, c10d rendezvous on 127.0.0.1) train exactly what
    1 node x 2 ranks trains: the same ranks, the same data split, the same collectives."""
    one = _launch(tiny_synth, tmp_path / "1x2", "1x2")
    two = _launch(tiny_synth, tmp_path / "2x1", "2x1")
    assert two["world_size"] == 2 and two["steps"] == 6
    assert two["final_weights"] == one["final_weights"] and two["eval"] == one["eval"]


def test_failed_job_reports_failure(tmp_path):
    """A rank that fails (here: a missing data file) makes `mbrec launch` fail too. The venv is
    not on PATH (`.venv/bin/mbrec` without an activated venv): torchx and torchrun are found."""
    env = {**os.environ, "PATH": "/usr/bin:/bin"}
    cmd = [sys.executable, "-m", "launch.cli", "launch", "launch/configs/demo.toml", "-j", "1x2", "--max-restarts", "0",
           "--set", f"data.train=[\"{tmp_path}/missing.parquet\"]", "--set", f"trainer.out_dir={tmp_path}/r"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "missing.parquet: no such Parquet file" in proc.stdout + proc.stderr
    assert not (tmp_path / "r" / "summary.json").exists()
