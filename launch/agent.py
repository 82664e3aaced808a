"""torchrun as mbrec's jobs start it (launch/components.py): the same elastic agent (rendezvous,
restarts), whose failure ends in one line naming the rank and its exit code, in place of
torchrun's traceback and failure table (the rank's own error, said above it, is what a user
needs; the table names the rank torchrun stopped, not the one that failed)."""
from __future__ import annotations

import sys

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main


def run() -> int:
    try:
        main()
    except ChildFailedError as e:
        rank, first = e.get_first_failure()
        print(f"mbrec: the job failed: rank {rank} exited with status {first.exitcode} (its error is "
              f"above, and in the run's logs/)", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run())
