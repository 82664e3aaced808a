"""Parameter-gradient MGDA / MoCo: exact weights from the shared module's per-task gradients,
and the embeddings (fused optimizer, applied in backward) are updated once per step."""
import copy

import numpy as np
import torch
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from balancing import BalancerConfig, build_balancer
from balancing.weighting import min_norm_simplex
from data.batch import Batch
from models.mtl import ModelConfig, MultiTaskDCN, build_ebc
from trainer.task_model import MultiTaskTrain, masked_task_losses
from data.schema import TableSpec


def tiny(method):
    torch.manual_seed(0)
    cfg = ModelConfig(embedding_dim=4, dense_arch=[8, 4], cross_layers=1, cross_low_rank=3,
                      shared_arch=[12, 6], head_arch=[5])
    model = MultiTaskDCN(build_ebc([TableSpec("a", 20, 0, "sum", ["a"]), TableSpec("b", 9, 0, "sum", ["b"])], 4, torch.device("cpu")), 3, 3, cfg)
    return MultiTaskTrain(model, build_balancer(BalancerConfig(method=method), 3))


def batch(seed):
    g = torch.Generator().manual_seed(seed)
    n = 16
    lengths = torch.randint(0, 3, (2 * n,), generator=g, dtype=torch.int32)
    values = torch.randint(0, 9, (int(lengths.sum()),), generator=g)
    labels = (torch.rand(n, 3, generator=g) < 0.3).float()
    return Batch(torch.randn(n, 3, generator=g), KeyedJaggedTensor.from_lengths_sync(["a", "b"], values, lengths),
                 labels, torch.ones(n, 3), torch.zeros(4, dtype=torch.int64))


def test_param_mgda_weights_are_the_min_norm_point_of_the_module_gradients():
    module = tiny("param_mgda")
    ref = copy.deepcopy(module).model  # the Jacobian, computed separately: one forward per task
    b = batch(0)
    params = list(ref.cross.parameters())
    jac = []
    for m in range(3):
        logits = ref.task_logits(ref.representation(b.dense_features, b.sparse_features).expand(3, -1, -1))
        lm = masked_task_losses(logits, b.labels, b.label_mask)[m]
        jac.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(lm, params)]))
    jac = torch.stack(jac).double()
    want = min_norm_simplex(jac @ jac.T).numpy()
    loss, _ = module(b)
    np.testing.assert_allclose(module.balancer.weights.numpy(), want, atol=1e-5)
    assert abs(float(module.balancer.weights.sum()) - 1) < 1e-6


def test_embeddings_are_updated_once_per_step():
    for method in ("param_mgda", "param_moco", "multibalance"):
        module = tiny(method)
        apply_optimizer_in_backward(torch.optim.SGD, module.model.ebc.parameters(), {"lr": 0.1})
        calls = []
        for p in module.model.ebc.parameters():
            p.register_post_accumulate_grad_hook(lambda _p: calls.append(1))
        before = [p.detach().clone() for p in module.model.ebc.parameters()]
        for step in range(3):
            loss, _ = module(batch(step))
            loss.backward()
        assert len(calls) == 3 * len(before), method  # once per table per step
        assert any(not torch.equal(a, p) for a, p in zip(before, module.model.ebc.parameters()))
