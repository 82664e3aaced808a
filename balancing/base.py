"""The balancer interface.

A balancer sits between the shared representation h [B, n'] and the M task heads:

    hs = balancer(h)                    # [M, B, n']: one input per head (copies of h)
    loss = balancer.combine_losses(L)   # L: per-task losses [M] -> the scalar to backward

Loss-level methods (equal, fixed weights) only reweight L and hand the heads a broadcast view
of h (autograd sums the heads' gradients).
Gradient-level methods (MultiBalance) subclass `GradientBalancer`: `forward` is an autograd
fan-out whose backward receives all M task gradients w.r.t. h at once, inside the single
backward pass, and returns their combination to the shared layers. Per-task backward calls
would run the fused embedding optimizer M times; this does not.

State lives in buffers (checkpointed with the model). `stats()` exposes what is logged.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
import logging
import math
import time
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

log = logging.getLogger(__name__)

# Named ranges around the parts of a balancer's step, for `mbrec bench --breakdown`: torch
# profiler ranges, or wall-clock timers (inclusive: a range's time contains its inner ranges').
# Off by default: a torch record_function costs ~6 us even with no profiler running, which is
# what this code is measured against; off, a scope is one shared no-op context (~0.2 us).
_NO_SCOPE = contextlib.nullcontext()
_scopes: Optional[str] = None  # None, "profiler" or "timer"
SCOPE_TIMES: Dict[str, List[float]] = {}  # "timer": name -> [seconds, calls]


def profile_scopes(mode: Optional[str]) -> None:
    """Sets the balancers' named ranges (`scope`) for this process: "profiler", "timer" (adding
    to SCOPE_TIMES) or None (off)."""
    global _scopes
    if mode not in (None, "profiler", "timer"):
        raise ValueError(f"scope mode must be None, 'profiler' or 'timer', got {mode!r}")
    _scopes = mode


class _Timer:
    __slots__ = ("name", "t0")

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        acc = SCOPE_TIMES.setdefault(self.name, [0.0, 0])
        acc[0] += time.perf_counter() - self.t0
        acc[1] += 1
        return False


def scope(name: str):
    """A range `mbrec.<name>` as `profile_scopes` set it, else a no-op."""
    if _scopes is None:
        return _NO_SCOPE
    return torch.profiler.record_function(f"mbrec.{name}") if _scopes == "profiler" else _Timer(name)


class Balancer(nn.Module):
    def __init__(self, num_tasks: int):
        super().__init__()
        self.num_tasks = num_tasks
        self.register_buffer("weights", torch.ones(num_tasks))  # [M] current task weights

    def attach(self, model: nn.Module) -> None:
        """Called once with the model; methods that need its parameters take them here."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h [B, n'] -> [M, B, n'] (a broadcast view: no copy)."""
        return h.expand(self.num_tasks, -1, -1)

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
    with scope("fan_out"):
        mailbox = balancer.deferred_gram()
        if mailbox is not None and h.is_cuda and torch.is_grad_enabled():
            mailbox.prefetch()  # the backward of this forward reads the previous step's Gram
        return _FanOut.apply(h, None if mailbox is None else mailbox.param(), balancer)


class _FanOut(torch.autograd.Function):
    """h [B, n'] -> [M, B, n'] (a broadcast view: no copy). The batched heads hand back its
    gradient as one [M, B, n'] tensor; this backward combines the M slices, and hands the local
    Gram a deferred method posted to its mailbox's carrier as the carrier's gradient."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, carrier: Optional[torch.Tensor], balancer: "GradientBalancer") -> torch.Tensor:
        ctx.balancer = balancer
        return h.expand(balancer.num_tasks, *h.shape)

    @staticmethod
    def backward(ctx, grads: torch.Tensor):
        # grads [M, B, n'] (zeros for a task whose loss had no labelled row)
        with scope("fan_out_backward"):
            combined = ctx.balancer.combine_grads(grads)
            mailbox = ctx.balancer.deferred_gram()
            return combined, None if mailbox is None else mailbox.take(), None


class GradientBalancer(Balancer):
    """Balances the task gradients w.r.t. the shared representation."""

    def __init__(self, num_tasks: int):
        super().__init__(num_tasks)
        self.register_buffer("grad_norm", torch.zeros(num_tasks))  # [M] ||g_m|| before
        self.register_buffer("grad_norm_balanced", torch.zeros(num_tasks))  # [M] after

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return fan_out(h, self)

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
            with scope("gram_all_reduce"):
                dist.all_reduce(gram)
            gram = gram / world**2
        return gram

    def stats(self) -> Dict[str, torch.Tensor]:
        return {"weight": self.weights, "grad_norm": self.grad_norm,
                "grad_norm_balanced": self.grad_norm_balanced}


CARRIER_FLAG = "carries_gram"


def carries_gram(p: torch.Tensor) -> bool:
    """Whether `p` is a DeferredGram carrier: reduced by DDP with the dense gradients, never
    optimised (the trainer keeps it out of the optimizer)."""
    return getattr(p, CARRIER_FLAG, False)


def bind_carrier(gram: Optional["DeferredGram"], wrapped: nn.Module) -> None:
    """After the trainer wrapped the model for data parallelism: `gram` travels on DDP's
    all-reduce if a DistributedDataParallel inside `wrapped` holds its carrier; otherwise it
    uses an all-reduce of its own. The one place that knows how the Gram rides on DDP."""
    if gram is None:
        return
    gram.carried = any(p is gram.carrier for m in wrapped.modules() if isinstance(m, DistributedDataParallel)
                       for p in m.parameters())
    if not gram.carried and world_size() > 1:
        log.warning("DDP does not reduce the balancer's Gram carrier: it uses an all-reduce of its own")


def optimizable(named_params):
    """(name, parameter) pairs an optimizer may step: without Gram carriers, whose gradient is a
    message, not a gradient."""
    return [(n, p) for n, p in named_params if not carries_gram(p)]


class _InFlight:
    """DeferredGram's per-step state: a plain object, as nn.Module attribute access is slow
    and this is touched in every backward."""
    __slots__ = ("outgoing", "pending", "work", "ready", "restored", "host", "copied", "world", "m")

    def __init__(self, m: int):
        self.outgoing: Optional[torch.Tensor] = None  # [M^2] this step's local Gram, for the carrier
        self.pending: Optional[torch.Tensor] = None  # without a carrier: the local Gram being reduced
        self.work = None  # its async all-reduce
        self.ready: Optional[torch.Tensor] = None  # without a carrier: the previous step's sum
        self.restored: Optional[Tuple[torch.Tensor, float]] = None  # (reduced Gram, factor), from a checkpoint
        self.host: Optional[torch.Tensor] = None  # carrier.grad being copied to pinned host memory
        self.copied = None  # the event that copy completes
        self.world = 0  # W, read at the first exchange (0: not yet)
        self.m = m  # M, the Gram's side


class DeferredGram(nn.Module):
    """A Gram matrix posted in step t's backward and read back, reduced over ranks, in step
    t+1's: the reduction never blocks the backward.

    Transport: `carrier`, a parameter of M^2 zeros that the forward never reads; the fan-out's
    backward hands the posted local Gram over as its gradient. Under DDP (the trainer checks that
    DDP holds it and sets `carried`) it is averaged over ranks by DDP's own all-reduce, in a bucket
    with the dense gradients: no collective, hook or Python of its own, on any backend; DDP writes
    the mean back to `carrier.grad` before the optimizer step, and the next backward reads it there.
    Without a carrier, `exchange` starts an async all-reduce of its own, waited for one step
    later. The global Gram in flight between two steps is part of the state_dict (`summed`,
    `valid`), so a resumed run continues exactly."""

    def __init__(self, num_tasks: int):
        super().__init__()
        self.carrier = nn.Parameter(torch.zeros(num_tasks * num_tasks))  # [M^2]; its .grad carries
        setattr(self.carrier, CARRIER_FLAG, True)
        self.register_buffer("summed", torch.zeros(num_tasks, num_tasks))  # [M, M] reduced Gram, saved copy
        # its factor (1/W or 1/W^2), float64: kept apart so a resumed run multiplies exactly as
        # the straight run does (a product stored in float32 would round differently)
        self.register_buffer("factor", torch.zeros((), dtype=torch.float64))
        self.register_buffer("valid", torch.zeros(()))  # 1: `summed` holds a step's Gram
        self.carried = False  # set by the trainer when DDP reduces `carrier`
        self.flight = _InFlight(num_tasks)

    def param(self) -> nn.Parameter:
        """`carrier`, read from the parameter dict: `self.carrier` goes through nn.Module.__getattr__
        (microseconds, on every step's path)."""
        return self._parameters["carrier"]

    def exchange(self, local: torch.Tensor) -> Optional[Tuple[torch.Tensor, float]]:
        """Posts this step's local Gram [M, M]; returns the previous step's reduced Gram [M, M]
        and the factor that makes it the global Gram (1 / W for DDP's mean, 1 / W^2 for a sum;
        left to the caller: free in Python floats), or None at the first step of a run."""
        f = self.flight
        previous = self._settle(f, consume=True)
        if self.carried:
            carrier = self.param()
            f.outgoing = local.reshape(-1) if local.dtype == carrier.dtype else local.reshape(-1).to(carrier.dtype)
        elif f.world > 1:
            f.pending, f.work = local, dist.all_reduce(local, async_op=True)
        else:
            f.ready = local
        return previous

    def prefetch(self) -> None:
        """Called in the forward: on an accelerator, starts copying the carried Gram (final since
        the last backward) to pinned host memory. The backward then reads it on the host, long
        after the copy ran, without stalling the device queue, and the balancer's M-sized step
        runs there in Python floats instead of as ~40 tiny kernels."""
        f = self.flight
        mean = self.param().grad if self.carried and f.restored is None else None
        if mean is None or not mean.is_cuda:
            return
        f.host = torch.empty(mean.shape, dtype=mean.dtype, pin_memory=True)
        f.host.copy_(mean, non_blocking=True)
        f.copied = torch.cuda.Event()
        f.copied.record()

    def take(self) -> Optional[torch.Tensor]:
        """For the fan-out's backward: the carrier's gradient [M^2] (None without a carrier)."""
        out, self.flight.outgoing = self.flight.outgoing, None
        return out

    def _settle(self, f: _InFlight, consume: bool) -> Optional[Tuple[torch.Tensor, float]]:
        """The previous step's reduced Gram and its factor; `consume`: as the next step's input."""
        if not f.world:
            f.world = world_size()  # read once, at the first use (after the process group exists)
        if f.restored is not None:
            previous = f.restored
            if consume:
                f.restored, self.carrier.grad = None, None
            return previous
        if self.carried:
            carrier = self.param()
            mean = carrier.grad  # DDP's mean over ranks, written back after last step's backward
            if f.host is not None:  # prefetched in the forward
                f.copied.synchronize()
                mean = f.host
            if consume:  # this step's gradient then replaces it instead of adding to it
                carrier.grad, f.host, f.copied = None, None, None
            return None if mean is None else (mean.view(f.m, f.m), 1.0 / f.world)
        if f.work is not None:
            f.work.wait()
            f.work, f.ready, f.pending = None, f.pending, None
        if f.ready is None:
            return None
        previous = (f.ready, 1.0 / f.world ** 2)
        if consume:
            f.ready = None
        return previous

    # Overridden rather than hooked: DMP's load_state_dict calls `_load_from_state_dict` on each
    # module directly, without nn.Module's load hooks.
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        previous = self._settle(self.flight, consume=False)
        self.valid.fill_(previous is not None)
        if previous is not None:
            self.summed.copy_(previous[0].view(self.summed.shape))
            self.factor.fill_(previous[1])
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.flight = _InFlight(self.summed.shape[0])
        self.flight.restored = (self.summed.clone(), float(self.factor)) if bool(self.valid) else None
        self.carrier.grad = None


def combine(coef: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """sum_m coef_m grads_m: coef [M], grads [M, ...] -> [...], as one matrix-vector product."""
    with scope("combine"):
        coef = coef if coef.dtype == grads.dtype else coef.to(grads.dtype)
        m, *rest = grads.shape  # ints: a view to a torch.Size parses slower (~6 us a call)
        return (coef @ grads.reshape(m, -1)).view(*rest)


GRAM_CHUNKS = 256  # at most; on accelerators (see local_gram)


def local_gram(grads: torch.Tensor) -> torch.Tensor:
    """grads [M, ...] -> Gram matrix [M, M] of the flattened task gradients. On an accelerator
    the product [M, N] x [N, M] is a skinny GEMM that runs far below memory speed; split into C
    chunks it becomes C small products in one batched kernel that read each gradient once."""
    with scope("local_gram"):
        flat = grads.reshape(grads.shape[0], -1)  # [M, B * n']
        if flat.dtype in (torch.float16, torch.bfloat16):
            flat = flat.float()  # under autocast: the M x M statistics in fp32
        return chunked_gram(flat, 1 if flat.is_cpu else math.gcd(flat.shape[1], GRAM_CHUNKS))


def chunked_gram(flat: torch.Tensor, chunks: int) -> torch.Tensor:
    """flat [M, N] -> flat flat^T [M, M] as the sum of `chunks` (a divisor of N) partial Grams."""
    if chunks == 1:
        return flat @ flat.T
    parts = flat.view(flat.shape[0], chunks, -1).transpose(0, 1)  # [C, M, N / C], a view
    return torch.bmm(parts, parts.transpose(1, 2)).sum(0)  # [C, M, M] -> [M, M]


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@dataclass
class NoConfig:
    """For methods without hyperparameters."""
