"""`mbrec launch` through torchx's local_cwd scheduler: 1 node x 2 ranks, tiny size."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from data.synth import data_section

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("torchx") is None and not (Path(sys.executable).parent / "torchx").exists(),
                    reason="torchx CLI not installed")
def test_launch_demo_config_local_cwd(tiny_synth, tmp_path):
    d = data_section(tiny_synth)
    out = tmp_path / "run"
    overrides = [f"data.train={json.dumps(d['train'])}", f"data.eval={json.dumps(d['eval'])}",
                 "data.batch_size=256", "trainer.max_steps=6", f"trainer.out_dir={out}",
                 "trainer.progress_bar=false", "model.embedding_dim=8"]
    # the demo's table sizes are larger than the tiny data's ids need: fine
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    cmd = [sys.executable, "-m", "launch.cli", "launch", "launch/configs/demo.toml", "-s", "local_cwd", "-j", "1x2"]
    for o in overrides:
        cmd += ["--set", o]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 6


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
