"""The balancer's Gram carried on DDP's last gradient bucket (trainer.comm), on 2 gloo ranks."""
import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from balancing.base import DeferredGram
from tests.dist_utils import init_gloo, run_ranks
from trainer.comm import gram_bucket_hook

M = 3


class Net(nn.Module):
    """A hook on the first layer's output posts a 'Gram' in the backward, where the balancer's
    fan-out would: after the upper layers' gradients, before the first layer's."""

    def __init__(self, post=None):
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Linear(5, 64)
        self.rest = nn.Sequential(nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
        self.post = post

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.first(x)
        if self.post is not None:
            h.register_hook(self.post)
        return self.rest(h)


def _carried(steps: int):
    """DDP with small buckets (several per step) and the hook, next to plain DDP on the same
    data. Returns per step: what exchange() gave in its backward, the grads with the hook, the
    grads without."""
    init_gloo()
    rank = dist.get_rank()
    mailbox = DeferredGram(M)
    step, seen = 0, []
    carried = DistributedDataParallel(
        Net(lambda g: seen.append(mailbox.exchange(torch.full((M, M), 10.0 * step + rank + 1)))),
        bucket_cap_mb=0.01)
    carried.register_comm_hook((dist.group.WORLD, mailbox), gram_bucket_hook)
    mailbox.carried = True
    plain = DistributedDataParallel(Net(), bucket_cap_mb=0.01)
    out = []
    for step in range(steps):
        x = torch.randn(8, 5, generator=torch.Generator().manual_seed(10 * step + rank))
        carried(x).sum().backward()
        # carried within its own step, by the last bucket: nothing left pending after the backward
        assert mailbox.flight.pending is None, f"step {step}: the Gram was not carried"
        plain(x).sum().backward()
        collected = seen[-1]  # what the exchange in this backward returned: the previous step's
        out.append((None if collected is None else (collected[0] * collected[1]).numpy().copy(),
                    [p.grad.numpy().copy() for p in carried.parameters()],
                    [p.grad.numpy().copy() for p in plain.parameters()]))
        for p in list(carried.parameters()) + list(plain.parameters()):
            p.grad = None
    return out


def test_gram_rides_on_the_last_bucket_and_gradients_are_unchanged():
    r0, r1 = run_ranks(_carried, (4,))
    assert r0[0][0] is None and r1[0][0] is None  # nothing posted before the first step
    for step in range(1, 4):
        prev = step - 1
        # sum over ranks of (10 prev + rank + 1), / W^2
        want = np.full((M, M), ((10.0 * prev + 1) + (10.0 * prev + 2)) / 4)
        np.testing.assert_array_equal(r0[step][0], want)
        np.testing.assert_array_equal(r1[step][0], want)
    for rank_out in (r0, r1):
        for _, with_hook, without in rank_out:
            for a, b in zip(with_hook, without):
                np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    # the ranks' gradients were averaged (they saw different data)
    for a, b in zip(r0[2][1], r1[2][1]):
        np.testing.assert_array_equal(a, b)


def _train_steps(raw: dict, steps: int):
    import itertools

    from launch.config import RunConfig, from_dict
    from trainer.bench import random_batches
    from trainer.build import build_train_module, build_training, init_distributed
    cfg = from_dict(RunConfig, raw)
    env = init_distributed()
    module = build_train_module(cfg.data, cfg.model, cfg.balancer, env.device)
    _, _, pipeline = build_training(module, cfg, env)
    batches = itertools.islice(itertools.cycle(random_batches(cfg, 4, seed=env.rank)), steps)
    for _ in range(steps):
        pipeline.progress(batches)
    mailbox = module.balancer.deferred_gram()
    return mailbox.carried, module.balancer.weights.tolist()


def test_the_trainer_carries_multibalance_gram_on_ddp(tiny_config):
    """Through DMP + the train pipeline: the hook is installed (no all-reduce of its own) and
    the weights, computed from the carried Gram, agree on both ranks and have moved."""
    (carried0, w0), (carried1, w1) = run_ranks(_train_steps, (tiny_config, 6))
    assert carried0 and carried1
    assert w0 == w1
    assert max(abs(w - 1 / 3) for w in w0) > 1e-4
