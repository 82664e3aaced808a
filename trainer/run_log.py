"""Run logs on rank 0: `metrics.jsonl` (one JSON object per record) and TensorBoard events."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Dict

from torch.utils.tensorboard import SummaryWriter


class RunLog:
    def __init__(self, out_dir: str | Path, enabled: bool):
        self.enabled = enabled
        if enabled:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            self.file = open(Path(out_dir) / "metrics.jsonl", "a")
            self.tb = SummaryWriter(str(Path(out_dir) / "tb"))

    def write(self, kind: str, step: int, values: Dict[str, Any]) -> None:
        """values: flat {name: number or list of numbers (one per task)} (lists go to TB per task)."""
        if not self.enabled:
            return
        self.file.write(json.dumps({"kind": kind, "step": step, "time": time.time(), **values}) + "\n")
        self.file.flush()
        for name, v in values.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self.tb.add_scalar(f"{kind}/{name}", v, step)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            self.tb.close()
