"""Checkpoint writes that fail mid-run end with an error naming the directory and its free
space, and leave the previous checkpoint as the one to resume from (2 gloo ranks)."""
import copy
import shutil
import subprocess
from pathlib import Path

import pytest

from launch.config import RunConfig, apply_overrides, from_dict
from tests.dist_utils import run_ranks


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _fill_disk_then_train(raw: dict, root: str, mount: str):
    """Run 1 measures a checkpoint; rank 0 mounts a tmpfs with room for one and a half; run 2
    saves there every 2 steps until the disk is full."""
    import torch.distributed as dist
    from trainer.loop import train
    r = apply_overrides(copy.deepcopy(raw), [f"trainer.out_dir='{root}/measure'", "trainer.max_steps=2"])
    train(from_dict(RunConfig, r))
    size = _dir_bytes(Path(root) / "measure" / "checkpoints" / "step-000000002")
    if dist.get_rank() == 0:
        Path(mount).mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(1.6 * size)}", "tmpfs", mount], check=True)
    dist.barrier()
    r = apply_overrides(copy.deepcopy(raw), [f"trainer.out_dir='{mount}/run'", "trainer.max_steps=8",
                                            "trainer.checkpoint_every=2", "trainer.keep_checkpoints=0"])
    try:
        train(from_dict(RunConfig, r))
    except Exception as e:  # what the scenario is about
        return type(e).__name__, str(e)
    return "ok", ""


@pytest.mark.skipif(shutil.which("mount") is None or subprocess.run(
    ["sh", "-c", "d=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs $d && umount $d"]).returncode != 0,
    reason="needs permission to mount a tmpfs (root)")
def test_full_disk_at_a_save_is_a_named_error(tiny_synth, tmp_path):
    from tests.conftest import tiny_config
    raw = tiny_config.__wrapped__(tiny_synth, tmp_path)
    raw["trainer"].update(log_every=0)
    mount = tmp_path / "small_disk"
    try:
        results = run_ranks(_fill_disk_then_train, (raw, str(tmp_path), str(mount)))
    finally:
        subprocess.run(["umount", str(mount)])
    for kind, msg in results:
        assert kind == "CheckpointWriteError", msg  # (a CheckpointError that a restart may mend)
        assert f"saving checkpoint {mount}/run/checkpoints/step-000000004 failed" in msg
        assert "GiB free at" in msg and "No space left on device" in msg and "Traceback" not in msg


def _blocked_save(raw: dict, root: str):
    from trainer.loop import train
    out = Path(root) / "blocked"
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    (out / "checkpoints" / "step-000000004").write_text("a file where the checkpoint should go")
    r = apply_overrides(copy.deepcopy(raw), [f"trainer.out_dir='{out}'", "trainer.max_steps=8",
                                            "trainer.checkpoint_every=2"])
    try:
        train(from_dict(RunConfig, r))
    except Exception as e:  # what the scenario is about
        return type(e).__name__, str(e)
    return "ok", ""


def test_failed_save_is_a_named_error_and_keeps_the_previous_checkpoint(tiny_synth, tmp_path):
    from tests.conftest import tiny_config
    from trainer.checkpoint import CheckpointDir
    raw = tiny_config.__wrapped__(tiny_synth, tmp_path)
    raw["trainer"].update(log_every=0)
    for kind, msg in run_ranks(_blocked_save, (raw, str(tmp_path))):
        assert kind == "CheckpointWriteError" and "step-000000004 failed" in msg, msg
    assert CheckpointDir(tmp_path / "blocked" / "checkpoints").latest().endswith("/step-000000002")
