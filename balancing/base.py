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
from typing import Dict, List, Optional, Tuple

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

    def deferred_gram(self) -> Optional["DeferredGram"]:
        """The mailbox of a method that uses the previous step's Gram, for the trainer to carry
        on DDP's gradient all-reduce; None for the others."""
        return None

    def combine_losses(self, losses: torch.Tensor) -> torch.Tensor:
        """losses [M] -> scalar."""
        return (self.weights * losses).sum()

    def stats(self) -> Dict[str, torch.Tensor]:
        return {"weight": self.weights}


@torch.fx.wrap
def fan_out(h: torch.Tensor, balancer: "GradientBalancer") -> torch.Tensor:
    # Wrapped for FX: the train pipeline traces the model, and an autograd.Function with a
    # Python object argument must appear as a single opaque call.
    return _FanOut.apply(h, balancer)


class _FanOut(torch.autograd.Function):
    """h [B, n'] -> [M, B, n'] (a broadcast view: no copy). The heads take its `unbind(0)`,
    whose backward stacks their M gradients in one op; this backward combines them."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, balancer: "GradientBalancer") -> torch.Tensor:
        ctx.balancer = balancer
        return h.expand(balancer.num_tasks, *h.shape)

    @staticmethod
    def backward(ctx, grads: torch.Tensor):
        # grads [M, B, n'] (zeros for a task whose loss had no labelled row)
        return ctx.balancer.combine_grads(grads), None


class GradientBalancer(Balancer):
    """Balances the task gradients w.r.t. the shared representation."""

    def __init__(self, num_tasks: int):
        super().__init__(num_tasks)
        self.register_buffer("grad_norm", torch.zeros(num_tasks))  # [M] ||g_m|| before
        self.register_buffer("grad_norm_balanced", torch.zeros(num_tasks))  # [M] after

    def forward(self, h: torch.Tensor) -> List[torch.Tensor]:
        copies = fan_out(h, self).unbind(0)  # indexed, not list()-ed: under FX tracing a Proxy
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


class _InFlight:
    """DeferredGram's per-step state: a plain object, as nn.Module attribute access is slow
    and this is touched in every backward."""
    __slots__ = ("pending", "work", "ready", "world")

    def __init__(self):
        self.pending: Optional[torch.Tensor] = None  # local Gram [M, M] of this step
        self.work = None  # its async all-reduce, without a carrier
        self.ready: Optional[torch.Tensor] = None  # the previous step's sum over ranks
        self.world = 0  # W, read at the first exchange (0: not yet)


class DeferredGram(nn.Module):
    """A Gram matrix posted in step t's backward and read back, summed over ranks, in step
    t+1's: the all-reduce then never blocks the backward.

    Transport: a trainer that wraps the dense layers in DDP can carry it on DDP's last gradient
    bucket (`trainer.comm`; it sets `carried`), which costs no collective of its own. Otherwise
    `exchange` starts an async all-reduce, waited for one step later. The sum in flight between
    two steps is part of the state_dict (`summed`, `valid`), so a resumed run continues exactly."""

    def __init__(self, num_tasks: int):
        super().__init__()
        self.register_buffer("summed", torch.zeros(num_tasks, num_tasks))  # [M, M], saved copy
        self.register_buffer("valid", torch.zeros(()))  # 1: `summed` holds a step's sum
        self.carried = False  # set by the carrier once it is installed
        self.flight = _InFlight()

    def exchange(self, local: torch.Tensor) -> Optional[Tuple[torch.Tensor, float]]:
        """Posts this step's local Gram [M, M]; returns the previous step's sum over ranks
        [M, M] (the carrier's dtype) and the factor that makes it the global Gram, 1 / W^2
        (left to the caller: free in Python floats), or None at the first step of a run."""
        f = self.flight
        if not f.world:
            f.world = world_size()
        summed = self._settle(f)
        f.ready, f.pending = None, local
        if not self.carried:
            if f.world > 1:
                f.work = dist.all_reduce(local, async_op=True)
            else:
                f.ready, f.pending = local, None
        return None if summed is None else (summed.view(local.shape), 1.0 / f.world ** 2)

    def take(self) -> Optional[torch.Tensor]:
        """For the carrier: this step's local Gram (None if nothing was posted)."""
        local, self.flight.pending = self.flight.pending, None
        return local

    def receive(self, summed: torch.Tensor) -> None:
        """For the carrier: `summed` (M^2 numbers, any shape and float dtype) holds the sum over
        ranks of the posted local Grams by the end of this step's backward (the all-reduce may
        still be in flight now; DDP waits for it before the optimizer step)."""
        self.flight.ready = summed

    @staticmethod
    def _settle(f: _InFlight) -> Optional[torch.Tensor]:
        """The previous step's sum (waiting for an all-reduce of our own if there is one)."""
        if f.work is not None:
            f.work.wait()
            f.work, f.ready, f.pending = None, f.pending, None
        elif f.pending is not None:
            raise RuntimeError("the Gram posted in the last backward was not carried: no DDP bucket "
                               "was reduced after the balancer's backward (no trainable dense parameter "
                               "below the shared representation?)")
        return f.ready

    # Overridden rather than hooked: DMP's load_state_dict calls `_load_from_state_dict` on each
    # module directly, without nn.Module's load hooks.
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        summed = self._settle(self.flight)
        self.valid.fill_(summed is not None)
        if summed is not None:
            self.summed.copy_(summed.view(self.summed.shape))
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.flight = _InFlight()
        self.flight.ready = self.summed.clone() if bool(self.valid) else None


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
