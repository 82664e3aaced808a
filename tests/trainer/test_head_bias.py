"""Head output biases at a fresh start (model.head_bias_init): logit of each binary task's
sampled training positive rate, a regression task's mean label; the same on every rank; a
resumed run keeps its checkpoint's biases."""
import copy
import math

import pyarrow as pa
import pytest
import torch

from data.reader import base_rates
from data.schema import DataConfig, Task
from launch.config import RunConfig, apply_overrides, from_dict
from tests.dist_utils import run_ranks
from trainer.build import head_bias


def test_base_rates_are_the_weighted_label_means_of_labelled_rows():
    sample = pa.table({"a": pa.array([1, 0, 0, None, 1], pa.int8()), "b": [0.0, float("nan"), 1.0, 1.0, 0.0],
                       "w": [1.0, 1.0, 3.0, 1.0, None], "r": [2.0, 4.0, None, 6.0, 8.0], "z": [None] * 5})
    cfg = DataConfig(tasks=[Task("a"), Task("b", weight="w"), Task("r", kind="regression"), Task("z"), Task("u")],
                     unlabelled=["u"])
    rates = base_rates(sample, cfg)
    # a: 2 of 4 labelled; b: NaN unlabelled, null weight 0 -> (3 + 1) / (1 + 3 + 1); r: mean of 4
    assert rates[:3] == pytest.approx([0.5, 0.8, 5.0]) and rates[3:] == [None, None]


def test_head_bias_is_the_logit_of_the_rate_or_the_mean():
    tasks = [Task("a"), Task("b"), Task("r", kind="regression"), Task("n")]
    bias = head_bias("base_rate", [0.02, 0.0, 3.5, None], tasks)
    assert bias.tolist() == pytest.approx([math.log(0.02 / 0.98), math.log(1e-5 / (1 - 1e-5)), 3.5, 0.0], rel=1e-6)
    assert head_bias("zero", [0.02, 0.0, 3.5, None], tasks).tolist() == [0.0] * 4
    assert head_bias("uniform", [0.02, 0.0, 3.5, None], tasks) is None


def _biases(raw, out_dir):
    """This rank's head biases right after start (fresh, then resumed), and the base rates."""
    import torch.distributed as dist
    from trainer.build import init_distributed
    from trainer.loop import _prepare, train
    cfg = from_dict(RunConfig, apply_overrides(copy.deepcopy(raw), [f"trainer.out_dir={out_dir}"]))
    env = init_distributed(cfg.trainer.pg_timeout_s, cfg.trainer.device)
    run = _prepare(cfg, env)
    fresh = run.dmp.module.model.heads.layers[-1].bias.detach().flatten().tolist()
    rates = run.train_src.base_rates
    dist.barrier()
    summary = train(cfg)  # 3 steps, a checkpoint at the end
    more = from_dict(RunConfig, apply_overrides(copy.deepcopy(raw), [f"trainer.out_dir={out_dir}",
                                                                     "trainer.max_steps=4"]))
    resumed = _prepare(more, env).dmp.module.model.heads.layers[-1].bias.detach().flatten().tolist()
    return fresh, rates, resumed, summary


def test_ranks_agree_on_the_base_rate_biases_and_a_resume_keeps_the_checkpoints(tiny_config, tmp_path):
    raw = copy.deepcopy(tiny_config)
    raw["trainer"].update(max_steps=3, log_every=0)
    (f0, rates0, r0, s0), (f1, rates1, r1, _) = run_ranks(_biases, (raw, str(tmp_path / "run")))
    assert rates0 == rates1 and all(r is not None and 0 < r < 1 for r in rates0)
    assert f0 == f1 and r0 == r1  # (lists of floats: the ranks' biases bitwise equal)
    f0, r0 = torch.tensor(f0), torch.tensor(r0)
    want = torch.logit(torch.tensor(rates0, dtype=torch.float64)).float()
    assert torch.allclose(f0, want, atol=1e-6), (f0, want)
    assert not torch.allclose(r0, f0, atol=1e-6)  # the checkpoint's (trained) biases, not a new init
    assert s0["head_bias"] == {"init": "base_rate", "base_rates": rates0}
    assert min(rates0) < 0.2  # (one of the tiny data's rates is far from 0.5: the init matters)
