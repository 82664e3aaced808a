"""The balancers' step, as the trainer runs it (DMP + train pipeline, 2 gloo ranks), stays
bitwise what it was when `golden_steps.json` was written: the task weights after every step and
a digest of every tensor of the trained state (dense layers, table shards, optimizer-free
buffers, the Gram in flight). Cuts to MultiBalance's cost must not change one bit of a result.

The golden was written, before any of those cuts, with
    MBREC_WRITE_GOLDEN=1 python -m pytest tests/trainer/test_bitwise_steps.py
on torch 2.13.0 / torchrec 1.8.0 (CPU), and written again when the tables came to be drawn once
instead of twice (trainer.build.NoTableDraws: other initial tables, the same steps; with the
former draws the code of that change still matched the former golden bit for bit). Another stack rounds some kernels differently: there the
weights are compared with a tolerance and the digests are not (the test says so in its name)."""
from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path

import torch

from tests.dist_utils import run_ranks

GOLDEN = Path(__file__).with_name("golden_steps.json")
STEPS = 12
TWELVE = "data.tasks=[" + ", ".join(f"{{name='t{i}'}}" for i in range(12)) + "]"
# name -> overrides of the tiny config: MultiBalance's default (deferred, capped step, tracked
# Gram), its exact form, the paper's form, the default at 12 tasks, and equal weights
VARIANTS = {
    "multibalance": [],
    "multibalance_exact": ["balancer.multibalance.deferred=false"],
    "multibalance_paper": ["balancer.multibalance.step=paper", "balancer.multibalance.gram_ema=0.0"],
    "multibalance_m12": [TWELVE],
    "equal": ["balancer.method=equal"],
}


def _digest(t: torch.Tensor) -> str:
    t = t.detach().cpu().contiguous().reshape(-1)
    return hashlib.sha256(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"").hexdigest()[:16]


def _local(value):
    """A state_dict value as this rank's plain tensors (sharded tables: their local shards)."""
    if hasattr(value, "local_shards"):
        return [s.tensor for s in value.local_shards()]
    if hasattr(value, "to_local"):
        return [value.to_local()]
    return [value] if isinstance(value, torch.Tensor) else []


def _train(raws: dict, steps: int) -> dict:
    import itertools

    from launch.config import RunConfig, from_dict
    from trainer.tools.bench import random_batches
    from trainer.build import build_train_module, build_training, init_distributed
    env = init_distributed()
    out = {}
    for name, raw in raws.items():
        cfg = from_dict(RunConfig, raw)
        torch.manual_seed(0)
        module = build_train_module(cfg.data, cfg.model, cfg.balancer, env.device)
        dmp, _, pipeline = build_training(module, cfg, env)
        batches = itertools.islice(itertools.cycle(random_batches(cfg, 4, seed=env.rank)), steps)
        weights = []
        for _ in range(steps):
            pipeline.progress(batches)
            weights.append(module.balancer.weights.tolist())
        state = {k: [_digest(t) for t in _local(v)] for k, v in dmp.state_dict().items()}
        hs = getattr(module.balancer, "_hs", None)  # MultiBalance's host state: did the compiled step run?
        out[name] = {"weights": weights, "state": state,
                     "compiled": hs is not None and hs.native is not None and hs.lam is None}
    return out


def _configs(tiny_config: dict) -> dict:
    from launch.config import apply_overrides
    return {name: apply_overrides(copy.deepcopy(tiny_config), sets) for name, sets in VARIANTS.items()}


def _versions() -> dict:
    import torchrec
    return {"torch": torch.__version__, "torchrec": torchrec.__version__}


def test_training_steps_are_bitwise_what_they_were(tiny_config):
    ranks = run_ranks(_train, (_configs(tiny_config), STEPS))
    if os.environ.get("MBREC_WRITE_GOLDEN") == "1":  # (re)writes the golden, then checks against it
        GOLDEN.write_text(json.dumps({"versions": _versions(), "steps": STEPS, "ranks": ranks}, indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())
    same_stack = golden["versions"] == _versions()
    for rank, (got, want) in enumerate(zip(ranks, golden["ranks"])):
        for name in VARIANTS:
            if same_stack:
                assert got[name]["weights"] == want[name]["weights"], (rank, name)
                assert got[name]["state"] == want[name]["state"], (rank, name)
            else:  # another stack: the weights' trajectory within rounding, no digests
                assert torch.allclose(torch.tensor(got[name]["weights"]), torch.tensor(want[name]["weights"]),
                                      rtol=1e-4, atol=1e-6), (rank, name)
    assert ranks[0]["multibalance"]["weights"] == ranks[1]["multibalance"]["weights"]
    from balancing import native
    if native.compiler():  # the host step these steps took was the compiled one (balancing/native.py)
        assert all(r[n]["compiled"] for r in ranks for n in VARIANTS if n != "equal"), \
            [{n: r[n]["compiled"] for n in VARIANTS} for r in ranks]
    # the golden is not trivial: MultiBalance's weights moved; the paper's form differs from the default
    w = golden["ranks"][0]
    assert max(abs(x - 1 / 3) for x in w["multibalance"]["weights"][-1]) > 1e-4
    assert w["multibalance"]["weights"] != w["multibalance_paper"]["weights"]
    assert len(w["multibalance_m12"]["weights"][-1]) == 12
