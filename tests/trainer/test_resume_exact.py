"""Every balancer's state round-trips exactly: save at step k, resume, and step 2k equals the
straight run bitwise (2 gloo ranks; eval predictions and task weights compared); so does a
run whose checkpoints are written in the background (trainer.async_checkpoint)."""
import copy

import numpy as np

from balancing import REGISTRY
from launch.config import RunConfig, apply_overrides, from_dict
from tests.dist_utils import run_ranks

K = 6
VARIANTS = [(m, ()) for m in REGISTRY] + [("multibalance", ("balancer.multibalance.deferred=false",)),
                                          ("multibalance", ("balancer.multibalance.ema=false",)),
                                          # written in the background while training goes on (steps 3, 6, 9)
                                          ("multibalance", ("trainer.async_checkpoint=true",
                                                            "trainer.checkpoint_every=3"))]


def _all_variants(raw: dict, root: str):
    from trainer.loop import train
    results = {}
    for i, (method, extra) in enumerate(VARIANTS):
        out = {}
        for name, steps in (("straight", 2 * K), ("resumed", K), ("resumed", 2 * K)):
            r = apply_overrides(copy.deepcopy(raw), [f"balancer.method={method}", f"trainer.max_steps={steps}",
                                                     f"trainer.out_dir={root}/{i}/{name}", *extra])
            if method == "fixed":
                r["balancer"]["fixed"] = {"weights": [1.0, 0.5, 2.0]}
            out[name] = train(from_dict(RunConfig, r))
        results[i] = (out["straight"]["final_weights"], out["resumed"]["final_weights"])
    return results


def test_every_balancer_resumes_bitwise(tiny_synth, tmp_path):
    from tests.conftest import tiny_config
    raw = tiny_config.__wrapped__(tiny_synth, tmp_path)
    raw["data"]["num_workers"] = 0
    raw["trainer"].update(save_predictions=True, log_every=0, progress_bar=False, checkpoint_at_end=True)
    results = run_ranks(_all_variants, (raw, str(tmp_path)))[0]
    failed = []
    for i, (method, extra) in enumerate(VARIANTS):
        straight_w, resumed_w = results[i]
        same = straight_w == resumed_w
        for r in range(2):
            a = np.load(tmp_path / str(i) / "straight" / f"eval_predictions.rank{r}.npy")
            b = np.load(tmp_path / str(i) / "resumed" / f"eval_predictions.rank{r}.npy")
            same = same and np.array_equal(a, b)
        if not same:
            failed.append(f"{method}{list(extra)}")
    assert not failed, f"resumed != straight (bitwise) for {failed}"
