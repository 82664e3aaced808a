"""The unit that flows from the reader through the train pipeline into the model."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

# Reader counters carried by each Batch (kept on the host), in this order.
COUNTERS = ("dense_filled", "dense_nonfinite", "ids_remapped", "ids_null", "rows", "ids_hashed")


@dataclass
class Batch(Pipelineable):
    dense_features: torch.Tensor  # [B, D] float32
    sparse_features: KeyedJaggedTensor  # one key per sparse feature, B rows each
    labels: torch.Tensor  # [B, M] float32, 0 where unlabelled
    # [B, M] float32: the row's weight in the task's loss and metrics; 0 where unlabelled, else
    # 1, or the task's weight column
    label_mask: torch.Tensor
    counters: torch.Tensor  # [len(COUNTERS)] int64, host side, never moved to the device
    # [B] int64 group ids (eval with data.eval_group; see data.reader.group_ids), host side, or None
    group: Optional[torch.Tensor] = None

    def to(self, device: torch.device, non_blocking: bool = False) -> "Batch":
        return Batch(
            self.dense_features.to(device, non_blocking=non_blocking),
            self.sparse_features.to(device, non_blocking=non_blocking),
            self.labels.to(device, non_blocking=non_blocking),
            self.label_mask.to(device, non_blocking=non_blocking),
            self.counters,
            self.group,
        )

    def record_stream(self, stream: torch.Stream) -> None:
        self.dense_features.record_stream(stream)
        self.sparse_features.record_stream(stream)
        self.labels.record_stream(stream)
        self.label_mask.record_stream(stream)

    def pin_memory(self) -> "Batch":
        return Batch(
            self.dense_features.pin_memory(),
            self.sparse_features.pin_memory(),
            self.labels.pin_memory(),
            self.label_mask.pin_memory(),
            self.counters,
            self.group,
        )

    @staticmethod
    def padding(keys: List[str], num_dense: int, num_tasks: int) -> "Batch":
        """A one-row batch with no ids and no labels: it contributes nothing to any loss or
        metric. Ranks with fewer batches than others in an epoch step on these so that every
        rank runs the same number of collective steps (an uneven count would hang)."""
        return Batch(
            torch.zeros(1, num_dense),
            KeyedJaggedTensor.from_lengths_sync(
                keys, torch.zeros(0, dtype=torch.int64), torch.zeros(len(keys), dtype=torch.int32)
            ),
            torch.zeros(1, num_tasks),
            torch.zeros(1, num_tasks),
            torch.zeros(len(COUNTERS), dtype=torch.int64),
        )
