"""MultiBalance's host step compiled from C (`host_step.c`), called through ctypes.

In CPU training the M-sized step (`multibalance_update_host` and its neighbours) costs a
hundred-odd Python operations a step, 1-1.5 % of the demo's step time (docs/results/cost). The C
version performs the same double operations in the same order, so its results are the same
bits (tests/balancing/test_native_step.py); it is used where the state buffers are the host
stage it writes (CPU training) and the Gram is a contiguous float32 host tensor.

The library is built on first use with the system's C compiler (`$CC`, else `cc`) into a cache
folder (`$MBREC_CACHE_DIR`, else `$XDG_CACHE_HOME/mbrec` or `~/.cache/mbrec`; where that is not
writable, a private folder in the temp folder), named by a hash
of the source, flags, compiler and machine, so concurrent ranks and later runs reuse it. Without
a compiler, or with `MBREC_NATIVE_STEP=0`, the Python step runs (same results, slower): one
warning per process says why.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
from array import array
from pathlib import Path
from typing import Callable, Optional, Sequence

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("host_step.c")
# no fused multiply-add and no reassociation: the Python floats' operations, one by one
FLAGS = ("-O2", "-std=gnu11", "-fPIC", "-shared", "-ffp-contract=off", "-fno-fast-math")
ENV_SWITCH = "MBREC_NATIVE_STEP"
FLAG_BITS = {"ema": 1, "cosine": 2, "paper_rescale": 4, "capped": 8, "tracked": 16, "compensated_sum": 32}
# Python's sum() of floats is compensated (Neumaier) from 3.12 on: the C step sums as this Python does
COMPENSATED_SUM = sys.version_info >= (3, 12)


class _Ctx(ctypes.Structure):
    # mirrors `mb_ctx` in host_step.c
    _fields_ = [("m", ctypes.c_longlong), ("flags", ctypes.c_longlong),
                ("beta", ctypes.c_double), ("rho", ctypes.c_double), ("gamma", ctypes.c_double),
                ("eta", ctypes.c_double), ("scale", ctypes.c_double),
                ("prior", ctypes.c_void_p), ("last_delta", ctypes.c_void_p), ("moved", ctypes.c_void_p),
                ("reversals", ctypes.c_void_p), ("stage", ctypes.c_void_p), ("scratch", ctypes.c_void_p)]


def compiler() -> Optional[list]:
    cc = os.environ.get("CC")
    if cc:
        return shlex.split(cc)
    found = shutil.which("cc") or shutil.which("gcc")
    return [found] if found else None


def cache_dir() -> Path:
    if os.environ.get("MBREC_CACHE_DIR"):
        return Path(os.environ["MBREC_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mbrec"


def build(cc: Sequence[str], out_dir: Path) -> Path:
    """Compiles host_step.c with `cc` into out_dir (once per source, flags, compiler and machine);
    -> the library's path. Raises RuntimeError with the compiler's message."""
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([*cc, *FLAGS, platform.machine()]).encode()).hexdigest()[:16]
    lib = out_dir / f"mbrec_host_step-{key}.so"
    if lib.exists():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    if not os.access(out_dir, os.W_OK):
        raise PermissionError(f"{out_dir} is not writable")
    tmp = out_dir / f".{lib.name}.{os.getpid()}.tmp"  # then renamed: ranks building at once never read half a file
    try:
        done = subprocess.run([*cc, *FLAGS, str(SOURCE), "-o", str(tmp), "-lm"], capture_output=True, text=True)
    except OSError as e:
        raise RuntimeError(f"cannot run the C compiler {cc[0]!r}: {e}") from None
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        first = (done.stderr.strip().splitlines() or ["(no message)"])[0]
        raise RuntimeError(f"the C compiler {' '.join(cc)!r} failed on {SOURCE}: {first}")
    os.replace(tmp, lib)
    return lib


@functools.lru_cache(maxsize=None)
def library() -> Optional[ctypes.CDLL]:
    """The compiled step, built if needed; None (with one warning) where it cannot be."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        log.info("%s=0: MultiBalance's host step runs in Python", ENV_SWITCH)
        return None
    cc = compiler()
    try:
        if cc is None:
            raise RuntimeError("no C compiler found (set $CC)")
        try:
            path = build(cc, cache_dir())
        except OSError:  # the cache folder is not writable: a private one in the temp folder
            private = Path(tempfile.gettempdir()) / f"mbrec-{os.getuid()}"
            private.mkdir(mode=0o700, exist_ok=True)
            path = build(cc, private)
        lib = ctypes.CDLL(str(path))
    except (RuntimeError, OSError) as e:
        log.warning("MultiBalance's host step runs in Python (same results, ~1 %% slower a step on a CPU): %s", e)
        return None
    lib.mb_host_step.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_double]
    lib.mb_host_step.restype = ctypes.c_int
    return lib


class NativeStep:
    """The compiled step bound to one MultiBalance's stage and counters: `step(gram_ptr, factor)`
    -> 0 (done: the stage holds the new state) or 1 (nothing written: run the Python step).
    The arrays passed must live as long as this object and never be resized (their addresses are
    in the context). Not copied: a deep copy of the module gets None (its buffers are its own
    then, no longer the stage, so it takes the Python path anyway)."""

    def __init__(self, lib: ctypes.CDLL, m: int, flags: int, params: Sequence[float], prior: Sequence[float],
                 counters: Sequence[array], stage: array):
        self._keep = (array("d", prior), array("d", bytes(8 * (10 * m + 2 * m * m))), stage, *counters)
        prior_a, scratch = self._keep[:2]
        addr = [a.buffer_info()[0] for a in (prior_a, *counters, stage, scratch)]
        self._ctx = _Ctx(m, flags, *params, *addr)
        self.step: Callable[[int, float], int] = functools.partial(lib.mb_host_step, ctypes.addressof(self._ctx))

    def __reduce__(self):
        return _none, ()


def _none() -> None:
    return None


def flags_of(ema: bool, cosine: bool, paper_rescale: bool, capped: bool, tracked: bool) -> int:
    on = {"ema": ema, "cosine": cosine, "paper_rescale": paper_rescale, "capped": capped, "tracked": tracked,
          "compensated_sum": COMPENSATED_SUM}
    return sum(bit for name, bit in FLAG_BITS.items() if on[name])
