"""The GPU smoke suite (`make gpu-smoke`): what only a GPU can show. Each check is written as a
function of the device, so the same code runs on CPU in every suite run (test_*_cpu); the
CUDA tests are skipped where no GPU is visible, and run on one GPU (rank 0, no launcher)."""
import copy

import numpy as np
import pytest
import torch

from balancing.multibalance import MultiBalance, MultiBalanceConfig
from launch.config import RunConfig, apply_overrides, from_dict
from tests.dist_utils import run_ranks

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")


def deferred_weights(device: str, steps: int = 6, mb: MultiBalance = None) -> np.ndarray:
    """MultiBalance (deferred; `mb`, else the default on `device`) over `steps` backward passes of
    random task gradients, the Gram carried on its carrier's .grad (world size 1: DDP's mean is the
    local Gram) -> weights [steps, M]. On CUDA this runs the pinned prefetch and the host step."""
    torch.manual_seed(0)
    mb = MultiBalance(3, MultiBalanceConfig()).to(device) if mb is None else mb
    mb.deferred.carried = True
    out = []
    for _ in range(steps):
        h = torch.randn(64, 16, device=device, requires_grad=True)
        hs = mb(h)  # [M, B, n']
        (hs * torch.randn_like(hs) * torch.tensor([1.0, 3.0, 0.2], device=device)[:, None, None]).sum().backward()
        out.append(mb.weights.cpu().numpy().copy())
    return np.stack(out)


def train_once(raw: dict, device: str, *overrides: str) -> dict:
    from trainer.loop import train
    r = apply_overrides(copy.deepcopy(raw), [f"trainer.device={device}", *overrides])
    return train(from_dict(RunConfig, r))


def _train_variants(raw: dict, device: str, root: str) -> dict:
    """fp32, bf16, tf32 runs, and a run resumed half way, on `device` (one rank)."""
    out = {p: train_once(raw, device, f"trainer.precision={p}", f"trainer.out_dir={root}/{device}-{p}")
           for p in ("fp32", "bf16", "tf32")}
    train_once(raw, device, "trainer.max_steps=6", f"trainer.out_dir={root}/{device}-resumed")
    out["resumed"] = train_once(raw, device, f"trainer.out_dir={root}/{device}-resumed")
    return out


def _config(tiny_config: dict) -> dict:
    raw = copy.deepcopy(tiny_config)
    raw["trainer"].update(max_steps=12, log_every=4)
    return raw


def _check_variants(out: dict) -> None:
    for p in ("fp32", "bf16", "tf32"):  # 12 steps: finite metrics, not yet a trained model
        assert all(np.isfinite(out[p]["eval"][t]["ne"]) for t in ("ctr", "cvr", "conv")), (p, out[p]["eval"])
    assert out["bf16"]["final_weights"] != out["fp32"]["final_weights"]  # bf16 did run in bf16
    assert out["resumed"]["final_weights"] == out["fp32"]["final_weights"]  # bitwise on the device


def compiled_and_python_weights(device: str, steps: int = 6):
    """`deferred_weights` on `device` with the compiled host step and with the Python one
    -> (weights [steps, M] of each, whether the compiled step ran). On a CPU the buffers are first
    given memory of their own, the state an accelerator's buffers have."""
    out = []
    for compiled in (True, False):
        mb = MultiBalance(3, MultiBalanceConfig(compiled_step=compiled)).to(device)
        if device == "cpu":
            mb._apply(lambda t: t.clone())
        w = deferred_weights(device, steps, mb)
        out.append((w, mb._hs.native is not None and mb._hs.lam is None))
    (fast, ran), (slow, _) = out
    return fast, slow, ran


def test_compiled_host_step_on_device_buffers_cpu():
    from balancing import native
    fast, slow, ran = compiled_and_python_weights("cpu")
    assert np.array_equal(fast, slow) and ran == bool(native.compiler())


@cuda
def test_compiled_host_step_on_cuda():
    """The compiled step on the prefetched Gram, its state uploaded to the device: bitwise the
    Python step's weights."""
    from balancing import native
    fast, slow, ran = compiled_and_python_weights("cuda")
    assert np.array_equal(fast, slow) and ran == bool(native.compiler())


def test_deferred_host_step_cpu():
    w = deferred_weights("cpu")
    assert np.allclose(w.sum(1), 1, atol=1e-5) and np.abs(w[-1] - 1 / 3).max() > 1e-3


def test_training_variants_cpu(tiny_config, tmp_path):
    (out,) = run_ranks(_train_variants, (_config(tiny_config), "cpu", str(tmp_path)), world=1)
    _check_variants(out)


@cuda
def test_stack_runs_fbgemm_on_cuda():
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
    ebc = EmbeddingBagCollection([EmbeddingBagConfig("t", 4, 100, ["f"])], device=torch.device("cuda"))
    kjt = KeyedJaggedTensor.from_lengths_sync(["f"], torch.tensor([1, 2, 3], device="cuda"),
                                              torch.tensor([1, 2], device="cuda", dtype=torch.int32))
    assert ebc(kjt)["f"].shape == (2, 4)


@cuda
def test_deferred_prefetch_matches_cpu():
    np.testing.assert_allclose(deferred_weights("cuda"), deferred_weights("cpu"), atol=1e-5)


@cuda
def test_training_on_one_gpu(tiny_config, tmp_path):
    raw = _config(tiny_config)
    (gpu,) = run_ranks(_train_variants, (raw, "cuda", str(tmp_path)), world=1)
    _check_variants(gpu)
    (cpu,) = run_ranks(train_once, (raw, "cpu", f"trainer.out_dir={tmp_path}/cpu"), world=1)
    for t in ("ctr", "cvr", "conv"):  # same data, same init: close, not bitwise (other kernels)
        assert gpu["fp32"]["eval"][t]["ne"] == pytest.approx(cpu["eval"][t]["ne"], rel=0.02)
