import os
import sys
from pathlib import Path

import pytest

from data.synth import SynthConfig, data_section, write_dataset

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# The suite is a CPU suite on any machine (its 2-rank tests would otherwise need 2 GPUs on a GPU
# box): GPUs are hidden from it and from the ranks it starts, unless only tests/gpu was asked for
# (make gpu-smoke).
_paths = [a for a in sys.argv[1:] if not a.startswith("-")]
if not _paths or not all("tests/gpu" in a for a in _paths):
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")


@pytest.fixture(scope="session")
def tiny_synth(tmp_path_factory):
    """A small synthetic dataset: 2 train files x 4 row groups, 1 eval file."""
    cfg = SynthConfig(out_dir=str(tmp_path_factory.mktemp("synth")), train_files=2, eval_files=1,
                      rows_per_file=6_000, row_group_size=1_500, cardinality=2_000, seed=7)
    write_dataset(cfg)
    return cfg


@pytest.fixture
def tiny_config(tiny_synth, tmp_path):
    """A RunConfig dict for the tiny dataset and a small model."""
    return {
        "data": {**data_section(tiny_synth), "batch_size": 256, "num_workers": 1},
        "model": {"embedding_dim": 8, "dense_arch": [16, 8], "cross_layers": 1, "cross_low_rank": 8,
                  "shared_arch": [32, 16], "head_arch": [8]},
        "balancer": {"method": "multibalance"},
        "optim": {"dense_lr": 0.003, "sparse_lr": 0.05},
        # a rank left waiting fails within minutes (and the test with it), not at the 10-min default
        "trainer": {"out_dir": str(tmp_path / "run"), "progress_bar": False, "log_every": 5, "pg_timeout_s": 240},
    }
