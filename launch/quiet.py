"""Known-benign library warnings, each with the reason it is benign here. They are silenced
unless MBREC_ALL_WARNINGS=1; every other warning is shown (and kept in the rank's log file)."""
from __future__ import annotations

import logging
import os
import warnings

# (logger, text the message contains, why it is benign for this trainer)
BENIGN_LOG_LINES = [
    ("torchrec.distributed.planner.types", "The topology was constructed directly",
     "trainer.build.shard gives Topology the real device memory; nothing fails"),
    ("torchrec.distributed.planner.storage_reservations", "There is a known issue with TorchRec's dense tensor",
     "the plan is made on the real model, not in a dry run"),
    ("torch.fx._symbolic_trace", "is_fx_tracing will return true",
     "raised by torchrec's pipeline tracing; this project never calls is_fx_tracing"),
    ("root", "Successfully loaded: 'fbgemm_gpu",
     "fbgemm_gpu's import logs each of its ~14 kernel libraries at INFO (torchx's level): a failure to load raises"),
    ("root", "_fbgemm_torch_compat_table has no entry for 1.6.0",
     "fbgemm-gpu 1.6.0 (the GPU stack) lacks an entry for itself; it loads and runs with torch 2.11"),
]
# (category, message regex, why)
BENIGN_WARNINGS = [
    (FutureWarning, "HeuristicalStorageReservation is known to cause issues",
     "torchrec's default reservation; its over-estimate only applies to dry runs"),
    (FutureWarning, "`broadcast_buffers` is deprecated", "an argument torchrec's DMP passes to DDP"),
    (DeprecationWarning, ".*fbgemm_gpu", "fbgemm's own imports of its optional SSD kernels"),
    (UserWarning, "torch.distributed is disabled, unavailable or uninitialized",
     "DCP's note on a single-process read (no_dist=True): the metadata, progress and export reads are one process's "
     "on purpose"),
    (FutureWarning, "Please use DTensor instead and we are deprecating ShardedTensor",
     "raised by torchrec's own sharded state dict (its tables are ShardedTensors in these releases), not by our calls"),
    (UserWarning, "Grad strides do not match bucket view strides",
     "DDP copies such a gradient into its bucket instead of viewing it: a cost, never a different result"),
    (UserWarning, ".*non-tuple sequence for multidimensional indexing",
     "torchmetrics 1.0.3 (the version torchrec.metrics needs) indexes so; the meaning is unchanged in these torch "
     "releases"),
]


class _DropBenign(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def silence_benign() -> None:
    """Idempotent; called before the libraries are imported (fbgemm warns at import time)."""
    if os.environ.get("MBREC_ALL_WARNINGS") == "1":
        return
    for name, text, _ in BENIGN_LOG_LINES:
        logger = logging.getLogger(None if name == "root" else name)
        if not any(isinstance(f, _DropBenign) and f.text == text for f in logger.filters):
            logger.addFilter(_DropBenign(text))
    for category, regex, _ in BENIGN_WARNINGS:
        warnings.filterwarnings("ignore", message=regex, category=category)
