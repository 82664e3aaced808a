"""Faults through the real launcher (torchx local_cwd -> torchrun, 2 gloo ranks): a killed rank
restarts the job, which resumes and ends in the state of an uninterrupted run, and leaves none
of its own processes (forkserver, DataLoader workers) behind; a frozen rank
ends the job with an error after trainer.pg_timeout_s instead of hanging."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data.synth import data_section

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _cmd(tiny_synth, out: Path, *extra: str):
    d = data_section(tiny_synth)
    sets = [f"data.train={json.dumps(d['train'])}", f"data.eval={json.dumps(d['eval'])}",
            "data.batch_size=256", "trainer.epochs=3", "trainer.checkpoint_every=10", f"trainer.out_dir={out}",
            "trainer.progress_bar=false", "model.embedding_dim=8", "model.shared_arch=[32, 16]"]
    cmd = [sys.executable, "-m", "launch.cli", "launch", "launch/configs/demo.toml", "-s", "local_cwd", "-j", "1x2",
           *extra]
    return cmd + [a for s in sets for a in ("--set", s)]


def _env():
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}


def _rank_pid(rank: int, out: Path) -> int:
    """The training process of `rank` (a child of the torchrun agent; DataLoader workers are its children)."""
    for p in Path("/proc").iterdir():
        try:
            cmdline = (p / "cmdline").read_bytes().split(b"\0")
            environ = (p / "environ").read_bytes().split(b"\0")
            parent = Path(f"/proc/{(p / 'stat').read_text().rsplit(')', 1)[1].split()[1]}/cmdline").read_bytes()
        except (OSError, IndexError):
            continue
        if (b"train" in cmdline and str(out).encode() in b" ".join(cmdline) and f"RANK={rank}".encode() in environ
                and b"launch.agent" in parent):  # (torchrun, as launch.agent runs it)
            return int(p.name)
    raise AssertionError(f"no process of rank {rank} found")


def _when_checkpointed(out: Path, proc: subprocess.Popen, step: int = 10) -> None:
    deadline = time.time() + 300
    while not (out / "checkpoints" / f"step-{step:09d}" / ".metadata").exists():
        assert proc.poll() is None and time.time() < deadline, "the job ended before its first checkpoint"
        time.sleep(0.2)


def test_killed_rank_restarts_resumes_and_matches_the_straight_run(tiny_synth, tmp_path):
    straight = subprocess.run(_cmd(tiny_synth, tmp_path / "a", "--max-restarts", "0"), cwd=ROOT, env=_env(),
                              capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr[-3000:]
    out = tmp_path / "b"
    proc = subprocess.Popen(_cmd(tiny_synth, out, "--max-restarts", "1"), cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _when_checkpointed(out, proc)
    rank = _rank_pid(1, out)
    descendants = _descendants(rank)  # its forkserver, DataLoader worker and resource tracker
    assert len(descendants) >= 2, descendants
    os.kill(rank, signal.SIGKILL)
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log[-4000:]
    assert not [p for p in descendants if Path(f"/proc/{p}").exists()], "the killed rank's processes live on"
    assert "resumed from" in log
    a = json.loads((tmp_path / "a" / "summary.json").read_text())
    b = json.loads((out / "summary.json").read_text())
    assert b["steps"] == a["steps"] == 72
    assert b["final_weights"] == a["final_weights"] and b["eval"] == a["eval"]
    assert b["train_reader"] == a["train_reader"]  # every attempt's rows, each once (3 epochs x 12,000 rows)
    _assert_no_process_left(out)


def _descendants(pid: int) -> list:
    children = []
    for p in Path("/proc").iterdir():
        try:
            if p.name.isdigit() and int((p / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                children.append(int(p.name))
        except OSError:
            continue
    return children + [d for c in children for d in _descendants(c)]


def _assert_no_process_left(out: Path) -> None:
    """Nothing of the job outlives it (the killed rank's DataLoader workers die with it)."""
    time.sleep(1)
    left = [p.name for p in Path("/proc").iterdir() if p.name.isdigit() and _cmdline_has(p, str(out))]
    assert not left, f"processes of the job still alive: {left}"


def _cmdline_has(p: Path, text: str) -> bool:
    try:
        return text.encode() in (p / "cmdline").read_bytes()
    except OSError:
        return False


def test_frozen_rank_ends_the_job_with_an_error(tiny_synth, tmp_path):
    out = tmp_path / "c"
    proc = subprocess.Popen(_cmd(tiny_synth, out, "--max-restarts", "0") + ["--set", "trainer.pg_timeout_s=5"],
                            cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _when_checkpointed(out, proc)
    pid = _rank_pid(1, out)
    os.kill(pid, signal.SIGSTOP)
    t0 = time.time()
    try:
        log, _ = proc.communicate(timeout=200)
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode != 0
    assert time.time() - t0 < 150
    assert "a collective failed" in log and "trainer.pg_timeout_s" in log, log[-3000:]
    assert not (out / "summary.json").exists()
    _assert_no_process_left(out)


def test_a_config_error_runs_once_and_is_said_once(tiny_synth, tmp_path):
    """Under --max-restarts 2, an error of the config (a warm start from a directory without a
    checkpoint) trains once, not three times; its message is the job's only error line, said
    once (not once per rank and attempt), and the agent ends in one line, not a traceback."""
    cmd = _cmd(tiny_synth, tmp_path / "run", "--max-restarts", "2") + [
        "--set", f"trainer.init_from={tmp_path / 'nothing'}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    said = [ln for ln in text.splitlines() if "no complete checkpoint there" in ln]
    assert len(said) == 1 and len(said[0]) < 400, text[-4000:]
    assert "Traceback" not in text and "ChildFailedError" not in text, text[-4000:]
    assert "Successfully loaded" not in text
    assert "mbrec: the job failed: rank" in text
    log0 = (tmp_path / "run" / "logs" / "rank0.log").read_text()
    errors = [ln for ln in log0.splitlines() if " ERROR " in ln and "no complete checkpoint there" in ln]
    assert len(errors) == 1  # one attempt ran; the restarts ended at once
    # each of the 2 restarted attempts ended at once: at least one of its ranks says so (the other may
    # be stopped by torchrun before it writes a line)
    logs = [(tmp_path / "run" / "logs" / f"rank{r}.log").read_text() for r in (0, 1)]
    assert sum(t.count("not restarted: an earlier attempt of this job stopped") for t in logs) >= 2
