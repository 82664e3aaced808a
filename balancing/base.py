"""The balancer interface.

A balancer sits between the shared representation h [B, n'] and the M task heads:

    hs = balancer(h)                    # M inputs for the heads (copies of h)
    loss = balancer.combine_losses(L)   # L: per-task losses [M] -> the scalar to backward

Loss-level methods (equal, fixed weights) only reweight L and hand the heads h itself.
Gradient-level methods (MultiBalance) subclass `GradientBalancer`: `forward` is an autograd
fan-out whose backward receives all M task gradients w.r.t. h at once, inside the single
backward pass, and returns their combination to the shared layers. Per-task backward calls
would run the fused embedding optimizer M times; this does not.

State lives in buffers (checkpointed with the model). `stats()` exposes what is logged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch
import torch.distributed as dist
from torch import nn


class Balancer(nn.Module):
    def __init__(self, num_tasks: int):
        super().__init__()
        self.num_tasks = num_tasks
        self.register_buffer("weights", torch.ones(num_tasks))  # [M] current task weights

    def attach(self, model: nn.Module) -> None:
        """Called once with the model; methods that need its parameters take them here."""

    def forward(self, h: torch.Tensor) -> List[torch.Tensor]:
        return [h] * self.num_tasks

    def combine_losses(self, losses: torch.Tensor) -> torch.Tensor:
        """losses [M] -> scalar."""
        return (self.weights * losses).sum()

    def stats(self) -> Dict[str, torch.Tensor]:
        return {"weight": self.weights}


@torch.fx.wrap
def fan_out(h: torch.Tensor, balancer: "GradientBalancer") -> Tuple[torch.Tensor, ...]:
    # Wrapped for FX: the train pipeline traces the model, and an autograd.Function with a
    # Python object argument must appear as a single opaque call.
    return _FanOut.apply(h, balancer)


class _FanOut(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, balancer: "GradientBalancer") -> Tuple[torch.Tensor, ...]:
        ctx.balancer = balancer
        return tuple(h.view_as(h) for _ in range(balancer.num_tasks))

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        # grads: M tensors [B, n'] (zeros for a task whose loss had no labelled row)
        return ctx.balancer.combine_grads(torch.stack(grads)), None


class GradientBalancer(Balancer):
    """Balances the task gradients w.r.t. the shared representation."""

    def __init__(self, num_tasks: int):
        super().__init__(num_tasks)
        self.register_buffer("grad_norm", torch.zeros(num_tasks))  # [M] ||g_m|| before
        self.register_buffer("grad_norm_balanced", torch.zeros(num_tasks))  # [M] after

    def forward(self, h: torch.Tensor) -> List[torch.Tensor]:
        copies = fan_out(h, self)  # indexed, not list()-ed: under FX tracing this is a Proxy
        return [copies[m] for m in range(self.num_tasks)]

    def combine_losses(self, losses: torch.Tensor) -> torch.Tensor:
        return losses.sum()  # the weighting happens on the gradients

    def combine_grads(self, grads: torch.Tensor) -> torch.Tensor:
        """grads [M, B, n'] -> combined gradient [B, n']."""
        raise NotImplementedError

    def global_gram(self, grads: torch.Tensor) -> torch.Tensor:
        """Gram matrix [M, M] of the task gradients over the global batch.

        Under data parallelism the global loss is the mean of the ranks' losses, so the
        global gradient w.r.t. the global h is the concatenation of the local ones / W:
        Gram_global = sum_r Gram_r / W^2 (one all-reduce of M^2 numbers). It runs on the
        default group, from the autograd thread, at the same point of every rank's backward,
        so its order among DDP's bucket all-reduces is the same on every rank."""
        gram = local_gram(grads)
        world = world_size()
        if world > 1:
            dist.all_reduce(gram)
            gram = gram / world**2
        return gram

    def stats(self) -> Dict[str, torch.Tensor]:
        return {"weight": self.weights, "grad_norm": self.grad_norm,
                "grad_norm_balanced": self.grad_norm_balanced}


def combine(coef: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """sum_m coef_m grads_m: coef [M], grads [M, ...] -> [...], as one matrix-vector product."""
    return (coef.to(grads.dtype) @ grads.reshape(grads.shape[0], -1)).view(grads.shape[1:])


def local_gram(grads: torch.Tensor) -> torch.Tensor:
    flat = grads.reshape(grads.shape[0], -1)  # [M, B * n']
    if flat.dtype in (torch.float16, torch.bfloat16):
        flat = flat.float()  # under autocast: the M x M statistics in fp32
    return flat @ flat.T  # [M, M]


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@dataclass
class NoConfig:
    """For methods without hyperparameters."""
