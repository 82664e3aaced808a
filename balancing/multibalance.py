"""MultiBalance (He et al. 2024, "MultiBalance: Multi-Objective Gradient Balancing in
Industrial-Scale Multi-Task Recommendation System", arXiv 2411.11871, Algorithm 3).

Per step, with g_m the gradient of task m's loss w.r.t. its copy of the shared
representation ([B, n'], global batch):
  1. n_m = ||g_m||
  2. u_m <- (1 - gamma) u_m + gamma n_m       (first step of a task: u_m = n_m)  [line 6]
  3. v_m = g_m / u_m                         (`rescale = "paper"`)              [line 7]
     (Malkiel & Wolf 2020: divided by the running magnitude; `rescale = "magnitude"`, the
     earlier form of this code, sets each gradient to its running magnitude: v_m = (u_m / n_m) g_m)
  4. d = lambda + rho lambda0,  D_m = <v_m, V d>   (= grad of 1/2 ||V d||^2 in lambda), or the
     cosine form D_m = <v_m, V d> / (||v_m|| ||V d||) the paper uses in practice (Sec. 5)
  5. lambda <- Proj_simplex(lambda - beta D)                                   [line 10, eq. 12]
     (`step = "capped"`, beyond the paper: beta capped by a stability bound, `stability_cap`)
  6. the shared layers receive mean(u) sum_m lambda_m v_m                      [line 11]
     (mean(u) keeps the gradient's size that of equal weights: see `combination`)
Steps 1-5 need only the M x M Gram matrix G = [<g_i, g_j>] (Gram(V) = S G S with
S = diag(s), v_m = s_m g_m); with several ranks it is all-reduced, so every rank computes the
same lambda. `tests/balancing/test_algorithm3.py` checks all of it against a literal per-step
implementation of Algorithm 3 on explicit gradient matrices.

A task whose gradient is zero (no labelled row in the batch) keeps its EMA and its weight;
the other weights move on the simplex of the remaining mass. No NaN, no host sync.

`deferred` (default on) uses the previous step's Gram: step t combines its gradients with the
weights and scales computed from step t-1's global Gram, whose reduction then never blocks the
backward; under DDP it travels as the gradient of a carrier parameter (`DeferredGram`), in DDP's
own all-reduce, so it costs no collective of its own. Weights stay identical on every rank;
they follow the exact sequence one step late (the first step of a run uses the current weights
on the raw gradients; the Gram in flight is checkpointed, so a resumed run continues exactly).
Step t's gradients are combined with 1 / u_m, the running magnitude known at the step (not
with the previous batch's norms): a task whose labelled rows go 0 -> few -> many is neither
dropped nor blown up by the previous batch.
Off: the per-step algorithm, with one all-reduce of M^2 numbers inside every backward.

The M-sized step runs on the host (`multibalance_update_host`, in Python floats, or the same
operations compiled from C, `balancing/host_step.c`, which give the same bits) wherever the Gram
is on the host: in CPU training, and with `deferred` on an accelerator, where the previous
step's Gram is copied to pinned host memory in the forward (`DeferredGram.prefetch`) and read in
the backward without stalling the device; the new coefficients go back in one asynchronous
upload. Each torch op there costs microseconds of dispatch or a kernel launch, and the step
would take about 40.
The exact form on an accelerator runs the same step as sync-free tensor ops
(`multibalance_update`): its Gram is this step's, and reading it would stall the device queue.

`scale_by_tasks` (default on) passes M * sum_m lambda_m v_m on, so that lambda = lambda0 =
uniform without EMA reproduces the equal-weights gradient exactly and the shared layers'
effective learning rate matches the equal-weights baseline; off gives the paper's literal sum.
"""
from __future__ import annotations

import logging
import math
from array import array
from dataclasses import dataclass, field
from itertools import compress, repeat
from operator import mul, not_
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from balancing import native
from balancing.base import DeferredGram, GradientBalancer, combine, local_gram, scope
from balancing.simplex import project_simplex

log = logging.getLogger(__name__)
EPS = 1e-12
RESCALES = ("paper", "magnitude")
OSCILLATION_WARN = 0.5  # share of reversed lambda updates that gives a warning...
OSCILLATION_MIN_STEPS = 50  # ...over at least this many updates...
JUMP = 0.05  # ...when lambda_m also moves by more than this per update on average
WARN_EVERY = 1000  # updates between two warnings
STEPS = ("paper", "capped")


@dataclass
class MultiBalanceConfig:
    beta: float = 1.0  # weight learning rate (paper: 1.0 ads, 5.0 feeds)
    rho: float = 0.1  # prior coefficient
    gamma: float = 0.01  # EMA coefficient of the gradient norms
    ema: bool = True  # False: the paper's "remove EMA" ablation (v_m = g_m)
    cosine: bool = True  # cosine direction (paper, Sec. 5) instead of the raw gradient
    prior: List[float] = field(default_factory=list)  # lambda0; empty = uniform
    scale_by_tasks: bool = True
    deferred: bool = True  # weights from the previous step's Gram (see the module docstring)
    # "paper": v_m = g_m / u_m (Algorithm 3, line 7); "magnitude": v_m = (u_m / n_m) g_m, each
    # task's gradient set to its running magnitude (exact form only: it needs this step's n_m)
    rescale: str = "paper"
    # "paper": lambda - beta D (eq. 12); "capped": beta capped by a stability bound of the Gram.
    # The default with gram_ema below: chosen by the pre-registered comparison in
    # docs/results/balancing-evidence (the paper's form, step = "paper" and gram_ema = 0, lost to
    # equal weights beyond its interval on both feeds scenarios; this form did not lose on any)
    step: str = "capped"
    # tracked Gram (beyond the paper): eta > 0 takes lambda's step on an EMA of the global Gram,
    # G~ <- (1 - eta) G~ + eta G_t over the pairs of tasks with a gradient at the step (a stand-in
    # for an industrial global batch: the step sees the tasks' lasting geometry, not one batch's
    # noise); this step's gradients are still the ones combined. 0: the step's own Gram (paper)
    gram_ema: float = 0.05
    # the M-sized host step compiled from C (balancing/host_step.c, built on first use with the
    # system's C compiler; the same bits as the Python step, ~1 % of a CPU step faster); false,
    # or no compiler (a warning says so), the Python step
    compiled_step: bool = True

    def __post_init__(self) -> None:
        if self.rescale not in RESCALES or self.step not in STEPS:
            raise ValueError(f"balancer.multibalance: rescale must be one of {RESCALES} and step one of {STEPS}")
        if not 0.0 <= self.gram_ema <= 1.0:
            raise ValueError(f"balancer.multibalance.gram_ema must be in [0, 1], got {self.gram_ema}")
        if self.rescale == "magnitude" and self.deferred:
            raise ValueError("balancer.multibalance: rescale = 'magnitude' needs this step's gradient norms, which "
                             "the deferred form does not have: set deferred = false, or rescale = 'paper'")


def _scales(n: List[float], u: List[float], cfg: MultiBalanceConfig) -> List[float]:
    """s [M] with v_m = s_m g_m (0 for a task without gradient this step)."""
    if not cfg.ema:
        return [1.0 if ni > 0 else 0.0 for ni in n]
    if cfg.rescale == "paper":
        return [1.0 / ui if ni > 0 else 0.0 for ni, ui in zip(n, u)]
    return [ui / ni if ni > 0 else 0.0 for ni, ui in zip(n, u)]


def stability_cap(gram_v: List[List[float]], active: List[bool], cosine: bool, norm_a: float) -> float:
    """1 / L, with L an upper bound of the largest eigenvalue of the update's Jacobian in lambda:
    Gram(V) for the gradient direction, D^-1/2 Gram(V) D^-1/2 / ||V d|| (D = diag ||v_m||) for the
    cosine one (its dominant part). With beta <= 1 / L the linearised update contracts without
    changing sign (1 - beta mu in [0, 1)): no step overshoots the fixed point, so lambda cannot
    jump between simplex corners. L = min(trace, max row sum): both bound the top eigenvalue of
    a positive semi-definite matrix, in O(M^2) and identically on every rank."""
    idx = [i for i, a in enumerate(active) if a]
    if not idx:
        return float("inf")
    if cosine:
        vn = [math.sqrt(max(gram_v[i][i], 0.0)) for i in range(len(active))]
        denom = max(norm_a, EPS)
        sqrt = math.sqrt
        a = []
        for i in idx:
            row, vi = gram_v[i], vn[i]
            # x / max(sqrt(vn_i vn_j), EPS) / denom, with the max as a conditional (same value, NaN included)
            a.append([row[j] / (EPS if EPS > (r := sqrt(vi * vn[j])) else r) / denom for j in idx])
    else:
        a = [[gram_v[i][j] for j in idx] for i in idx]
    # a [k][l] over the active tasks: (k, k) is task idx[k]'s diagonal entry
    trace = sum(row[k] for k, row in enumerate(a))
    rows = max(sum(map(abs, row)) for row in a)
    bound = min(trace, rows)
    return 1.0 / bound if bound > 0 else float("inf")


def multibalance_update_host(gram: Sequence[Sequence[float]], lam: Sequence[float], u: Sequence[float],
                             prior: Sequence[float], cfg: MultiBalanceConfig, factor: float = 1.0,
                             tracked: Optional[Sequence[Sequence[float]]] = None
                             ) -> Tuple[List[float], List[float], List[float], List[float]]:
    """One step of Algorithm 3 from the Gram matrix factor * gram alone, in Python floats.

    gram [M][M], lam [M] (on the simplex), u [M] (EMA of norms; 0 = not yet seen), prior [M].
    Returns (new lambda, new u, s, n), with v_m = s_m g_m and n_m = ||g_m||. `tracked` [M][M]
    (gram_ema > 0, global units): the Gram lambda's direction and step bound are computed from
    instead of this step's (norms, u and the active tasks stay this step's). Plain loops: this
    runs cold once per step, where every Python object it creates costs."""
    m = len(lam)
    n = [math.sqrt(max(gram[i][i] * factor, 0.0)) for i in range(m)]
    active = [ni > 0 for ni in n]
    if cfg.ema:  # line 6: u_m <- (1 - gamma) u_m + gamma n_m (the first time: n_m)
        u_new = [(ui + cfg.gamma * (ni - ui) if ui > 0 else ni) if ni > 0 else ui for ni, ui in zip(n, u)]
    else:
        u_new = [ni if ni > 0 else ui for ni, ui in zip(n, u)]
    s = _scales(n, u_new, cfg)  # line 7
    d = [li + cfg.rho * pi for li, pi in zip(lam, prior)]
    src, f, vn = (gram, factor, n) if tracked is None else (tracked, 1.0, [math.sqrt(max(tracked[i][i], 0.0))
                                                                         for i in range(m)])
    gram_v = [[x * f * si * sj for x, sj in zip(row, s)] for row, si in zip(src, s)]  # Gram(V) = S G S
    direction = [sum(map(mul, row, d)) for row in gram_v]  # <v_i, V d> (a left-to-right sum, as in the formula)
    norm_a = math.sqrt(max(sum(map(mul, d, direction)), 0.0))  # ||V d||
    if cfg.cosine:
        direction = [x / max(s[i] * vn[i] * norm_a, EPS) for i, x in enumerate(direction)]
    beta = cfg.beta
    if cfg.step == "capped":
        beta = min(beta, stability_cap(gram_v, active, cfg.cosine, norm_a))
    y = [li - beta * x for li, x in zip(lam, direction)]  # line 10, eq. 12
    return project_simplex_host(y, active, lam), u_new, s, n


def multibalance_update(gram: torch.Tensor, lam: torch.Tensor, u: torch.Tensor, prior: torch.Tensor,
                        cfg: MultiBalanceConfig, tracked: Optional[torch.Tensor] = None
                        ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`multibalance_update_host` as sync-free tensor ops (the exact form on an accelerator, where
    the Gram is this step's and reading it would stall the device queue): gram [M, M], lam, u,
    prior [M], tracked [M, M] or None -> (new lambda, new u, s, n), all [M]."""
    n = gram.diagonal().clamp(min=0).sqrt()  # [M]
    active = n > 0
    if cfg.ema:
        u_new = torch.where(active, torch.where(u > 0, torch.lerp(u, n, cfg.gamma), n), u)
        if cfg.rescale == "paper":
            s = active / u_new.clamp(min=EPS)  # 1 / u_m; 0 for a task without gradient
        else:
            s = u_new * active / n.clamp(min=EPS)
    else:
        u_new = torch.where(active, n, u)
        s = active.to(gram.dtype)
    src, vn_g = (gram, n) if tracked is None else (tracked, tracked.diagonal().clamp(min=0).sqrt())
    gram_v = src * torch.outer(s, s)  # [M, M] Gram of V
    d = torch.add(lam, prior, alpha=cfg.rho)  # [M]
    direction = gram_v @ d  # [M]: <v_m, V d>
    if cfg.cosine:
        norm_a = (d @ direction).clamp(min=0).sqrt()  # ||V d||
        direction = direction / (s * vn_g * norm_a).clamp(min=EPS)  # ||v_m|| = s_m n_m
    beta = cfg.beta
    if cfg.step == "capped":  # `stability_cap` as tensor ops
        act = active.to(gram.dtype)
        a = gram_v * torch.outer(act, act)
        if cfg.cosine:
            vn = s * vn_g
            a = a / torch.outer(vn, vn).sqrt().clamp(min=EPS) / norm_a.clamp(min=EPS)
        bound = torch.minimum(a.diagonal().sum(), a.abs().sum(1).max())
        beta = (1.0 / bound.clamp(min=EPS)).clamp(max=cfg.beta)
    lam_new = project_simplex(lam - beta * direction, active, lam)
    return lam_new, u_new, s, n


def project_simplex_host(y: Sequence[float], active: Sequence[bool], fallback: Sequence[float]) -> List[float]:
    """`balancing.simplex.project_simplex` in Python floats: the active entries onto the simplex
    of the mass the inactive ones (kept at `fallback`) leave (Duchi et al. 2008, Fig. 1)."""
    mass = 1.0 - sum(compress(fallback, map(not_, active)))
    theta, css = 0.0, 0.0
    for k, yk in enumerate(sorted(compress(y, active), reverse=True), start=1):
        css += yk
        if k == 1 or yk * k > css - mass:  # a prefix of k; at least the largest entry
            theta = (css - mass) / k
    return [max(v - theta, 0.0) if a else f for v, a, f in zip(y, active, fallback)]


def combination(lam: Sequence[float], u: Sequence[float], s: Sequence[float], cfg: MultiBalanceConfig) -> List[float]:
    """c [M]: the shared layers receive sum_m c_m g_m (times M under scale_by_tasks), eq. line 11.

    rescale "paper": c_m = mean(u) lambda_m / u_m, i.e. mean(u) sum_m lambda_m v_m. v_m = g_m / u_m
    has norm about 1 whatever the loss scale; mean(u) (the running gradient magnitude) keeps the
    overall size near that of equal weights, so SGD learning rates and Adam's epsilon keep their
    meaning. Even at uniform lambda this is magnitude equalisation, not equal weights: task m is
    weighted mean(u) / (M u_m), a rare task's small gradient scaled up; only equal magnitudes
    give sum_m g_m / M. u is known at the step (the EMA up to the Gram just used), so the deferred form
    applies it to this step's gradients as the exact form does: no task is dropped or
    amplified by the previous batch's labels. A task never seen yet (u_m = 0) passes at the
    mean magnitude (c_m = lambda_m).
    rescale "magnitude": c_m = lambda_m s_m with s_m = u_m / n_m (this step's norms)."""
    if cfg.ema and cfg.rescale == "paper":
        known = [x for x in u if x > 0]
        mean_u = sum(known) / len(known) if known else 1.0
        return [li * mean_u / ui if ui > 0 else li for li, ui in zip(lam, u)]
    return [li * si for li, si in zip(lam, s)]


def combination_tensor(lam: torch.Tensor, u: torch.Tensor, s: torch.Tensor, cfg: MultiBalanceConfig) -> torch.Tensor:
    """`combination` as sync-free tensor ops."""
    if cfg.ema and cfg.rescale == "paper":
        known = u > 0
        mean_u = torch.where(known.any(), (u * known).sum() / known.sum().clamp(min=1), torch.ones_like(u[0]))
        return lam * torch.where(known, mean_u / u.clamp(min=EPS), torch.ones_like(u))
    return lam * s


class _HostState:
    """The host step's state between two steps. A plain object: an nn.Module attribute write
    costs microseconds (its __setattr__ checks), and these are written every step."""
    __slots__ = ("lam", "u", "tracked", "last_gram", "updates", "stage", "coef", "ptrs", "native", "mirror")

    def __init__(self):
        self.lam: Optional[List[float]] = None  # lambda [M] as the buffer holds it; None: read the buffer
        self.u: Optional[List[float]] = None  # u [M], the same
        self.tracked: Optional[List[List[float]]] = None  # G~ [M][M], the same
        self.last_gram: Optional[Tuple[torch.Tensor, float]] = None  # the last step's (Gram, factor), for stats
        self.updates = 0  # host updates since the last stats()
        # CPU: one float32 host array [lam | u | n | balanced | coef | G~] whose parts *are* the
        # state buffers (views of it, see `MultiBalance._share_buffers`), so that a step writes
        # them with one Python slice assignment instead of a tensor creation and five copies
        self.stage: Optional[array] = None
        self.coef: Optional[torch.Tensor] = None  # [M], the view of the coefficients in `stage`
        self.ptrs: Tuple[int, ...] = ()  # the buffers' data pointers while they are the views
        self.native: Optional[native.NativeStep] = None  # the compiled step on `stage`, where it was built
        # buffers of their own (an accelerator's): whether `stage` holds their state, as after a
        # host step on float32 buffers; not at first, nor after a load or a tensor step, which write
        # the buffers only. (Buffers that are the stage's views need no flag.)
        self.mirror = False


STAGED = ("weights", "ema_norm", "grad_norm", "grad_norm_balanced")  # the [M] buffers in `stage`, in order
_TYPECODES = {torch.float32: "f", torch.float64: "d"}  # array typecodes of the buffers' usual dtypes


def _rounded(values: List[float], dtype: torch.dtype):
    """values as a buffer of `dtype` holds them: a host array of that precision (rounded by the
    same C cast as torch's), or for another dtype a tensor; both slice and `.tolist()` alike."""
    code = _TYPECODES.get(dtype)
    return array(code, values) if code else torch.tensor(values, dtype=dtype)


def _tensor(values, dtype: torch.dtype) -> torch.Tensor:
    """A `_rounded` result as a CPU tensor (an array's memory shared, not copied)."""
    return torch.frombuffer(values, dtype=dtype) if isinstance(values, array) else values


class MultiBalance(GradientBalancer):
    def __init__(self, num_tasks: int, cfg: MultiBalanceConfig):
        super().__init__(num_tasks)
        self.cfg = cfg
        prior = torch.tensor(cfg.prior, dtype=torch.float32) if cfg.prior else torch.full((num_tasks,), 1.0 / num_tasks)
        if prior.shape != (num_tasks,) or (prior < 0).any() or abs(float(prior.sum()) - 1) > 1e-5:
            raise ValueError(f"balancer.multibalance.prior must be {num_tasks} non-negative numbers summing to 1")
        self.register_buffer("prior", prior, persistent=False)  # lambda0 [M], from the config
        self._prior = list(cfg.prior) or [1.0 / num_tasks] * num_tasks  # the same, for the host step (float64)
        self.register_buffer("ema_norm", torch.zeros(num_tasks))  # u [M]
        self.weights.copy_(prior)
        self.deferred = DeferredGram(num_tasks) if cfg.deferred else None
        # the oscillation statistic (logging only, not checkpointed): host counts (float64 arrays,
        # which the compiled step updates in place: reset, never replaced), and tensor counts for
        # the tensor step
        self._reversals, self._last_delta, self._moved = (array("d", bytes(8 * num_tasks)) for _ in range(3))
        self._window = None  # the last window's (reversal share, mean step), for a repeated read
        # the warning's own window, over log windows (which may be shorter than its minimum)
        self._warn = [0.0, 0.0, 0]  # summed reversal shares x updates, summed steps x updates, updates
        self._warn_quiet = 0  # updates left before another warning may be given
        self.register_buffer("reversals", torch.zeros(num_tasks), persistent=False)
        self.register_buffer("moved", torch.zeros(num_tasks), persistent=False)
        self.register_buffer("last_delta", torch.zeros(num_tasks), persistent=False)
        self.register_buffer("update_count", torch.zeros(()), persistent=False)
        if cfg.gram_ema > 0:  # G~ [M, M], checkpointed (only then: other runs' checkpoints keep their keys)
            self.register_buffer("gram_tracked", torch.zeros(num_tasks, num_tasks))
        self._hs = _HostState()
        self._share_buffers()

    def _share_buffers(self) -> None:
        """Makes the state buffers views of one host array (`_HostState.stage`). Moving the module
        (`.to(device)`, a deepcopy) replaces them with tensors of their own: `_staged` then sees
        that their data pointers changed, and the step writes them with tensor copies instead."""
        m, hs = self.num_tasks, self._hs
        tracked = m * m if self.cfg.gram_ema > 0 else 0
        hs.stage = array("f", bytes(4 * (5 * m + tracked)))
        base = torch.frombuffer(hs.stage, dtype=torch.float32)  # shares the array's memory
        for i, name in enumerate(STAGED):
            view = base[i * m:(i + 1) * m]
            view.copy_(getattr(self, name))
            setattr(self, name, view)  # the same buffer (persistence kept), now a view
        hs.coef = base[4 * m:5 * m]
        if tracked:
            view = base[5 * m:].view(m, m)
            view.copy_(self.gram_tracked)
            self.gram_tracked = view
        hs.ptrs = self._buffer_ptrs()
        lib = native.library() if self.cfg.compiled_step else None
        if lib is not None:
            cfg = self.cfg
            flags = native.flags_of(cfg.ema, cfg.cosine, cfg.rescale == "paper", cfg.step == "capped", tracked > 0)
            scale = m if cfg.scale_by_tasks else 1.0  # as `combine_grads` passes it
            hs.native = native.NativeStep(lib, m, flags, (cfg.beta, cfg.rho, cfg.gamma, cfg.gram_ema, scale),
                                          self._prior, (self._last_delta, self._moved, self._reversals), hs.stage)

    def _buffer_ptrs(self) -> Tuple[int, ...]:
        b = self._buffers  # (nn.Module's own dict of them: an attribute read each would cost more)
        return (b["weights"].data_ptr(), b["ema_norm"].data_ptr(), b["grad_norm"].data_ptr(),
                b["grad_norm_balanced"].data_ptr(), b["gram_tracked"].data_ptr() if "gram_tracked" in b else 0)

    def _staged(self) -> bool:
        """Whether the state buffers are still the views of the host array."""
        return self._hs.ptrs == self._buffer_ptrs()

    def deferred_gram(self) -> Optional[DeferredGram]:
        # from the submodule dict: `self.deferred` goes through nn.Module.__getattr__ (microseconds,
        # twice a step); None when deferred is off (then a plain attribute, not a submodule)
        return self._modules.get("deferred")

    def combine_grads(self, grads: torch.Tensor) -> torch.Tensor:
        scale = self.num_tasks if self.cfg.scale_by_tasks else 1.0
        mailbox = self.deferred_gram()
        if mailbox is not None:
            local = local_gram(grads)
            with scope("exchange"):
                previous = mailbox.exchange(local)  # (sum over ranks, 1 / W^2) of step t-1
            if previous is None:  # the first step: nothing global yet; the current weights, raw gradients
                return combine(self.weights * scale, grads)
            gram, factor = previous
        else:
            gram, factor = self.global_gram(grads), 1.0
        return combine(self._step(gram, factor, scale), grads)  # [B, n']

    def _step(self, gram: torch.Tensor, factor: float, scale: float) -> torch.Tensor:
        """Updates the state from the global Gram factor * gram [M, M]; -> the coefficients
        scale c_m [M] of the gradients passed on (`combination`), on the buffers' device."""
        if gram.is_cpu:  # CPU training, or the deferred Gram prefetched to the host
            return self._step_host(gram, factor, scale)
        return self._step_tensor(gram, factor, scale)

    def _step_host(self, gram: torch.Tensor, factor: float, scale: float) -> torch.Tensor:
        """`_step` where the Gram is on the host: compiled, else in Python floats (the same bits). The
        state is kept as the buffers hold it (float32), so that a run resumed from a checkpoint
        continues with exactly the straight run's state."""
        staged = self._staged()
        coef = self._step_compiled(gram, factor, staged)
        return coef if coef is not None else self._step_python(gram, factor, scale, staged)

    def _step_compiled(self, gram: torch.Tensor, factor: float, staged: bool) -> Optional[torch.Tensor]:
        """`_step_host` as one call of the compiled step (balancing/native.py) where it applies:
        built, a float32 Gram, and the stage holding the state -> the coefficients [M], or None
        (then the Python step runs: also when the C code declines a step, having written nothing,
        where Python would raise or sort NaN)."""
        hs = self._hs
        if hs.native is None or gram.dtype is not torch.float32 or not gram.is_contiguous() or not (
                staged or (hs.mirror and self._mirrors())):
            return None
        with scope("host_step"):
            if hs.native.step(gram.data_ptr(), factor):  # reads and writes the stage
                return None
        hs.last_gram = (gram, factor)
        hs.lam = hs.u = hs.tracked = None  # the stage is the state
        hs.updates += 1
        if staged:
            return hs.coef
        with scope("state_tensors"):
            return self._upload_stage()

    def _step_python(self, gram: torch.Tensor, factor: float, scale: float, staged: bool) -> torch.Tensor:
        """`_step_host` in Python floats."""
        hs, m = self._hs, self.num_tasks
        with scope("host_step"):
            # the state: the last Python step's lists, else the stage where it holds the state,
            # else the buffers (on an accelerator, a sync: at the first step after a load only)
            mirrored = staged or hs.mirror
            lam0 = hs.lam if hs.lam is not None else (hs.stage[:m].tolist() if mirrored else self.weights.tolist())
            u0 = hs.u if hs.u is not None else (hs.stage[m:2 * m].tolist() if mirrored else self.ema_norm.tolist())
            g = gram.tolist()
            hs.last_gram = (gram, factor)
            tracked = self._track_host(g, factor, staged) if self.cfg.gram_ema > 0 else None
            lam, u, s, n = multibalance_update_host(g, lam0, u0, self._prior, self.cfg, factor, tracked)
            self._count_reversals(lam0, lam)
            coef = combination(lam, u, s, self.cfg)
            # [lam | u | n | balanced | coef], rounded to float32 as the buffers hold it (the staged
            # buffers are float32 views: their dtype is not read, an nn.Module attribute costs)
            row = lam + u + n
            row += map(mul, coef, n)
            row += map(mul, coef, repeat(scale))
            row = _rounded(row, torch.float32 if staged else self.weights.dtype)
            hs.lam, hs.u = row[:m].tolist(), row[m:2 * m].tolist()
        with scope("state_tensors"):
            if staged:  # the buffers are views of the stage: written in one slice
                hs.stage[:5 * m] = row
                return hs.coef
            hs.mirror = self._mirrors()
            if hs.mirror:  # buffers of their own, float32: the stage keeps the state (for the compiled step)
                hs.stage[:5 * m] = row
                return self._upload_stage()
            state = _tensor(row, self.weights.dtype).view(5, m)  # [5, M]
            if self.weights.device.type != "cpu":  # one asynchronous upload
                state = state.pin_memory().to(self.weights.device, non_blocking=True)
            for name, values in zip(STAGED, state.unbind(0)):
                getattr(self, name).copy_(values)
            return state[4]

    def _mirrors(self) -> bool:
        """Whether the float32 stage can hold the state of these buffers (of their own): all float32."""
        b = self._buffers
        return b["weights"].dtype is torch.float32 and (self.cfg.gram_ema == 0 or b["gram_tracked"].dtype is torch.float32)

    def _upload_stage(self) -> torch.Tensor:
        """After a host step on float32 buffers of their own (on an accelerator): the stage [5 M (+ M^2)]
        copied to them in one asynchronous upload -> the coefficients [M] on the buffers' device."""
        m, stage = self.num_tasks, torch.frombuffer(self._hs.stage, dtype=torch.float32)
        device = self._buffers["weights"].device
        if device.type != "cpu":
            stage = stage.pin_memory().to(device, non_blocking=True)
        for i, name in enumerate(STAGED):
            self._buffers[name].copy_(stage[i * m:(i + 1) * m])
        if self.cfg.gram_ema > 0:
            self._buffers["gram_tracked"].copy_(stage[5 * m:].view(m, m))
        return stage[4 * m:5 * m]

    def _step_tensor(self, gram: torch.Tensor, factor: float, scale: float) -> torch.Tensor:
        """`_step` where the Gram is on an accelerator (the exact form: reading this step's Gram
        would stall the device queue), as sync-free tensor ops."""
        gram = gram.to(self.weights.dtype) * factor
        self._hs.last_gram = (gram, 1.0)
        tracked = self._track(gram) if self.cfg.gram_ema > 0 else None
        lam_t, u_t, s_t, n_t = multibalance_update(gram, self.weights, self.ema_norm, self.prior, self.cfg, tracked)
        delta = lam_t - self.weights
        self.reversals += (delta * self.last_delta < 0).to(self.reversals.dtype)  # no sync
        self.moved += delta.abs()
        self.last_delta.copy_(torch.where(delta != 0, delta, self.last_delta))
        self.update_count += 1
        c = combination_tensor(lam_t, u_t, s_t, self.cfg)
        self._hs.lam = self._hs.u = None  # the buffers are the state now
        self._hs.mirror = False  # (not the stage)
        self.weights.copy_(lam_t)
        self.ema_norm.copy_(u_t)
        self.grad_norm.copy_(n_t)
        self.grad_norm_balanced.copy_(c * n_t)
        return c * scale

    def _track_host(self, gram: List[List[float]], factor: float, staged: bool) -> List[List[float]]:
        """G~ <- (1 - eta) G~ + eta factor G on the pairs of tasks that have a gradient now (a pair
        seen for the first time takes this step's value) -> G~ as the buffer holds it (float32,
        so that a resumed run continues with exactly the straight run's state)."""
        eta, m, hs = self.cfg.gram_ema, len(gram), self._hs
        # the host copy of the last step's G~: the last Python step's, else the stage's where it
        # holds the state, else read back from the buffer (which may live on an accelerator: a
        # sync) at the first step after a load
        if hs.tracked is not None:
            old = hs.tracked
        elif staged or hs.mirror:
            flat = hs.stage[5 * m:].tolist()
            old = [flat[i * m:(i + 1) * m] for i in range(m)]
        else:
            old = self.gram_tracked.tolist()
        now = [gram[i][i] > 0 for i in range(m)]
        seen = [old[i][i] > 0 for i in range(m)]
        values: List[float] = []
        for o_row, g_row, now_i, seen_i in zip(old, gram, now, seen):
            if not now_i:
                values += o_row
                continue
            values += [(o + eta * (x * factor - o) if seen_i and seen_j else x * factor) if now_j else o
                       for o, x, now_j, seen_j in zip(o_row, g_row, now, seen)]
        kept = _rounded(values, torch.float32 if staged else self.gram_tracked.dtype)  # [M * M]
        flat = kept.tolist()
        hs.tracked = [flat[i * m:(i + 1) * m] for i in range(m)]
        with scope("state_tensors"):
            if staged or self._mirrors():  # into the stage (buffers of their own: uploaded with the state)
                hs.stage[5 * m:] = kept
            else:
                new = _tensor(kept, self.gram_tracked.dtype).view(m, m)
                if self.gram_tracked.device.type != "cpu":  # one asynchronous upload, as for the state
                    new = new.pin_memory().to(self.gram_tracked.device, non_blocking=True)
                self.gram_tracked.copy_(new)
        return hs.tracked

    def _track(self, gram: torch.Tensor) -> torch.Tensor:
        """`_track_host` as sync-free tensor ops; gram [M, M] in global units."""
        old = self.gram_tracked
        now, seen = gram.diagonal() > 0, old.diagonal() > 0
        both_now, both_seen = torch.outer(now, now), torch.outer(seen, seen)
        new = torch.where(both_now, torch.where(both_seen, torch.lerp(old, gram, self.cfg.gram_ema), gram), old)
        self.gram_tracked.copy_(new)
        self._hs.tracked = None  # the buffer is the state now
        self._hs.mirror = False
        return self.gram_tracked

    def _count_reversals(self, old: List[float], new: List[float]) -> None:
        """Per task: did lambda_m's update change direction? (host floats; see `stats`)"""
        last, reversals, moved = self._last_delta, self._reversals, self._moved
        for m, (a, b) in enumerate(zip(old, new)):
            delta = b - a
            if delta * last[m] < 0:
                reversals[m] += 1
            moved[m] += abs(delta)
            if delta != 0:
                last[m] = delta
        self._hs.updates += 1

    def stats(self) -> Dict[str, torch.Tensor]:
        """Adds, per task and since the last call: `lambda_reversal`, the share of updates whose
        direction reversed the previous one, and `lambda_step`, the mean |change| of lambda_m.
        Both high (weights jumping back and forth by large steps: beta above the stability
        limit of these task gradients) gives a warning; a converged lambda jitters (reversals
        near half the updates) by small steps."""
        out = super().stats()
        updates = self._hs.updates + int(self.update_count)  # (a read at log / check steps only)
        if updates == 0 and self._window is not None:
            # a second read at the same step (the guard's, then the log's): the same window
            out["lambda_reversal"], out["lambda_step"], out["grad_cosine"] = self._window
            return out
        steps = max(updates, 1)
        rev = (self.reversals.cpu() + torch.tensor(self._reversals.tolist())) / steps
        moved = (self.moved.cpu() + torch.tensor(self._moved.tolist())) / steps
        out["lambda_reversal"], out["lambda_step"] = rev.to(self.weights.device), moved.to(self.weights.device)
        out["grad_cosine"] = self._mean_cosine()
        self._window = (out["lambda_reversal"], out["lambda_step"], out["grad_cosine"])
        self._maybe_warn(float(rev.mean()), float(moved.mean()), updates)
        for counts in (self._reversals, self._moved):
            counts[:] = array("d", bytes(8 * self.num_tasks))  # in place: the compiled step holds their addresses
        self._hs.updates = 0
        for counts in (self.reversals, self.moved, self.update_count):
            counts.zero_()
        return out

    def _mean_cosine(self) -> torch.Tensor:
        """[M]: per task, the mean cosine of its representation gradient (global batch) to the
        other tasks' with a gradient, at the last step (a sample per log window: no cost in the
        steps between); 0 for a task without gradient, or before any step."""
        out = torch.zeros(self.num_tasks, dtype=self.weights.dtype)
        last = self._hs.last_gram
        if last is not None:
            gram = last[0].detach().to("cpu", torch.float64) * last[1]
            norm = gram.diagonal().clamp(min=0).sqrt()
            live = norm > 0
            if int(live.sum()) >= 2:
                cos = gram / torch.outer(norm, norm).clamp(min=EPS) * torch.outer(live, live)
                out = ((cos.sum(1) - cos.diagonal()) / (int(live.sum()) - 1) * live).to(out.dtype)
        return out.to(self.weights.device)

    def _maybe_warn(self, reversal: float, step: float, updates: int) -> None:
        """Warns when, over at least OSCILLATION_MIN_STEPS updates (summed over log windows), lambda
        reversed on more than OSCILLATION_WARN of them by more than JUMP on average; then stays
        quiet for WARN_EVERY updates."""
        self._warn = [self._warn[0] + reversal * updates, self._warn[1] + step * updates, self._warn[2] + updates]
        self._warn_quiet -= updates
        n = self._warn[2]
        if n < OSCILLATION_MIN_STEPS:
            return
        reversal, step = self._warn[0] / n, self._warn[1] / n
        self._warn = [0.0, 0.0, 0]
        if reversal > OSCILLATION_WARN and step > JUMP and self._warn_quiet <= 0 and _is_first_rank():
            log.warning("MultiBalance: the task weights reversed direction on %.0f%% of the last %d updates, by "
                        "%.3f on average (beta = %g is above the stability limit of these task gradients, or "
                        "one batch's Gram is mostly noise); balancer.multibalance.step = 'capped' with "
                        "gram_ema = 0.05 (the default) measured 0.25-0.43 reversals where the paper's step had "
                        "0.69-0.79 (docs/results/balancing-evidence)", 100 * reversal, n, step, self.cfg.beta)
            self._warn_quiet = WARN_EVERY

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._hs.lam = self._hs.u = self._hs.tracked = None  # the loaded buffers are the state now
        self._hs.mirror = False  # (loaded into the stage's views, or into buffers of their own)


def _is_first_rank() -> bool:
    """The weights are identical on every rank: one warning per job, from rank 0."""
    import torch.distributed as dist
    return not dist.is_initialized() or dist.get_rank() == 0
