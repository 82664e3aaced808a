"""How a rank ends when something fails, so that a job says what went wrong once, and restarts
only what a restart can mend.

- A rank that fails on its own (bad data, a bug) leaves the first line of its error in the run's
  `logs/` (a note) before it exits; a rank whose collective then fails (its peer is gone) says
  which rank failed and what it said, instead of gloo's or NCCL's own words.
- An error of the config, the data or the run's state (ConfigError, DataError, RunError that is
  not `restartable`) fails every attempt alike: the failing rank leaves a stop note for the job
  (keyed by torchrun's run id, unique per job), and the attempts torchrun then restarts end at
  once, without training again and without printing the error again. Restarts are for faults: a
  killed rank, a lost node, a store that failed mid-save.
- The same error met by every rank is printed by rank 0 only (the others keep it in their log file).
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Callable, Optional

from data.errors import DataError
from launch.config import ConfigError
from trainer.errors import RunError

log = logging.getLogger("mbrec")
COLLECTIVE_FAILURES = ("timeout", "timed out", "pair closure", "connection reset", "connection closed",
                       "connection refused", "nccl", "gloo")
FAILURE_NOTE = "failed-rank{rank}.txt"  # in the run's logs/: the first line of a rank's own error
STOP_NOTE = "stopped.json"  # in the run's logs/: this job met an error no restart can mend
NOTE_WAIT_S = 3.0  # how long a rank left in a failed collective looks for the failed rank's note
# how far apart the ranks of one attempt may start (imports on a loaded machine take seconds): a
# peer may fail, and leave its note, before this rank has started. Each rank removes its own old
# note when it starts, so an older note is one of a rank that never started this run
STARTUP_SKEW_S = 120.0
USER_ERRORS = (ConfigError, DataError, RunError, FileNotFoundError)  # said in one message, no traceback


class FileOnly(logging.Filter):
    """On the console handler: drops records logged with extra={"file_only": True}."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, "file_only", False)


def restartable(e: BaseException) -> bool:
    """Whether a restart may mend `e`: faults (anything but a user error), and the run errors that
    say so (a store that failed or froze during a save)."""
    if isinstance(e, RunError):
        return bool(getattr(e, "restartable", False))
    return not isinstance(e, USER_ERRORS)


def _job() -> str:
    """This job's id across its attempts and nodes (torchrun's --rdzv_id, torchx's app id)."""
    return os.environ.get("TORCHELASTIC_RUN_ID", "")


def stopped_earlier(logs: Path) -> Optional[str]:
    """The error an earlier attempt of this job stopped on, if this is a restart of such a job."""
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0" or _job() in ("", "none"):
        return None
    try:
        note = json.loads((logs / STOP_NOTE).read_text())
    except (OSError, ValueError):
        return None
    return note.get("error") if note.get("job") == _job() else None


def _leave_stop_note(logs: Path, rank: str, text: str) -> None:
    if _job() in ("", "none"):
        return
    # every failing rank writes it, and torchrun may kill one mid-write once another has exited:
    # written whole under a name of the rank's own, then renamed (a torn note would be unreadable,
    # and the next attempt would fail again, the same way)
    tmp = logs / f".{STOP_NOTE}.rank{rank}.tmp"
    try:
        tmp.write_text(json.dumps({"job": _job(), "rank": rank, "error": text,
                                   "attempt": os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")}))
        os.replace(tmp, logs / STOP_NOTE)
    except OSError:  # a courtesy to the next attempt: without it that attempt fails again, the same way
        pass


def run_rank(fn: Callable[[], object], logs: Path, pg_timeout_s: float) -> int:
    """fn() on this rank -> exit code (see the module's docstring)."""
    rank, started = os.environ.get("RANK", "0"), time.time()
    earlier = stopped_earlier(logs)
    if earlier is not None:
        log.info("not restarted: an earlier attempt of this job stopped on an error no restart can mend: %s",
                 earlier, extra={"file_only": True})
        return 2
    try:
        (logs / FAILURE_NOTE.format(rank=rank)).unlink(missing_ok=True)  # from an earlier run or attempt
    except OSError:
        pass
    try:
        fn()
    except RuntimeError as e:
        if not _collective_failure(e):
            _note_failure(logs, rank, e)
            raise
        first = _first_failure(logs, rank, started - STARTUP_SKEW_S)
        if first:
            log.error("rank %s failed: see its first error (%s): %s", first[0], logs / f"rank{first[0]}.log", first[1])
        else:
            log.error("a collective failed on rank %s (another rank died, was killed or froze; a frozen rank is "
                      "detected after trainer.pg_timeout_s = %gs): %s", rank, pg_timeout_s,
                      str(e).splitlines()[0] if str(e) else type(e).__name__)
        return 3
    except Exception as e:  # noted for the other ranks, then reported as usual (see say)
        _note_failure(logs, rank, e)
        raise
    return 0


def headline(e: BaseException) -> str:
    """The first line of an error's message (its class's name for anything but a user error)."""
    text = str(e).splitlines()[0] if str(e) else ""
    return text if isinstance(e, USER_ERRORS) else f"{type(e).__name__}: {text}"


def said_by_rank0(logs: Optional[Path], e: BaseException) -> bool:
    """On a rank other than 0: whether rank 0 noted the same error (then rank 0 prints it)."""
    rank = os.environ.get("RANK", "0")
    if rank == "0" or logs is None:
        return False
    deadline = time.time() + NOTE_WAIT_S
    while time.time() < deadline:
        try:
            if (logs / FAILURE_NOTE.format(rank=0)).read_text().strip() == headline(e):
                return True
        except OSError:
            pass
        time.sleep(0.2)
    return False


def _note_failure(logs: Path, rank: str, e: Exception) -> None:
    try:
        (logs / FAILURE_NOTE.format(rank=rank)).write_text(headline(e) + "\n")
    except OSError:  # the note is a courtesy to the other ranks; the error itself is what matters
        pass
    if not restartable(e):
        _leave_stop_note(logs, rank, headline(e))


def _first_failure(logs: Path, rank: str, since: float) -> Optional[tuple]:
    """(rank, first line) of the earliest note another rank left in this attempt, if any."""
    deadline = time.time() + NOTE_WAIT_S
    while True:
        notes = []
        for p in logs.glob(FAILURE_NOTE.format(rank="*")):
            other = p.name[len("failed-rank"):-len(".txt")]
            try:
                if other != rank and p.stat().st_mtime >= since:
                    notes.append((p.stat().st_mtime, other, p.read_text().strip()))
            except OSError:
                continue
        if notes or time.time() > deadline:
            return min(notes)[1:] if notes else None
        time.sleep(0.2)


def _collective_failure(e: RuntimeError) -> bool:
    """gloo / NCCL errors of a collective whose peer died, froze or timed out (a DistError, or,
    from torchrec's own collectives, a RuntimeError saying so)."""
    import torch.distributed as dist
    return isinstance(e, dist.DistError) or any(k in str(e).lower() for k in COLLECTIVE_FAILURES)
