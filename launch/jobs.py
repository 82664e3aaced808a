"""Jobs through torchx: `launch()` runs a component of launch/components.py on a scheduler and
returns the job's exit status (used by `mbrec launch`, `demo`, `compare` and `bench`)."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

from launch.config import load_config

log = logging.getLogger("mbrec")


def launch(config: str, overrides: List[str], scheduler: str, j: str, scheduler_args: Optional[str] = None,
           extra: Optional[List[str]] = None, component_fn: str = "train", pass_overrides: bool = True,
           port: int = 0) -> int:
    """Runs a torchx component of launch/components.py; returns the job's exit status (0 only
    if it succeeded). `port`: the rendezvous port (0: a free one on a single node, torchx's
    29500 across nodes)."""
    load_config(config, overrides)  # fail fast here on a bad config, not in every rank
    component = str(Path(__file__).with_name("components.py")) + ":" + component_fn
    # torchx, and the torchrun it starts, from this interpreter's environment: `.venv/bin/mbrec`
    # works without an activated venv
    cmd = [sys.executable, "-m", "torchx.cli.main", "run", "-s", scheduler] + (["-cfg", scheduler_args] if scheduler_args else [])
    cmd += [component, "--config", config, "-j", j] + (["--rdzv_port", str(port)] if port else []) + list(extra or [])
    cmd += ["--"] + list(overrides) if overrides and pass_overrides else []
    log.info("%s", " ".join(cmd))
    bindir = str(Path(sys.executable).parent)
    return subprocess.run(cmd, env={**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}).returncode
