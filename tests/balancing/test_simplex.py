import numpy as np
import pytest
import torch

from balancing.multibalance import project_simplex_host
from balancing.simplex import project_simplex
from tests.balancing.reference import project_simplex_bisect


@pytest.mark.parametrize("m", [1, 2, 3, 5, 8])
def test_projection_matches_definition(m):
    rng = np.random.default_rng(m)
    for _ in range(50):
        y = rng.normal(scale=2.0, size=m)
        x = project_simplex(torch.tensor(y, dtype=torch.float64)).numpy()
        assert x.min() >= 0 and abs(x.sum() - 1) < 1e-9
        np.testing.assert_allclose(x, project_simplex_bisect(y), atol=1e-9)
        # the definition: no point of the simplex is closer to y
        z = rng.dirichlet(np.ones(m), size=200)
        assert (np.linalg.norm(z - y, axis=1) >= np.linalg.norm(x - y) - 1e-12).all()


def test_point_on_simplex_is_fixed():
    x = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    torch.testing.assert_close(project_simplex(x), x)


def test_inactive_entries_keep_their_value():
    y = torch.tensor([0.9, -3.0, 0.4, 0.1], dtype=torch.float64)
    old = torch.tensor([0.25, 0.4, 0.25, 0.1], dtype=torch.float64)
    active = torch.tensor([True, False, True, True])
    x = project_simplex(y, active, old)
    assert x[1] == 0.4
    assert abs(float(x.sum()) - 1) < 1e-12
    np.testing.assert_allclose(x[active].numpy(), project_simplex_bisect(y[active].numpy(), 0.6), atol=1e-9)


def test_no_active_entry_returns_fallback():
    old = torch.tensor([0.5, 0.5], dtype=torch.float64)
    x = project_simplex(torch.tensor([3.0, 1.0], dtype=torch.float64), torch.tensor([False, False]), old)
    torch.testing.assert_close(x, old)


@pytest.mark.parametrize("m", [1, 2, 3, 5])
def test_host_projection_equals_the_tensor_one(m):
    """The Python-float projection (CPU training) and the sync-free tensor one (accelerators)."""
    rng = np.random.default_rng(10 + m)
    for trial in range(100):
        y = rng.normal(scale=2.0, size=m)
        active = rng.random(m) < 0.7
        old = rng.dirichlet(np.ones(m))
        if trial == 0:  # the inactive entries hold all the mass: the active ones get none
            active[:] = True
            active[0] = False
            old[:] = 0.0
            old[0] = 1.0
        want = project_simplex(torch.tensor(y), torch.tensor(active), torch.tensor(old)).numpy()
        got = project_simplex_host(y.tolist(), active.tolist(), old.tolist())
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def _kkt_gap(gram: np.ndarray, a: np.ndarray) -> float:
    """Optimality of a on the simplex for a^T G a: every (G a)_k >= a^T G a (no vertex descends)."""
    ga = gram @ a
    return float(a @ ga - ga.min())


@pytest.mark.parametrize("m", [2, 3, 5, 8])
def test_min_norm_solver_matches_the_exact_enumeration(m):
    from balancing.weighting import min_norm_simplex
    from tests.balancing.reference import min_norm_simplex_exact
    rng = np.random.default_rng(m)
    for trial in range(40):
        rank = m if trial % 3 else max(1, m // 2)  # also rank-deficient Grams (aligned tasks)
        x = rng.normal(size=(m, rank)) * rng.lognormal(0, 1.5, size=(m, 1))
        if trial % 4 == 0:
            x[1] = x[0] * 0.5  # a duplicated direction
        gram = torch.tensor(x @ x.T)
        got, want = min_norm_simplex(gram).numpy(), min_norm_simplex_exact(gram).numpy()
        g = gram.numpy()
        assert got.min() >= 0 and abs(got.sum() - 1) < 1e-12
        assert got @ g @ got <= want @ g @ want + 1e-9 * np.abs(g).max()


@pytest.mark.parametrize("m", [12, 16, 24])
def test_min_norm_solver_scales_and_is_optimal(m):
    """Beyond what enumeration can do (2^24 supports): the KKT conditions certify the optimum."""
    from balancing.weighting import min_norm_simplex
    rng = np.random.default_rng(m)
    for trial in range(10):
        x = rng.normal(size=(m, 64)) + (2.0 if trial % 2 else 0.0)  # conflicting, then aligned tasks
        gram = torch.tensor(x @ x.T)
        a = min_norm_simplex(gram).numpy()
        assert a.min() >= 0 and abs(a.sum() - 1) < 1e-12
        assert _kkt_gap(gram.numpy(), a) <= 1e-9 * np.abs(gram.numpy()).max()
