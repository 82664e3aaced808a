"""Every representation-gradient method against an independent reference: torchjd's
aggregators (a separate implementation, test-only dependency), an exact solver, or the
published closed form. Stateful methods are checked over several steps."""

import numpy as np
import pytest
import torch
from torchjd.aggregation import IMTLG as JDIMTLG
from torchjd.aggregation import GradDrop as JDGradDrop
from torchjd.aggregation import GradVac as JDGradVac
from torchjd.aggregation import PCGrad as JDPCGrad

from balancing import BalancerConfig, build_balancer
from balancing.weighting import min_norm_simplex
from tests.balancing.reference import project_simplex_bisect

M, B, N = 3, 8, 6


def make(method, **cfg):
    bc = BalancerConfig(method=method)
    for k, v in cfg.items():
        setattr(getattr(bc, method), k, v)
    return build_balancer(bc, M).double()


def backward_through(balancer, grads, loss_values=None):
    """Task losses whose gradient w.r.t. copy m is grads[m] and whose value is loss_values[m]."""
    h = torch.zeros(B, N, dtype=torch.float64, requires_grad=True)
    copies = balancer(h)
    vals = torch.zeros(M, dtype=torch.float64) if loss_values is None else torch.as_tensor(loss_values)
    losses = torch.stack([(c * g).sum() + v for c, g, v in zip(copies, grads, vals)])
    balancer.combine_losses(losses).backward()
    return h.grad


def grads_for(step, m=M, seed=0):
    rng = np.random.default_rng([seed, step])
    g = rng.normal(size=(m, B, N)) * np.array([3.0, 1.0, 0.2, 0.7][:m])[:, None, None]
    g[1] -= 0.5 * g[0]  # conflicting tasks
    return torch.tensor(g)


def test_pcgrad_matches_torchjd_over_steps():
    pc = make("pcgrad", seed=5)
    ref = JDPCGrad()
    for step in range(6):
        g = grads_for(step)
        got = backward_through(pc, g)
        torch.manual_seed(5 * 1_000_003 + step)  # the same permutations as the method's generator
        want = ref(g.reshape(M, -1)).reshape(B, N)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_gradvac_matches_torchjd_over_steps():
    gv = make("gradvac", beta=0.3, seed=2)
    ref = JDGradVac(beta=0.3, eps=1e-8)
    moved = False
    for step in range(6):
        g = grads_for(step)
        got = backward_through(gv, g)
        torch.manual_seed(2 * 1_000_003 + step)
        want = ref(g.reshape(M, -1)).reshape(B, N)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
        moved |= not torch.allclose(got, g.sum(0))
    assert moved


def test_imtlg_matches_torchjd():
    im = make("imtlg")
    for step in range(3):
        g = grads_for(step)
        got = backward_through(im, g)
        want = JDIMTLG()(g.reshape(M, -1)).reshape(B, N) * M  # weights sum to 1, scaled by M
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)
        # the defining property: equal projections onto every task's unit gradient
        proj = [float((got * gm).sum() / gm.norm()) for gm in g]
        assert max(proj) - min(proj) < 1e-8 * max(abs(p) for p in proj)


def test_graddrop_matches_torchjd():
    gd = make("graddrop", seed=4)
    for step in range(3):
        g = grads_for(step)
        got = backward_through(gd, g)
        torch.manual_seed((4 * 1_000_003 + step) * 4099 + 0)  # rank 0
        want = JDGradDrop()(g.reshape(M, -1)).reshape(B, N)
        torch.testing.assert_close(got, want)


def exact_min_norm_grid(gram, steps=400):
    """Brute force over a grid of the 2-simplex (M = 3)."""
    best, best_w = np.inf, None
    for i in range(steps + 1):
        for j in range(steps + 1 - i):
            w = np.array([i, j, steps - i - j]) / steps
            v = w @ gram @ w
            if v < best:
                best, best_w = v, w
    return best_w, best


def test_mgda_is_the_exact_min_norm_point():
    mg = make("mgda")
    for step in range(3):
        g = grads_for(step)
        got = backward_through(mg, g)
        gram = (g.reshape(M, -1) @ g.reshape(M, -1).T).numpy()
        w_grid, v_grid = exact_min_norm_grid(gram)
        w = mg.weights.numpy()
        assert abs(w.sum() - 1) < 1e-9 and (w >= 0).all()
        assert w @ gram @ w <= v_grid + 1e-12  # at least as good as the best grid point
        np.testing.assert_allclose(w, w_grid, atol=5e-3)
        torch.testing.assert_close(got, M * torch.einsum("m,m...->...", mg.weights, g))


def test_min_norm_solver_against_kkt_on_random_problems():
    rng = np.random.default_rng(0)
    for m in (2, 3, 4, 5):
        for _ in range(20):
            j = rng.normal(size=(m, 7))
            gram = torch.tensor(j @ j.T)
            w = min_norm_simplex(gram).numpy()
            # KKT: (G w)_i = min_k (G w)_k on the support, >= elsewhere
            gw = gram.numpy() @ w
            lo = gw[w > 1e-9].min()
            assert np.all(gw >= lo - 1e-8) and np.all(np.abs(gw[w > 1e-9] - lo) < 1e-8)


def test_dbmtl_closed_form():
    for target in ("median", "max"):
        db = make("dbmtl", target=target)
        for step in range(3):
            g = grads_for(step)
            losses = np.array([0.7, 0.2, 0.05]) * (1 + step)
            got = backward_through(db, g, losses)
            gl = g.numpy() / (losses[:, None, None] + 1e-8)  # gradient of log(L_m + eps)
            n = np.linalg.norm(gl.reshape(M, -1), axis=1)
            t = np.median(n) if target == "median" else n.max()
            want = sum(t / n[m] * gl[m] for m in range(M))
            np.testing.assert_allclose(got.numpy(), want, rtol=1e-7)


def test_uncertainty_closed_form():
    uw = make("uncertainty")
    s = torch.tensor([0.3, -0.5, 1.2], dtype=torch.float64)
    with torch.no_grad():
        uw.log_var.copy_(s)
    g = grads_for(0)
    losses = np.array([0.6, 0.1, 0.3])
    got = backward_through(uw, g, losses)
    w = 0.5 * np.exp(-s.numpy())
    np.testing.assert_allclose(got.numpy(), np.einsum("m,mbn->bn", w, g.numpy()), rtol=1e-10)
    np.testing.assert_allclose(uw.log_var.grad.numpy(), -losses * w + 0.5, rtol=1e-10)
    np.testing.assert_allclose(uw.stats()["weight"].numpy(), w)


def test_moco_against_a_literal_reference():
    beta, gamma, rho = 0.5, 0.8, 0.1
    mc = make("moco", beta=beta, gamma=gamma, rho=rho)
    lam, q = np.full(M, 1 / M), None
    for step in range(6):
        g = grads_for(step)
        got = backward_through(mc, g)
        flat = g.reshape(M, -1).numpy()
        unit = flat / np.linalg.norm(flat, axis=1, keepdims=True)
        gram_u = unit @ unit.T
        q = gram_u if q is None else q - beta * (q - gram_u)
        lam = project_simplex_bisect(lam - gamma * (q + rho * np.eye(M)) @ lam)
        np.testing.assert_allclose(mc.weights.numpy(), lam, atol=1e-9)
        np.testing.assert_allclose(got.numpy(), M * np.einsum("m,mbn->bn", lam, g.numpy()), rtol=1e-6, atol=1e-9)
    assert np.abs(lam - 1 / M).max() > 0.01


@pytest.mark.parametrize("method", ["pcgrad", "gradvac", "graddrop", "dbmtl", "imtlg", "mgda", "moco", "multibalance"])
def test_task_without_labels_gives_no_nan(method):
    b = make(method)
    for step in range(3):
        g = grads_for(step)
        g[2] = 0
        got = backward_through(b, g, [0.5, 0.5, 0.0] if method == "dbmtl" else None)
        assert torch.isfinite(got).all(), method
        assert torch.isfinite(b.stats()["weight"]).all(), method
    got = backward_through(b, torch.zeros(M, B, N, dtype=torch.float64), [1.0, 1.0, 1.0] if method == "dbmtl" else None)
    assert torch.isfinite(got).all() and (got == 0).all(), method
