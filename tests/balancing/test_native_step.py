"""The compiled host step (balancing/host_step.c) against the Python one, bit for bit, and how it
falls back."""
import copy
import itertools
import logging
import math
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

from balancing import multibalance, native
from balancing.multibalance import MultiBalance, MultiBalanceConfig

BUFFERS = ("weights", "ema_norm", "grad_norm", "grad_norm_balanced")
CONFIGS = [dict(ema=e, cosine=c, rescale=r, step=s, gram_ema=g, scale_by_tasks=k, deferred=r == "paper")
           for e, c, r, s, g, k in itertools.product((True, False), (True, False), ("paper", "magnitude"),
                                                   ("capped", "paper"), (0.05, 0.0), (True, False))]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.int32 if t.element_size() == 4 else torch.int64)


def pair(m: int, **cfg):
    """(the module on the compiled step, the same module on the Python step)."""
    fast = MultiBalance(m, MultiBalanceConfig(**cfg))
    slow = MultiBalance(m, MultiBalanceConfig(**cfg))
    assert fast._hs.native is not None, "the compiled step was not built (see the warning above)"
    slow._hs.native = None
    return fast, slow


def random_gram(rng, m: int, t: int) -> torch.Tensor:
    """[M, M] float32 Gram of random task gradients of very different sizes; some tasks without
    gradient at some steps, now and then one of denormal size."""
    scale = 10.0 ** rng.uniform(-6, 3, size=(m, 1))
    if t % 7 == 3:
        scale[rng.integers(m)] = 1e-22  # its squared norm is below float32's normal range
    g = rng.normal(size=(m, 32)) * scale
    g[rng.random(m) < 0.2] = 0.0
    return torch.tensor(g @ g.T, dtype=torch.float32)


def assert_same(fast, slow, c_fast, c_slow, where):
    assert torch.equal(bits(c_fast), bits(c_slow)), where
    for name in BUFFERS + (("gram_tracked",) if fast.cfg.gram_ema > 0 else ()):
        assert torch.equal(bits(getattr(fast, name)), bits(getattr(slow, name))), (where, name)
    for name in ("_reversals", "_moved", "_last_delta"):
        assert getattr(fast, name).tobytes() == getattr(slow, name).tobytes(), (where, name)
    assert fast._hs.updates == slow._hs.updates, where


@pytest.mark.skipif(not native.compiler(), reason="no C compiler on this machine")
@pytest.mark.parametrize("m", [1, 2, 3, 5, 12])
def test_compiled_step_gives_the_python_steps_bits(m):
    """Every combination of the step's settings, 25 steps each with the state carried: the
    coefficients, every state buffer and the reversal counters are bitwise the Python step's,
    and the compiled step did run (it leaves no Python state behind)."""
    rng = np.random.default_rng(m)
    for cfg in CONFIGS:
        fast, slow = pair(m, beta=float(rng.choice([0.3, 1.0, 5.0])), **cfg)
        scale = m if cfg["scale_by_tasks"] else 1.0
        for t in range(25):
            gram, factor = random_gram(rng, m, t), float(rng.choice([1.0, 0.5, 0.25]))
            c_fast, c_slow = fast._step_host(gram, factor, scale), slow._step_host(gram.clone(), factor, scale)
            assert fast._hs.lam is None and slow._hs.lam is not None, "the compiled step fell back"
            assert_same(fast, slow, c_fast, c_slow, (cfg, t))
        assert fast.stats()["lambda_step"].tolist() == slow.stats()["lambda_step"].tolist()


@pytest.mark.skipif(not native.compiler(), reason="no C compiler on this machine")
def test_a_step_the_compiled_code_cannot_mirror_falls_back_to_python_with_the_same_state():
    """A NaN that reaches the simplex projection (whose sort order of NaN only Python's sort
    defines) makes the compiled step write nothing and the Python step run on the same state;
    NaN on a diagonal only deactivates its task, which the compiled step mirrors itself. Once
    lambda is NaN every step falls back (a run in that state fails its NaN guard anyway)."""
    rng = np.random.default_rng(0)
    fast, slow = pair(3)
    for t in range(8):
        gram = random_gram(rng, 3, t)
        if t == 2:
            gram[1, 1] = float("nan")
        if t == 5:  # every task active, NaN between them
            gram = torch.full((3, 3), float("nan")).fill_diagonal_(1.0)
        c_fast, c_slow = fast._step_host(gram, 0.5, 3), slow._step_host(gram.clone(), 0.5, 3)
        assert (fast._hs.lam is not None) == (t >= 5)  # Python state only after a fallback
        assert_same(fast, slow, c_fast, c_slow, t)
    assert any(math.isnan(x) for x in fast.weights.tolist())  # NaN went where Python puts it


def test_without_a_compiler_the_python_step_runs_and_says_why(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("MBREC_CACHE_DIR", str(tmp_path))
    native.library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="balancing.native"):
            mb = MultiBalance(3, MultiBalanceConfig())
        assert mb._hs.native is None
        assert "runs in Python" in caplog.text and "no-such-cc" in caplog.text
        gram = random_gram(np.random.default_rng(1), 3, 0)
        assert torch.isfinite(mb._step_host(gram, 1.0, 3)).all()
        monkeypatch.setenv("MBREC_NATIVE_STEP", "0")  # asked off: no build, the Python step
        native.library.cache_clear()
        assert native.library() is None
    finally:
        monkeypatch.undo()
        native.library.cache_clear()


@pytest.mark.skipif(not native.compiler(), reason="no C compiler on this machine")
def test_an_unusable_cache_folder_builds_in_a_private_temp_folder(monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("MBREC_CACHE_DIR", str(blocker / "cache"))  # under a file: cannot be made
    native.library.cache_clear()
    try:
        lib = native.library()
        assert lib is not None and f"mbrec-{os.getuid()}" in lib._name
    finally:
        monkeypatch.undo()
        native.library.cache_clear()


def test_a_failing_compiler_names_itself_and_leaves_no_library(tmp_path):
    false = shutil.which("false")
    if false is None:
        pytest.skip("no `false` command")
    with pytest.raises(RuntimeError, match="C compiler .*false.* failed"):
        native.build([false], tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not native.compiler(), reason="no C compiler on this machine")
def test_a_copied_module_takes_the_python_step_and_agrees():
    """A deep copy (as a move to another device makes) does not share the original's stage: it
    gets no compiled step, and both give the same bits."""
    fast = MultiBalance(3, MultiBalanceConfig())
    copied = copy.deepcopy(fast)
    assert copied._hs.native is None and not copied._staged()
    rng = np.random.default_rng(2)
    for t in range(5):
        gram = random_gram(rng, 3, t)
        assert_same(fast, copied, fast._step_host(gram, 1.0, 3), copied._step_host(gram.clone(), 1.0, 3), t)


@pytest.mark.skipif(not native.compiler(), reason="no C compiler on this machine")
def test_compiled_step_on_buffers_of_their_own_as_on_an_accelerator():
    """Buffers replaced by tensors of their own (what `.to(device)` does): the first step, and the
    first after a load, runs in Python (it reads the buffers and fills the stage); the steps
    between are compiled, then uploaded to the buffers. Bitwise the Python step throughout."""
    fast, slow = pair(3)
    for mb in (fast, slow):
        mb._apply(lambda t: t.clone())
    assert not fast._staged() and fast._hs.native is not None
    rng = np.random.default_rng(4)
    for t in range(10):
        if t == 5:
            for mb in (fast, slow):
                mb.load_state_dict(copy.deepcopy(slow.state_dict()))
        gram = random_gram(rng, 3, t)
        c_fast, c_slow = fast._step_host(gram, 0.5, 3), slow._step_host(gram.clone(), 0.5, 3)
        assert (fast._hs.lam is not None) == (t in (0, 5)), t  # Python, then compiled
        assert_same(fast, slow, c_fast, c_slow, t)


SUM_312 = """
def sum_312(xs):
    # Python 3.12's built-in sum() of floats: 0 + x0, then Neumaier's compensated sum
    it = iter(xs)
    for first in it:
        break
    else:
        return 0
    f, c = 0 + first, 0.0
    for x in it:
        t = f + x
        c += (f - t) + x if abs(f) >= abs(x) else (x - t) + f
        f = t
    if c and math.isfinite(c):
        f += c
    return f
"""
exec(SUM_312)  # defines sum_312 here; the same text runs under Python 3.12+ below


def test_the_mirror_of_python_3_12s_sum_is_its_sum():
    """`sum_312` gives real Python 3.12 / 3.13's sum() to the bit, on sums with cancellation,
    infinities, NaN and signed zeros (skipped where no such Python is found)."""
    from pathlib import Path
    pythons = [p for p in (shutil.which("python3.12"), shutil.which("python3.13")) if p]
    pythons += sorted(str(p) for p in (Path.home() / ".pyenv" / "versions").glob("3.1[2-9]*/bin/python3"))
    script = "import math, random\n" + SUM_312 + """
random.seed(0)
specials = [0.0, -0.0, 1e308, -1e308, float('inf'), float('-inf'), float('nan'), 5e-324]
bad = 0
for n in range(20000):
    k = random.randint(0, 14)
    xs = [random.choice(specials) if random.random() < 0.05 else
          random.uniform(-1, 1) * 10.0 ** random.randint(-20, 20) for _ in range(k)]
    a, b = sum(xs), sum_312(xs)
    bad += not (a == b and math.copysign(1, a) == math.copysign(1, b) or a != a and b != b)
print(bad)
"""
    ran = 0
    for py in pythons:
        done = subprocess.run([py, "-c", script], capture_output=True, text=True, timeout=120)
        if done.returncode == 127:
            continue  # a shim (pyenv's) without that version selected
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "0", (py, done.stdout)
        ran += 1
    if not ran:
        pytest.skip("no Python 3.12 or newer found")


@pytest.mark.skipif(not native.compiler(), reason="no C compiler on this machine")
@pytest.mark.parametrize("m", [3, 12])
def test_compiled_step_sums_as_python_3_12_does_where_that_is_the_python(m, monkeypatch):
    """From Python 3.12 sum() is compensated: the compiled step's COMPENSATED_SUM mode against the
    Python step with 3.12's sum (`sum_312`) in place of the built-in, bit for bit."""
    monkeypatch.setattr(native, "COMPENSATED_SUM", True)
    monkeypatch.setattr(multibalance, "sum", sum_312, raising=False)  # the step's global `sum`
    rng = np.random.default_rng(10 + m)
    for cfg in CONFIGS[::3]:
        fast, slow = pair(m, **cfg)
        scale = m if cfg["scale_by_tasks"] else 1.0
        for t in range(25):
            gram, factor = random_gram(rng, m, t), 0.5
            c_fast, c_slow = fast._step_host(gram, factor, scale), slow._step_host(gram.clone(), factor, scale)
            assert fast._hs.lam is None, "the compiled step fell back"
            assert_same(fast, slow, c_fast, c_slow, (cfg, t))
    assert native.flags_of(True, True, True, True, True) & native.FLAG_BITS["compensated_sum"]
