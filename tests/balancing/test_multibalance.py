import itertools

import numpy as np
import pytest
import torch

from balancing import BalancerConfig, build_balancer
from balancing.base import local_gram
from balancing.multibalance import (MultiBalance, MultiBalanceConfig, combination, multibalance_update,
                                    multibalance_update_host)
from tests.balancing.reference import ReferenceMultiBalance
from tests.dist_utils import init_gloo, run_ranks

M, B, N = 3, 16, 8


def paper_form(**kw) -> MultiBalanceConfig:
    """MultiBalance as the paper writes it (eq. 12 on this step's Gram): what these checks
    against the literal reference are about; the default adds the capped step and the tracked
    Gram, checked below."""
    return MultiBalanceConfig(**{"step": "paper", "gram_ema": 0.0, **kw})


def backward_through(balancer, grads):
    """Runs the fan-out with task losses whose gradient w.r.t. copy m is grads[m] exactly;
    returns the gradient that reaches h. grads [M, B, N]."""
    h = torch.zeros(B, N, dtype=grads.dtype, requires_grad=True)
    copies = balancer(h)
    loss = balancer.combine_losses(torch.stack([(c * g).sum() for c, g in zip(copies, grads)]))
    loss.backward()
    return h.grad


def as_float64(mb):
    """The balancer in float64, from the exact uniform prior (its float32 buffers hold 1/3
    rounded), as the float64 reference starts."""
    mb = mb.double()
    mb.weights.fill_(1.0 / mb.num_tasks)
    return mb


def random_grads(rng, step, zero_task=None):
    # tasks of very different magnitudes, partly conflicting (like CTR vs CVR)
    scales = np.array([5.0, 0.5, 0.05]) * (1 + 0.3 * np.sin(step))
    g = rng.normal(size=(M, B, N)) * scales[:, None, None]
    g[1] -= 0.3 * g[0]
    if zero_task is not None:
        g[zero_task] = 0
    return g


@pytest.mark.parametrize("ema,cosine,rescale,step", [
    *itertools.product([True, False], [True, False], ["paper"], ["paper"]),
    (True, True, "magnitude", "paper"), (True, False, "magnitude", "paper"),
    (True, True, "paper", "capped"), (True, False, "paper", "capped")])
def test_matches_reference_over_steps(ema, cosine, rescale, step):
    cfg = paper_form(beta=1.0, rho=0.1, gamma=0.3, ema=ema, cosine=cosine, deferred=False, rescale=rescale,
                             step=step)
    mb = as_float64(MultiBalance(M, cfg))
    ref = ReferenceMultiBalance(M, cfg.beta, cfg.rho, cfg.gamma, ema, cosine, rescale=rescale, step=step)
    rng = np.random.default_rng(0)
    for step in range(8):
        g = random_grads(rng, step, zero_task=2 if step == 4 else None)
        got = backward_through(mb, torch.tensor(g))
        want = ref.step(g.reshape(M, -1)).reshape(B, N)
        np.testing.assert_allclose(mb.weights.numpy(), ref.lam, rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-7, atol=1e-9)
    # the weights moved away from uniform: the test is not vacuous
    assert np.abs(ref.lam - 1 / M).max() > 0.05


@pytest.mark.parametrize("ema,cosine,rescale,step", [
    *itertools.product([True, False], [True, False], ["paper"], ["paper"]),
    (True, True, "magnitude", "paper"), (True, True, "paper", "capped"), (True, False, "paper", "capped")])
def test_host_and_tensor_updates_agree_over_steps(ema, cosine, rescale, step):
    """CPU training runs the step in Python floats, accelerators as tensor ops: same numbers."""
    cfg = paper_form(beta=2.0, rho=0.1, gamma=0.3, ema=ema, cosine=cosine, rescale=rescale, step=step,
                             deferred=rescale == "paper")
    lam = torch.full((M,), 1 / M, dtype=torch.float64)
    prior, u = lam.clone(), torch.zeros(M, dtype=torch.float64)
    host = (lam.tolist(), u.tolist())
    rng = np.random.default_rng(5)
    for step in range(10):
        g = random_grads(rng, step, zero_task=step % 3 if step in (3, 7) else None)
        gram = local_gram(torch.tensor(g))
        lam, u, s, n = multibalance_update(gram, lam, u, prior, cfg)
        # as the deferred path passes it: a sum over 2 ranks and the factor 1 / W^2
        got = multibalance_update_host((gram * 4).tolist(), *host, prior.tolist(), cfg, factor=0.25)
        for want, have in zip((lam, u, s, n), got):
            np.testing.assert_allclose(have, want.numpy(), rtol=1e-12, atol=1e-14)
        host = got[:2]
    assert np.abs(lam.numpy() - 1 / M).max() > 0.05  # the weights moved: not vacuous


def test_gradient_form_with_large_beta_matches_reference():
    cfg = paper_form(beta=50.0, rho=0.1, gamma=0.5, ema=True, cosine=False, scale_by_tasks=False,
                             deferred=False)
    mb = MultiBalance(M, cfg).double()
    ref = ReferenceMultiBalance(M, 50.0, 0.1, 0.5, True, False, scale_by_tasks=False)
    rng = np.random.default_rng(1)
    for step in range(5):
        g = random_grads(rng, step)
        got = backward_through(mb, torch.tensor(g))
        np.testing.assert_allclose(got.numpy(), ref.step(g.reshape(M, -1)).reshape(B, N), rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(mb.weights.numpy(), ref.lam, rtol=1e-7, atol=1e-9)


def test_zero_gradient_task_gives_no_nan_and_keeps_its_weight():
    mb = MultiBalance(M, paper_form(beta=2.0, deferred=False)).double()
    rng = np.random.default_rng(2)
    backward_through(mb, torch.tensor(random_grads(rng, 0)))
    before = mb.weights.clone()
    ema_before = mb.ema_norm.clone()
    got = backward_through(mb, torch.tensor(random_grads(rng, 1, zero_task=1)))
    assert torch.isfinite(got).all() and torch.isfinite(mb.weights).all()
    assert mb.weights[1] == before[1] and mb.ema_norm[1] == ema_before[1]
    assert abs(float(mb.weights.sum()) - 1) < 1e-12
    # all tasks without labels: nothing moves, the gradient is zero
    before = mb.weights.clone()
    got = backward_through(mb, torch.zeros(M, B, N, dtype=torch.float64))
    torch.testing.assert_close(mb.weights, before)
    assert (got == 0).all()


def test_equal_and_fixed_weights():
    g = torch.randn(M, B, N, dtype=torch.float64)
    eq = build_balancer(BalancerConfig(method="equal"), M).double()
    torch.testing.assert_close(backward_through(eq, g), g.sum(0))
    cfg = BalancerConfig(method="fixed")
    cfg.fixed.weights = [1.0, 2.0, 0.5]
    fx = build_balancer(cfg, M).double()
    torch.testing.assert_close(backward_through(fx, g), g[0] + 2 * g[1] + 0.5 * g[2])


def test_uniform_weights_without_ema_equal_the_sum():
    """With beta = 0 the weights stay at the uniform prior; M * sum(lambda v) = sum(g)."""
    mb = MultiBalance(M, paper_form(beta=0.0, ema=False)).double()
    g = torch.randn(M, B, N, dtype=torch.float64)
    torch.testing.assert_close(backward_through(mb, g), g.sum(0))


def _two_rank_step(seed: int):
    """Each rank backpropagates its half of a global batch; returns (weights, local grad)."""
    init_gloo()
    rank = torch.distributed.get_rank()
    rng = np.random.default_rng(seed)
    global_g = [random_grads(rng, s).reshape(M, 2, B // 2, N) for s in range(5)]
    mb = MultiBalance(M, paper_form(beta=1.0, gamma=0.3, deferred=False)).double()
    out = []
    for g in global_g:
        # the global loss is the mean of the two local losses
        local = torch.tensor(g[:, rank])  # = 2 x its slice of the global gradient g / 2
        h = torch.zeros(B // 2, N, dtype=torch.float64, requires_grad=True)
        copies = mb(h)
        sum(((c * gm).sum() for c, gm in zip(copies, local))).backward()
        out.append((mb.weights.numpy().copy(), h.grad.numpy().copy()))
    return out


def test_two_ranks_agree_with_the_global_reference():
    results = run_ranks(_two_rank_step, (3,))
    rng = np.random.default_rng(3)
    ref = ReferenceMultiBalance(M, 1.0, 0.1, 0.3, True, True)
    for s in range(4):
        g = random_grads(rng, s)  # [M, B, N]: the global gradient is g / 2 (mean over 2 ranks)
        want = ref.step(g.reshape(M, -1) / 2).reshape(B, N)
        w0, grad0 = results[0][s]
        w1, grad1 = results[1][s]
        np.testing.assert_array_equal(w0, w1)
        np.testing.assert_allclose(w0, ref.lam, rtol=1e-7, atol=1e-9)
        # each rank's combined local gradient, /2 (DDP's mean), is its half of the global one
        np.testing.assert_allclose(np.concatenate([grad0, grad1]) / 2, want, rtol=1e-7, atol=1e-9)


def _deferred(seed: int):
    init_gloo()
    rank = torch.distributed.get_rank()
    rng = np.random.default_rng(seed)
    global_g = [random_grads(rng, s).reshape(M, 2, B // 2, N) for s in range(5)]
    mb = MultiBalance(M, paper_form(beta=1.0, gamma=0.3, deferred=True)).double()
    out = []
    for g in global_g:
        h = torch.zeros(B // 2, N, dtype=torch.float64, requires_grad=True)
        copies = mb(h)
        sum(((c * gm).sum() for c, gm in zip(copies, torch.tensor(g[:, rank])))).backward()
        out.append(mb.weights.numpy().copy())
    return out


def test_deferred_on_two_ranks_follows_the_exact_weights_one_step_late():
    r0, r1 = run_ranks(_deferred, (4,))
    exact = [w for w, _ in run_ranks(_two_rank_step, (4,))[0]]
    np.testing.assert_array_equal(np.array(r0), np.array(r1))
    np.testing.assert_allclose(r0[0], np.full(M, 1 / M))  # first step: no global Gram yet
    for t in range(1, 5):
        np.testing.assert_allclose(r0[t], exact[t - 1], rtol=1e-7, atol=1e-9)


def test_deferred_follows_the_exact_sequence_one_step_late():
    """Step t combines g_t with the weights and scales step t-1 computed exactly: the same
    state sequence, one step late, also across a task without labels and an all-zero step."""
    exact = as_float64(MultiBalance(M, paper_form(beta=1.0, gamma=0.3, deferred=False)))
    late = as_float64(MultiBalance(M, paper_form(beta=1.0, gamma=0.3, deferred=True)))
    rng = np.random.default_rng(6)
    grads = [torch.tensor(random_grads(rng, s, zero_task=1 if s == 3 else None)) for s in range(7)]
    grads[5] = torch.zeros_like(grads[5])
    coef_prev = torch.full((M,), 1.0, dtype=torch.float64)  # first step: current weights x M, raw
    for t, g in enumerate(grads):
        got = backward_through(late, g)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, torch.einsum("m,mbn->bn", coef_prev, g))
        torch.testing.assert_close(late.weights, exact.weights)  # exact has seen g_0 .. g_{t-1}
        torch.testing.assert_close(late.ema_norm, exact.ema_norm)
        backward_through(exact, g)
        # the coefficients exact used at t are what late uses at t + 1: mean(u) lambda_m / u_m,
        # for a task without gradient at t too (it is not dropped at t + 1)
        n = exact.grad_norm
        coef_prev = torch.tensor(combination(exact.weights.tolist(), exact.ema_norm.tolist(), [], exact.cfg),
                                 dtype=torch.float64) * M
        used = torch.where(n > 0, exact.grad_norm_balanced / n.clamp(min=1e-300), 0.0) * M
        torch.testing.assert_close(used[n > 0], coef_prev[n > 0].to(used.dtype))
    assert (late.weights - 1 / M).abs().max() > 0.05


def test_chunked_gram_equals_the_plain_product():
    """The accelerator form of the Gram (C partial Grams in one batched product) is the same
    matrix; local_gram picks C = gcd(N, 256) off the CPU."""
    from balancing.base import chunked_gram
    flat = torch.randn(3, 512 * 24, dtype=torch.float64)
    want = flat @ flat.T
    for chunks in (1, 2, 8, 256, 512 * 24):
        torch.testing.assert_close(chunked_gram(flat, chunks), want, rtol=1e-12, atol=1e-9)


def test_a_loaded_state_replaces_the_host_copy_of_the_weights():
    """The host step keeps lambda and u as Python floats between steps; a load_state_dict must
    make the loaded buffers the state again."""
    cfg = paper_form(beta=2.0, gamma=0.3, deferred=False)
    a, b = MultiBalance(M, cfg).double(), MultiBalance(M, cfg).double()
    rng = np.random.default_rng(3)
    for step in range(3):
        backward_through(a, torch.tensor(random_grads(rng, step)))
    saved = {k: v.clone() for k, v in a.state_dict().items()}
    for step in range(2):  # b moves elsewhere first, so it holds host floats of its own
        backward_through(b, torch.tensor(random_grads(rng, 10 + step)))
    b.load_state_dict(saved)
    for step in range(3, 6):
        g = torch.tensor(random_grads(rng, step))
        np.testing.assert_array_equal(backward_through(a, g).numpy(), backward_through(b, g).numpy())
        np.testing.assert_array_equal(a.weights.numpy(), b.weights.numpy())


def test_magnitude_rescale_needs_the_exact_form():
    with pytest.raises(ValueError, match="deferred = false, or rescale = 'paper'"):
        MultiBalanceConfig(rescale="magnitude", deferred=True)
    with pytest.raises(ValueError, match="rescale must be one of"):
        MultiBalanceConfig(rescale="u_over_n")


def test_deferred_task_whose_labels_go_from_none_to_few_to_many():
    """Task 2 has no labelled row at steps 0-2, a few at step 3 (a gradient 100x smaller), many
    after. The deferred form never drops it once it has a gradient, and combines each step's
    gradients with the coefficients the exact form used one step before (nothing taken from
    the previous batch's norms)."""
    cfg = dict(beta=1.0, gamma=0.01)
    exact = as_float64(MultiBalance(M, paper_form(**cfg, deferred=False)))
    late = as_float64(MultiBalance(M, paper_form(**cfg, deferred=True)))
    rng = np.random.default_rng(3)
    prev = None
    for t in range(8):
        g = random_grads(rng, t)
        g[2] = 0 if t < 3 else g[2] * (0.01 if t == 3 else 1.0)
        g = torch.tensor(g)
        got = backward_through(late, g)
        coef = np.linalg.lstsq(g.reshape(M, -1).T.numpy(), got.reshape(-1).numpy(), rcond=None)[0]
        if t == 3:  # the first step with labels: included (never seen: at the mean magnitude)
            assert coef[2] > 0.5
        if prev is not None:
            has = g.reshape(M, -1).abs().sum(1).numpy() > 0  # (a zero gradient's coefficient is undefined)
            np.testing.assert_allclose(coef[has], prev[has], rtol=1e-6, atol=1e-9)
        backward_through(exact, g)
        prev = np.array(combination(exact.weights.tolist(), exact.ema_norm.tolist(), [], exact.cfg)) * M
    assert late.ema_norm[2] > 0


def _oscillating_run(step: str, beta: float, steps: int = 60):
    """Three near-orthogonal task gradients (cosines ~0, the demo's regime) of fixed size."""
    mb = MultiBalance(M, paper_form(beta=beta, step=step, deferred=False)).double()
    rng = np.random.default_rng(0)
    base = rng.normal(size=(M, B, N))
    lams = []
    for t in range(steps):
        backward_through(mb, torch.tensor(base + 0.05 * rng.normal(size=(M, B, N))))
        lams.append(mb.weights.numpy().copy())
    return mb, np.array(lams)


def test_capped_step_stops_the_oscillation_of_large_beta(caplog):
    import logging
    paper, lam_paper = _oscillating_run("paper", 5.0)
    capped, lam_capped = _oscillating_run("capped", 5.0)
    with caplog.at_level(logging.WARNING):
        st = paper.stats()
    assert st["lambda_reversal"].mean() > 0.8 and st["lambda_step"].mean() > 0.3
    assert "reversed direction" in caplog.text
    # the trainer reads the statistics twice at a step (non-finite check, then the log): the
    # second read reports the same window, not an empty one
    again = paper.stats()
    assert torch.equal(again["lambda_reversal"], st["lambda_reversal"]) and torch.equal(again["lambda_step"], st["lambda_step"])
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        st = capped.stats()
    assert st["lambda_step"].mean() < 0.05 and "reversed direction" not in caplog.text
    # the paper's step jumps between corners; the capped one settles (late steps barely move)
    assert np.abs(np.diff(lam_paper[-10:], axis=0)).max() > 0.3
    assert np.abs(np.diff(lam_capped[-10:], axis=0)).max() < 0.02
    # a window ends at each read that has new updates: one more update, a window of one
    backward_through(capped, torch.tensor(np.random.default_rng(1).normal(size=(M, B, N))))
    one = capped.stats()
    assert not torch.equal(one["lambda_step"], st["lambda_step"]) and float(one["lambda_reversal"].max()) in (0.0, 1.0)


def test_oscillation_warning_spans_log_windows_shorter_than_its_minimum(caplog):
    """The trainer reads the statistics every log_every (20) updates, fewer than the warning's
    minimum (50): the warning still comes, once, and not again for WARN_EVERY updates."""
    import logging
    from balancing.multibalance import OSCILLATION_MIN_STEPS, WARN_EVERY
    mb = MultiBalance(M, paper_form(beta=5.0, deferred=False)).double()
    rng = np.random.default_rng(0)
    base = rng.normal(size=(M, B, N))
    with caplog.at_level(logging.WARNING):
        for t in range(1, 201):
            backward_through(mb, torch.tensor(base + 0.05 * rng.normal(size=(M, B, N))))
            if t % 20 == 0:
                mb.stats()
                if t < OSCILLATION_MIN_STEPS:
                    assert "reversed direction" not in caplog.text
    assert caplog.text.count("reversed direction") == 1 and 200 < WARN_EVERY


@pytest.mark.parametrize("cosine,step", [(True, "capped"), (True, "paper"), (False, "capped")])
def test_tracked_gram_matches_a_literal_reference(cosine, step):
    """gram_ema > 0: lambda steps on an EMA of the global Gram; this step's gradients combined."""
    cfg = MultiBalanceConfig(beta=1.0, rho=0.1, gamma=0.3, cosine=cosine, deferred=False, step=step, gram_ema=0.2)
    mb = as_float64(MultiBalance(M, cfg))
    ref = ReferenceMultiBalance(M, cfg.beta, cfg.rho, cfg.gamma, True, cosine, step=step, gram_ema=0.2)
    plain = ReferenceMultiBalance(M, cfg.beta, cfg.rho, cfg.gamma, True, cosine, step=step)
    rng = np.random.default_rng(0)
    for t in range(10):
        g = random_grads(rng, t, zero_task=2 if t == 4 else None)
        got = backward_through(mb, torch.tensor(g))
        want = ref.step(g.reshape(M, -1)).reshape(B, N)
        plain.step(g.reshape(M, -1))
        np.testing.assert_allclose(mb.weights.numpy(), ref.lam, rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-7, atol=1e-9)
    assert np.abs(ref.lam - 1 / M).max() > 0.02 and np.abs(ref.lam - plain.lam).max() > 1e-3  # not vacuous


def test_tracked_gram_host_and_tensor_forms_agree():
    cfg = MultiBalanceConfig(beta=2.0, rho=0.1, gamma=0.3, step="capped", gram_ema=0.1, deferred=False)
    host, tensor = as_float64(MultiBalance(M, cfg)), as_float64(MultiBalance(M, cfg))
    lam, u, prior = tensor.weights.clone(), tensor.ema_norm.clone(), torch.full((M,), 1 / M, dtype=torch.float64)
    rng = np.random.default_rng(5)
    for t in range(10):
        gram = local_gram(torch.tensor(random_grads(rng, t, zero_task=t % 3 if t in (3, 7) else None)))
        host._step(gram * 4, 0.25, 1.0)  # the host path (a CPU Gram), as the deferred form passes it
        tracked = tensor._track(gram)
        lam, u, _, _ = multibalance_update(gram, lam, u, prior, cfg, tracked)
        np.testing.assert_allclose(host.gram_tracked.numpy(), tensor.gram_tracked.numpy(), rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(host.weights.numpy(), lam.numpy(), rtol=1e-12, atol=1e-14)


def test_tracked_gram_resumes_exactly():
    """The tracked Gram is checkpointed with the balancer: 6 steps, saved, loaded into a new
    balancer, 6 more steps = 12 straight steps, bitwise (float32, deferred, as training runs)."""
    cfg = MultiBalanceConfig(step="capped", gram_ema=0.05)
    rng = np.random.default_rng(2)
    grads = [torch.tensor(random_grads(rng, t), dtype=torch.float32) for t in range(12)]
    straight = MultiBalance(M, cfg)
    for g in grads:
        backward_through(straight, g)
    first = MultiBalance(M, cfg)
    for g in grads[:6]:
        backward_through(first, g)
    state = first.state_dict()
    assert "gram_tracked" in state and state["gram_tracked"].abs().sum() > 0
    second = MultiBalance(M, cfg)
    second.load_state_dict(state)
    for g in grads[6:]:
        backward_through(second, g)
    assert torch.equal(second.weights, straight.weights) and torch.equal(second.gram_tracked, straight.gram_tracked)
    assert "gram_tracked" not in MultiBalance(M, paper_form()).state_dict()  # other runs keep their keys


def test_grad_cosine_is_the_last_steps_mean_cosine():
    mb = MultiBalance(M, paper_form(deferred=False))
    g = np.zeros((M, B, N))
    g[0, 0, 0], g[1, 0, 0], g[1, 0, 1], g[2, 0, 1] = 1.0, 1.0, 1.0, -1.0  # cos(0,1) = .707, cos(1,2) = -.707, cos(0,2) = 0
    backward_through(mb, torch.tensor(g, dtype=torch.float32))
    c = 2 ** -0.5
    np.testing.assert_allclose(mb.stats()["grad_cosine"].numpy(), [c / 2, 0.0, -c / 2], atol=1e-6)


STATE = ("weights", "ema_norm", "grad_norm", "grad_norm_balanced", "gram_tracked")


def test_state_buffers_written_through_one_host_array_match_tensor_copies_bitwise():
    """On a CPU the state buffers are views of one host array that the step writes in one slice
    assignment; a copy (deepcopy, as a move to another device does) has buffers of its own,
    which the step detects and fills with tensor copies: both give bitwise the same state, and a
    loaded state lands in the array (the buffers stay its views)."""
    import copy
    cfg = MultiBalanceConfig()  # the default: deferred, capped, tracked Gram
    staged = MultiBalance(M, cfg)
    copied = copy.deepcopy(staged)
    assert staged._staged() and not copied._staged()
    ptr = staged.weights.data_ptr()
    rng = np.random.default_rng(3)
    for t in range(8):
        g = torch.tensor(random_grads(rng, t, zero_task=1 if t == 5 else None), dtype=torch.float32)
        assert torch.equal(backward_through(staged, g), backward_through(copied, g)), t
    for name in STATE:
        assert torch.equal(getattr(staged, name), getattr(copied, name)), name
    assert staged.weights.data_ptr() == ptr and staged._staged()  # written in place, never replaced
    assert max(abs(w - 1 / M) for w in staged.weights.tolist()) > 1e-4  # the state moved
    fresh = MultiBalance(M, cfg)
    fresh.load_state_dict(copied.state_dict())
    assert fresh._staged() and all(torch.equal(getattr(fresh, n), getattr(copied, n)) for n in STATE)
    g = torch.tensor(random_grads(rng, 9), dtype=torch.float32)
    assert torch.equal(backward_through(fresh, g), backward_through(copied, g))


def test_balancer_scopes_time_only_when_asked():
    from balancing import base
    base.SCOPE_TIMES.clear()
    mb = MultiBalance(M, paper_form(deferred=False))
    g = torch.tensor(random_grads(np.random.default_rng(0), 0), dtype=torch.float32)
    backward_through(mb, g)
    assert base.SCOPE_TIMES == {}  # off by default: no timer, no profiler range
    base.profile_scopes("timer")
    try:
        backward_through(mb, g)
    finally:
        base.profile_scopes(None)
    times = base.SCOPE_TIMES
    assert {"fan_out", "fan_out_backward", "local_gram", "host_step", "combine"} <= set(times)
    assert times["fan_out_backward"][0] >= times["host_step"][0] > 0 and times["host_step"][1] == 1
    with pytest.raises(ValueError, match="scope mode"):
        base.profile_scopes("on")
