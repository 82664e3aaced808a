"""Every method gives the same weights on 2 gloo ranks as one process on the global batch."""
import numpy as np
import torch

from tests.balancing.test_methods_vs_references import B, grads_for, make
from tests.dist_utils import init_gloo, run_ranks

METHODS = ["pcgrad", "gradvac", "dbmtl", "imtlg", "mgda", "moco", "multibalance", "multibalance_paper"]
PAPER = {"step": "paper", "gram_ema": 0.0}  # the paper's form (the default tracks the Gram)


def _make(method):
    return make("multibalance", **PAPER) if method == "multibalance_paper" else make(method)


def step(balancer, local):
    h = torch.zeros(local.shape[1:], dtype=torch.float64, requires_grad=True)
    copies = balancer(h)
    losses = torch.stack([(c * g).sum() + 1.0 for c, g in zip(copies, local)])
    balancer.combine_losses(losses).backward()
    return balancer.stats()["weight"].numpy().copy()


def _ranks():
    init_gloo()
    rank = torch.distributed.get_rank()
    out = {}
    for method in METHODS:
        b = _make(method)
        out[method] = [step(b, grads_for(s, seed=9)[:, rank * B // 2:(rank + 1) * B // 2]) for s in range(4)]
    return out


def test_weights_agree_across_ranks_and_with_the_global_computation():
    r0, r1 = run_ranks(_ranks)
    for method in METHODS:
        b = _make(method)
        # one process on the global batch: the gradient of the mean of the 2 ranks' mean losses
        single = [step(b, grads_for(s, seed=9) / 2) for s in range(4)]
        for s in range(4):
            np.testing.assert_array_equal(r0[method][s], r1[method][s], err_msg=method)
            np.testing.assert_allclose(r0[method][s], single[s], rtol=1e-6, atol=1e-9, err_msg=method)
