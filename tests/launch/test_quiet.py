"""A rank's console shows the warnings that matter (known-benign library ones silenced, all of
them with MBREC_ALL_WARNINGS=1), and its whole log is kept in the run directory."""
import os
import subprocess
import sys
from pathlib import Path

from tests.trainer.test_checks import _dataset

ROOT = Path(__file__).resolve().parents[2]
BENIGN = "The topology was constructed directly"  # torchrec 1.8's; 1.6.1 does not say it


def _train(tmp_path: Path, extra=(), **env: str) -> subprocess.CompletedProcess:
    if not (tmp_path / "run.toml").is_file():
        _dataset(tmp_path, [0.5] * 200, [0, 1] * 100)
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'[data]\ntrain = ["{tmp_path}"]\neval = ["{tmp_path}"]\ndense = ["d0"]\n'
                   f'sparse = [{{name = "id", num_embeddings = 7}}]\ntasks = [{{name = "y"}}]\nbatch_size = 16\n'
                   f'[model]\nembedding_dim = 4\ndense_arch = [4]\ncross_layers = 1\ncross_low_rank = 4\n'
                   f'shared_arch = [4]\nhead_arch = [4]\n'
                   f'[trainer]\nout_dir = "{tmp_path}/run"\nmax_steps = 2\nprogress_bar = false\n')
    return subprocess.run([sys.executable, "-m", "launch.cli", "train", str(cfg), *extra], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "MASTER_PORT": "0", **env})


def test_benign_warnings_silenced_and_the_log_kept(tmp_path):
    proc = _train(tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert BENIGN not in proc.stderr and "FutureWarning" not in proc.stderr
    log = (tmp_path / "run" / "logs" / "rank0.log").read_text()
    assert "final eval" in log and "saved checkpoint" in log


def test_benign_lines_dropped_unless_all_warnings_asked(monkeypatch):
    import logging
    from launch import quiet
    name, text, _ = quiet.BENIGN_LOG_LINES[0]
    logger = logging.getLogger(name)
    saved = list(logger.filters)
    # from a clean logger: importing launch.cli (an earlier test may have) installs the filter
    before = [f for f in saved if not isinstance(f, quiet._DropBenign)]
    logger.filters = list(before)
    record = lambda msg: logger.makeRecord(name, logging.WARNING, __file__, 1, msg, None, None)  # noqa: E731
    try:
        monkeypatch.setenv("MBREC_ALL_WARNINGS", "1")
        quiet.silence_benign()
        assert logger.filter(record(text + " ..."))  # shown
        monkeypatch.delenv("MBREC_ALL_WARNINGS")
        quiet.silence_benign()
        quiet.silence_benign()  # idempotent
        assert len(logger.filters) == len(before) + 1
        assert not logger.filter(record(text + " ..."))
        assert logger.filter(record("a warning that matters"))
    finally:
        logger.filters = saved


def test_a_warm_start_logs_what_happened_and_no_library_noise(tmp_path):
    """A warm start loads its parent's head biases: its log has no head-bias line (the log said
    "rate -> bias" and then loaded other biases); loading a checkpoint shows none of DCP's or
    torchrec's deprecation notes."""
    parent = _train(tmp_path)
    assert parent.returncode == 0, parent.stderr[-2000:]
    child = _train(tmp_path, extra=["--set", f"trainer.out_dir={tmp_path}/child",
                                    "--set", f"trainer.init_from={tmp_path}/run"])
    assert child.returncode == 0, child.stderr[-2000:]
    parent_log = (tmp_path / "run" / "logs" / "rank0.log").read_text()
    child_log = (tmp_path / "child" / "logs" / "rank0.log").read_text()
    assert "head output biases" in parent_log
    assert "head output biases" not in child_log and "warm start from" in child_log
    for noise in ("FutureWarning", "torch.distributed is disabled", "deprecating ShardedTensor", "Successfully loaded"):
        assert noise not in child.stderr and noise not in child_log, noise
