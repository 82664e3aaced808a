"""Known-benign library warnings, each with the reason it is benign here. They are silenced
unless MBREC_ALL_WARNINGS=1; every other warning is shown (and kept in the rank's log file)."""
from __future__ import annotations

import logging
import os
import warnings

# (logger, message start, why it is benign for this trainer)
BENIGN_LOG_LINES = [
    ("torchrec.distributed.planner.types", "The topology was constructed directly",
     "trainer.build.shard gives Topology the real device memory; nothing fails"),
    ("torchrec.distributed.planner.storage_reservations", "There is a known issue with TorchRec's dense tensor",
     "the plan is made on the real model, not in a dry run"),
    ("torch.fx._symbolic_trace", "is_fx_tracing will return true",
     "raised by torchrec's pipeline tracing; this project never calls is_fx_tracing"),
]
# (category, message regex, why)
BENIGN_WARNINGS = [
    (FutureWarning, "HeuristicalStorageReservation is known to cause issues",
     "torchrec's default reservation; its over-estimate only applies to dry runs"),
    (FutureWarning, "`broadcast_buffers` is deprecated", "an argument torchrec's DMP passes to DDP"),
    (DeprecationWarning, ".*fbgemm_gpu", "fbgemm's own imports of its optional SSD kernels"),
]


class _DropBenign(logging.Filter):
    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.start)


def silence_benign() -> None:
    if os.environ.get("MBREC_ALL_WARNINGS") == "1":
        return
    for name, start, _ in BENIGN_LOG_LINES:
        logging.getLogger(name).addFilter(_DropBenign(start))
    for category, regex, _ in BENIGN_WARNINGS:
        warnings.filterwarnings("ignore", message=regex, category=category)
