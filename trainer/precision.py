"""Numeric precision of the dense part: fp32, TF32 matmuls, or bf16 autocast."""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch import nn

PRECISIONS = ("fp32", "tf32", "bf16")


def autocast_dtype(precision: str) -> Optional[torch.dtype]:
    if precision not in PRECISIONS:
        raise ValueError(f"trainer.precision must be one of {PRECISIONS}, got {precision!r}")
    return torch.bfloat16 if precision == "bf16" else None


@contextlib.contextmanager
def precision_context(precision: str, device: torch.device) -> Iterator[None]:
    """The global matmul settings (TF32) for a training loop. Autocast (bf16) is NOT applied
    here: an autocast region caches the low-precision copies of the weights until it exits,
    so one region around many steps would keep computing with the weights of the first step.
    It is applied around each forward instead (`AutocastForward`, `MultiTaskTrain`)."""
    autocast_dtype(precision)  # validates
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def autocast_region(device_type: str, dtype: Optional[torch.dtype]) -> torch.autocast:
    """One autocast region (a no-op one for dtype None), opened per forward."""
    return torch.autocast(device_type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


class AutocastForward(nn.Module):
    """Runs `module`'s forward under autocast (None: as is); a fresh region every call."""

    def __init__(self, module: nn.Module, dtype: Optional[torch.dtype], device_type: str):
        super().__init__()
        self.module, self.dtype, self.device_type = module, dtype, device_type

    def forward(self, batch):
        with autocast_region(self.device_type, self.dtype):
            return self.module(batch)
