"""Carrying a balancer's Gram matrix on DDP's gradient all-reduce.

A balancer that uses the previous step's Gram (`Balancer.deferred_gram()`, e.g. MultiBalance
with `deferred = true`) posts its local [M, M] Gram in the backward. Instead of a collective of
its own, which blocks the backward on gloo and adds a launch and a rank barrier everywhere, the
M^2 numbers ride along with DDP's last gradient bucket: that bucket is reduced after every
other gradient is ready, so after the balancer's backward (the first dense layers sit below
the shared representation), and DDP waits for it before the optimizer step.

(No `from __future__ import annotations`: DDP checks the hook's annotations at runtime.)
"""
import logging
from typing import Tuple

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torchrec.distributed.model_parallel import DefaultDataParallelWrapper, DistributedModelParallel
from torchrec.distributed.types import ShardingEnv

from balancing.base import DeferredGram

log = logging.getLogger(__name__)


def gram_bucket_hook(state: Tuple[dist.ProcessGroup, DeferredGram],
                     bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP's mean all-reduce of the bucket, with the posted Gram appended to the last one."""
    group, mailbox = state
    buf = bucket.buffer()  # [P] flat gradients
    buf.div_(dist.get_world_size(group))
    local = mailbox.take() if bucket.is_last() else None
    if local is None:
        return dist.all_reduce(buf, group=group, async_op=True).get_future().then(lambda f: f.value()[0])
    n = buf.numel()
    packed = torch.cat([buf, local.reshape(-1).to(buf.dtype)])  # [P + M^2]
    mailbox.receive(packed[n:])  # read in the next step's backward, long after DDP waited for it
    # DDP copies the returned view back into the bucket (its gradients are views of it)
    return dist.all_reduce(packed, group=group, async_op=True).get_future().then(lambda f: f.value()[0][:n])


class GramCarryingWrapper(DefaultDataParallelWrapper):
    """TorchRec's default DDP wrapping of the dense layers, plus `gram_bucket_hook`."""

    def __init__(self, mailbox: DeferredGram):
        super().__init__()
        self.mailbox = mailbox

    def wrap(self, dmp: DistributedModelParallel, env: ShardingEnv, device: torch.device) -> None:
        super().wrap(dmp, env, device)
        if env.world_size == 1:  # nothing to reduce: the mailbox hands the local Gram over as is
            return
        ddp = next((m for m in dmp.modules() if isinstance(m, DistributedDataParallel)), None)
        if ddp is None:  # nothing data-parallel: the mailbox runs its own all-reduce
            log.warning("no DDP module to carry the balancer's Gram: it uses an all-reduce of its own")
            return
        ddp.register_comm_hook((env.process_group, self.mailbox), gram_bucket_hook)
        self.mailbox.carried = True
