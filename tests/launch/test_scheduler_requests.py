"""What the torchx component asks a scheduler for, checked with torchx's own dry run (no
cluster): per-node CPUs and memory sized from the ranks and their reader workers, GPUs,
torchrun's restarts."""
import subprocess
import sys
from pathlib import Path

import pytest

from launch.components import node_resources

ROOT = Path(__file__).resolve().parents[2]
H100 = str(ROOT / "launch/configs/h100.toml")  # 4 reader workers per rank


def _dryrun(*args: str) -> str:
    cmd = [sys.executable, "-m", "torchx.cli.main", "run", "--workspace", "", "--dryrun", *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_node_resources_scale_with_ranks_and_workers():
    assert node_resources("4x8", workers=4) == (40, 8 * (8192 + 4 * 2048))
    assert node_resources("1x2", workers=0) == (2, 2 * 8192)
    assert node_resources("2x8", workers=4, cpu=96, mem_mb=500_000) == (96, 500_000)


def test_slurm_request():
    out = _dryrun("-s", "slurm", "launch/components.py:train", "--config", H100, "-j", "4x8", "--gpu", "8")
    lines = [line for line in out.splitlines() if line.startswith("#SBATCH --job-name")]
    assert len(lines) == 4  # one per node
    for line in lines:
        assert "--cpus-per-task=40" in line and "--mem=131072" in line and "--gpus-per-task=8" in line
    assert "python -m launch.agent --max_restarts 2 " in out and "--nproc_per_node 8" in out


def test_kubernetes_request():
    pytest.importorskip("kubernetes", reason="torchx's kubernetes scheduler needs the kubernetes package")
    out = _dryrun("-s", "kubernetes", "-cfg", "queue=default,namespace=ml", "launch/components.py:train",
                  "--image", "registry/mbrec:1", "--config", H100, "-j", "2x8", "--gpu", "8", "--memMB", "600000")
    limits = out.split("limits:")[1].split("requests:")[0]
    assert "cpu: 40000m" in limits and "memory: 600000M" in limits and "nvidia.com/gpu: '8'" in limits
