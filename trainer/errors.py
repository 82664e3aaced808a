"""Errors that end a run with a message naming what is wrong (the CLI prints it as the first
line and exits non-zero; no traceback)."""
from __future__ import annotations


class RunError(RuntimeError):
    """A run that cannot start, or cannot go on, without a wrong result. Not `restartable`: it
    fails every attempt alike (a restart of the job ends at once, see launch.failures)."""
    restartable = False


class NonFiniteError(RunError):
    """A non-finite loss, task gradient or weight: the run stops and writes no checkpoint."""


class CheckpointError(RunError):
    """A checkpoint that cannot be written or read."""


class AlreadyFinished(RunError):
    """The run in out_dir is finished (summary.json and its last checkpoint are there)."""


class NoCheckpoint(CheckpointError):
    """A directory that holds no complete checkpoint."""


class CheckpointWriteError(CheckpointError):
    """A save that failed in the store (a full disk, a failing or unreachable object store): a
    fault that a restart, resuming from the newest complete checkpoint, may mend."""
    restartable = True
