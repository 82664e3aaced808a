"""Reading another run's checkpoints while it writes: a reader's pick is pinned against that
run's clean-up (trainer.checkpoint), with the saves made by another process; and a run directory
reads its own checkpoints (a copy or a move of it never reads the original's files)."""
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from trainer import start
from trainer.checkpoint import CheckpointDir, load, read_progress
from trainer.errors import CheckpointError, RunError

ROOT = Path(__file__).resolve().parents[2]

# Saves a small model's checkpoints into ARGV[1], steps ARGV[2]..ARGV[3], keeping the newest one
SAVER = textwrap.dedent("""
    import sys, torch
    from trainer.checkpoint import CheckpointDir
    class NoOptim:
        def state_dict(self):
            return {}
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64)
    ckpts = CheckpointDir(sys.argv[1], keep=1)
    ckpts.prepare()
    for step in range(int(sys.argv[2]), int(sys.argv[3]) + 1):
        with torch.no_grad():
            model.weight.fill_(step)
        ckpts.save(model, NoOptim(), step)
""")


class NoOptim:
    def state_dict(self):
        return {}

    def load_state_dict(self, _):
        pass

    optimizers = []


def _save(root: Path, first: int, last: int) -> None:
    subprocess.run([sys.executable, "-c", SAVER, str(root), str(first), str(last)], cwd=ROOT, check=True, timeout=300)


def test_a_pinned_checkpoint_outlives_the_writers_clean_up(tmp_path):
    root = tmp_path / "checkpoints"
    _save(root, 1, 1)
    ckpts = CheckpointDir(root)
    with ckpts.reading() as ckpt:
        assert ckpt.endswith("step-000000001")
        _save(root, 2, 3)  # another process saves twice with keep_checkpoints = 1
        assert (root / "step-000000001" / ".metadata").is_file()  # kept: pinned
        assert read_progress(ckpt)[0] == 1
        model = torch.nn.Linear(64, 64)
        load(ckpt, model, NoOptim(), parts=("model",))
        assert float(model.weight[0, 0]) == 1.0
    assert not list((root / ".readers").iterdir())  # the pin went with the block
    _save(root, 4, 4)  # unpinned: the clean-up takes it, and the one step 4 replaced
    assert sorted(p.name for p in root.glob("step-*")) == ["step-000000004"]


def test_a_named_checkpoint_that_is_gone_is_said(tmp_path):
    root = tmp_path / "checkpoints"
    _save(root, 1, 2)
    with pytest.raises(CheckpointError, match="step-000000001 is incomplete or was removed"):
        with CheckpointDir(root).reading("step-000000001"):
            pass
    with pytest.raises(CheckpointError, match="no complete checkpoint there"):
        with CheckpointDir(tmp_path / "empty").reading():
            pass


def test_readers_racing_a_writer_that_cleans_up_never_lose_their_pick(tmp_path):
    """A writer saves 60 checkpoints, keeping 1, while this process picks the newest and reads it
    whole, again and again: every pick loads (the unpinned version of this loses picks)."""
    root = tmp_path / "checkpoints"
    _save(root, 1, 1)
    writer = subprocess.Popen([sys.executable, "-c", SAVER, str(root), "2", "60"], cwd=ROOT)
    reads, model = 0, torch.nn.Linear(64, 64)
    try:
        while writer.poll() is None:
            with CheckpointDir(root).reading() as ckpt:
                time.sleep(0.05)  # a reader slower than the writer's saves
                load(ckpt, model, NoOptim(), parts=("model",))
                assert float(model.weight[0, 0]) == read_progress(ckpt)[0]
                reads += 1
    finally:
        writer.wait(timeout=300)
    assert writer.returncode == 0 and reads >= 3


def test_a_copied_run_directory_reads_its_own_checkpoints(tmp_path):
    orig = tmp_path / "orig"
    _save(orig / "checkpoints", 16, 16)
    (orig / "run.json").write_text('{"checkpoints": "%s"}' % (orig / "checkpoints"))
    snap = tmp_path / "orig_snap"
    shutil.copytree(orig, snap)
    _save(orig / "checkpoints", 64, 64)  # the original trains on
    ckpt, homes = start.resolve_parent(str(snap))
    assert ckpt == f"{snap}/checkpoints/step-000000016" and str(snap) in homes
    moved = tmp_path / "moved"
    shutil.move(str(orig), moved)  # the original moved away: the copy still reads its own step 16
    assert start.resolve_parent(str(snap))[0] == f"{snap}/checkpoints/step-000000016"
    # a copy whose own checkpoints are gone is refused, not served the original's
    shutil.rmtree(snap / "checkpoints")
    shutil.copytree(moved, orig)
    with pytest.raises(RunError, match=r"no complete checkpoint there .*names .*orig/checkpoints, another run "
                                       r"directory's checkpoints: this one is a copy or a move"):
        start.resolve_parent(str(snap))
