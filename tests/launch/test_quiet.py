"""A rank's console shows the warnings that matter (known-benign library ones silenced, all of
them with MBREC_ALL_WARNINGS=1), and its whole log is kept in the run directory."""
import os
import subprocess
import sys
from pathlib import Path

from tests.trainer.test_checks import _dataset

ROOT = Path(__file__).resolve().parents[2]
BENIGN = "The topology was constructed directly"


def _train(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    _dataset(tmp_path, [0.5] * 200, [0, 1] * 100)
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'[data]\ntrain = ["{tmp_path}"]\neval = ["{tmp_path}"]\ndense = ["d0"]\n'
                   f'sparse = [{{name = "id", num_embeddings = 7}}]\ntasks = [{{name = "y"}}]\nbatch_size = 16\n'
                   f'[model]\nembedding_dim = 4\ndense_arch = [4]\ncross_layers = 1\ncross_low_rank = 4\n'
                   f'shared_arch = [4]\nhead_arch = [4]\n'
                   f'[trainer]\nout_dir = "{tmp_path}/run"\nmax_steps = 2\nprogress_bar = false\n')
    return subprocess.run([sys.executable, "-m", "launch.cli", "train", str(cfg)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "MASTER_PORT": "0", **env})


def test_benign_warnings_silenced_and_the_log_kept(tmp_path):
    proc = _train(tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert BENIGN not in proc.stderr and "FutureWarning" not in proc.stderr
    log = (tmp_path / "run" / "logs" / "rank0.log").read_text()
    assert "final eval" in log and "saved checkpoint" in log


def test_all_warnings_on_request(tmp_path):
    proc = _train(tmp_path, MBREC_ALL_WARNINGS="1")
    assert proc.returncode == 0 and BENIGN in proc.stderr
