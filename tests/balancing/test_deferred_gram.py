"""DeferredGram's carrier: a Gram posted in a backward reaches the next backward reduced over
ranks by DDP's own all-reduce (2 gloo ranks), without touching the other gradients."""
import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from balancing.base import DeferredGram, GradientBalancer
from tests.dist_utils import init_gloo, run_ranks

M = 3


class Posting(GradientBalancer):
    """Sums the task gradients and posts a known 'Gram' (10 step + rank + 1 everywhere);
    records what each exchange returned. mailbox None: a plain fan-out."""

    def __init__(self, mailbox):
        super().__init__(M)
        self.mailbox, self.step, self.seen = mailbox, 0, []

    def deferred_gram(self):
        return self.mailbox

    def combine_grads(self, grads):
        if self.mailbox is not None:
            local = torch.full((M, M), 10.0 * self.step + dist.get_rank() + 1)
            self.seen.append(self.mailbox.exchange(local))
        return grads.sum(0)


class Net(nn.Module):
    def __init__(self, balancer):
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Linear(5, 64)
        self.balancer = balancer
        self.heads = nn.Sequential(nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))

    def forward(self, x):
        return self.heads(self.balancer(self.first(x))).sum()


def grads(net):
    return [p.grad.numpy().copy() for n, p in net.named_parameters() if "carrier" not in n]


def _carried(steps: int):
    """DDP with small buckets (several per step) carrying the Gram, next to DDP without a
    mailbox on the same data. Per step: what exchange() gave, the grads with and without."""
    init_gloo()
    rank = dist.get_rank()
    balancer = Posting(DeferredGram(M))
    carried = DistributedDataParallel(Net(balancer), bucket_cap_mb=0.01)
    balancer.mailbox.carried = True
    plain = DistributedDataParallel(Net(Posting(None)), bucket_cap_mb=0.01)
    out = []
    for step in range(steps):
        balancer.step = step
        x = torch.randn(8, 5, generator=torch.Generator().manual_seed(10 * step + rank))
        carried(x).backward()
        plain(x).backward()
        previous = balancer.seen[-1]  # what the exchange in this backward returned: the previous step's
        out.append((None if previous is None else (previous[0] * previous[1]).numpy().copy(),
                    grads(carried), grads(plain)))
        for p in list(carried.parameters()) + list(plain.parameters()):
            if p is not balancer.mailbox.carrier:  # as the trainer's optimizer: the carrier is not its own
                p.grad = None
    return out


def test_gram_rides_on_ddp_and_gradients_are_unchanged():
    r0, r1 = run_ranks(_carried, (4,))
    assert r0[0][0] is None and r1[0][0] is None  # nothing posted before the first step
    for step in range(1, 4):
        prev = step - 1
        # sum over ranks of (10 prev + rank + 1), / W^2: the previous step's only (nothing accumulates)
        want = np.full((M, M), ((10.0 * prev + 1) + (10.0 * prev + 2)) / 4)
        np.testing.assert_allclose(r0[step][0], want, rtol=1e-6)
        np.testing.assert_allclose(r1[step][0], want, rtol=1e-6)
    for rank_out in (r0, r1):
        for _, with_mailbox, without in rank_out:
            for a, b in zip(with_mailbox, without):
                np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    # the ranks' gradients were averaged (they saw different data)
    for a, b in zip(r0[2][1], r1[2][1]):
        np.testing.assert_array_equal(a, b)


def test_the_gram_in_flight_survives_a_state_dict_round_trip():
    """Saved between two steps and loaded into a fresh mailbox: the next exchange returns the
    same global Gram (carried: DDP's mean in carrier.grad, factor 1 / W)."""
    mailbox = DeferredGram(M)
    mailbox.carried = True
    assert mailbox.exchange(torch.ones(M, M)) is None
    mailbox.carrier.grad = torch.arange(M * M, dtype=torch.float32)  # as DDP writes it back
    fresh = DeferredGram(M)
    fresh.load_state_dict(mailbox.state_dict())
    fresh.carried = True
    gram, factor = fresh.exchange(torch.zeros(M, M))
    np.testing.assert_array_equal((gram * factor).numpy(), np.arange(M * M).reshape(M, M))
    gram, factor = mailbox.exchange(torch.zeros(M, M))  # the saved one continues unchanged
    np.testing.assert_array_equal((gram * factor).numpy(), np.arange(M * M).reshape(M, M))
    assert mailbox.carrier.grad is None and mailbox.take() is not None
    # the loaded mailbox goes on to the next step as a fresh one does: DDP's mean read back [M, M]
    fresh.carrier.grad = fresh.take() + 1
    gram, factor = fresh.exchange(torch.zeros(M, M))
    assert gram.shape == (M, M) and factor == 1.0
    np.testing.assert_array_equal(gram.numpy(), np.ones((M, M)))
