"""Preloaded first by the reader's forkserver (see data.reader.worker_context): the forkserver
asks the kernel to kill it when its rank dies.

Why: a rank killed with SIGKILL (the OOM killer, a pre-emption, a fault) runs no clean-up. Its
forkserver does not see its rank go (the DataLoader worker it forked holds one of its pipes
open), so it lived on, and with it the worker (whose own PR_SET_PDEATHSIG points at the
forkserver) and multiprocessing's resource tracker: 650 MB a rank, measured, after torchrun had
restarted or ended the job."""
import ctypes
import os
import signal
import sys

PARENT_ENV = "MBREC_READER_RANK_PID"  # set by the rank, when it starts its forkserver from its main thread
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _guard() -> None:
    # The forkserver is the process run as `python -c "from multiprocessing.forkserver import main; ..."`;
    # anything else that imports this module is left alone.
    if not sys.platform.startswith("linux") or "multiprocessing.forkserver" not in " ".join(sys.orig_argv):
        return
    parent = os.environ.get(PARENT_ENV, "")
    if not parent.isdigit():
        return
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != int(parent):  # the rank died before the call: nobody to serve
        os._exit(1)


_guard()
