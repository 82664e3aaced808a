"""Errors that end a run with a message naming what is wrong (the CLI prints it as the first
line and exits non-zero; no traceback)."""
from __future__ import annotations


class RunError(RuntimeError):
    """A run that cannot start, or cannot go on, without a wrong result."""


class NonFiniteError(RunError):
    """A non-finite loss, task gradient or weight: the run stops and writes no checkpoint."""


class CheckpointError(RunError):
    """A checkpoint that cannot be written or read."""


class AlreadyFinished(RunError):
    """The run in out_dir is finished (summary.json and its last checkpoint are there)."""
