"""Numeric precision of the dense part: fp32, TF32 matmuls, or bf16 autocast."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, List, Optional, Tuple

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
    switches = tf32_switches()
    old = [getattr(holder, name) for holder, name, _, _ in switches]
    for holder, name, on, off in switches:
        setattr(holder, name, on if precision == "tf32" else off)
    try:
        yield
    finally:
        for (holder, name, _, _), value in zip(switches, old):
            setattr(holder, name, value)


def tf32_switches() -> List[Tuple[Any, str, Any, Any]]:
    """(holder, attribute, on, off) of the running torch's TF32 switches for matmuls and
    convolutions: the `fp32_precision` API where torch has it (reading the legacy `allow_tf32`
    flags raises once anything has used the new API), else the legacy flags."""
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        return [(torch.backends.cuda.matmul, "fp32_precision", "tf32", "ieee"),
                (torch.backends.cudnn.conv, "fp32_precision", "tf32", "ieee")]
    return [(torch.backends.cuda.matmul, "allow_tf32", True, False),
            (torch.backends.cudnn, "allow_tf32", True, False)]


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
