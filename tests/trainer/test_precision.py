"""bf16 autocast opens a fresh region per forward: weights updated by the optimizer are used
by the next forward (one region around the loop would keep serving cached bf16 copies of the
initial weights)."""
import torch

from balancing import BalancerConfig
from data.schema import DataConfig, SparseFeature, Task
from models.mtl import ModelConfig, build_ebc
from tests.balancing.test_param_methods import batch
from trainer.build import build_train_module
from trainer.precision import precision_context
from data.schema import TableSpec


def test_bf16_forward_uses_the_updated_weights():
    data = DataConfig(sparse=[SparseFeature("a", 20), SparseFeature("b", 9)], dense=["x", "y", "z"],
                      tasks=[Task("t0"), Task("t1"), Task("t2")])
    cfg = ModelConfig(embedding_dim=4, dense_arch=[8, 4], cross_layers=1, cross_low_rank=3,
                      shared_arch=[12, 6], head_arch=[5])
    torch.manual_seed(0)
    module = build_train_module(data, cfg, BalancerConfig(method="equal"), torch.device("cpu"), precision="bf16")
    module.model.ebc = build_ebc([TableSpec("a", 20, 0, "sum", ["a"]), TableSpec("b", 9, 0, "sum", ["b"])], 4, torch.device("cpu"))
    dense_params = [p for n, p in module.named_parameters() if not n.startswith("model.ebc")]
    opt = torch.optim.SGD(dense_params, lr=1.0)
    b = batch(0)
    with precision_context("bf16", torch.device("cpu")):  # what the training loop holds
        loss, (_, before, _, _) = module(b)
        loss.backward()
        opt.step()
        _, (_, after, _, _) = module(b)
    _, (_, fresh, _, _) = module(b)  # a forward on its own, after the loop
    assert not torch.equal(before, after)
    torch.testing.assert_close(after, fresh)  # no stale bf16 weight copies inside the loop
    assert before.dtype == torch.float32  # predictions leave the model in fp32


def test_tf32_setting_uses_the_api_of_the_running_torch():
    """Once anything has used torch's fp32_precision API, reading the legacy allow_tf32 flag
    raises: the context must use the new API where it exists, and restore what it found."""
    from trainer.precision import tf32_switches
    holder, name, on, off = tf32_switches()[0]
    before = getattr(holder, name)
    setattr(holder, name, on)  # as another library might
    try:
        with precision_context("fp32", torch.device("cpu")):
            assert getattr(holder, name) == off
        with precision_context("tf32", torch.device("cpu")):
            assert getattr(holder, name) == on
        assert getattr(holder, name) == on  # restored
    finally:
        setattr(holder, name, before)
