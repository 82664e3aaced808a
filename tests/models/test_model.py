import torch

from balancing import BalancerConfig, build_balancer
from data.batch import Batch
from models.mtl import ModelConfig, MultiTaskDCN, TaskHeads, build_ebc
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from trainer.task_model import MultiTaskTrain, masked_task_losses
from data.schema import TableSpec


def test_forward_shapes_and_single_backward():
    torch.manual_seed(0)
    cfg = ModelConfig(embedding_dim=4, dense_arch=[8, 4], cross_layers=2, cross_low_rank=3,
                      shared_arch=[16, 6], head_arch=[5])
    ebc = build_ebc([TableSpec("a", 10, 0, "sum", ["a"]), TableSpec("b", 7, 0, "sum", ["b"])], 4, torch.device("cpu"))
    model = MultiTaskDCN(ebc, num_dense=3, num_tasks=3, cfg=cfg)
    balancer_cfg = BalancerConfig(method="multibalance")
    balancer_cfg.multibalance.deferred = False  # this step's gradient norms, not the previous one's
    module = MultiTaskTrain(model, build_balancer(balancer_cfg, 3))
    kjt = KeyedJaggedTensor.from_lengths_sync(["a", "b"], torch.tensor([1, 2, 3, 0, 6, 5]),
                                              torch.tensor([1, 1, 0, 2, 1, 1], dtype=torch.int32))
    labels = torch.tensor([[1.0, 0, 0], [0, 0, 0], [1, 1, 1]])
    mask = torch.tensor([[1.0, 1, 1], [1, 0, 1], [1, 1, 1]])
    batch = Batch(torch.randn(3, 3), kjt, labels, mask, torch.zeros(4, dtype=torch.int64))
    h = model.representation(batch.dense_features, batch.sparse_features)
    assert h.shape == (3, 6)
    loss, (losses, probs, _, _) = module(batch)
    assert losses.shape == (3,) and probs.shape == (3, 3)
    loss.backward()
    assert all(p.grad is not None for p in model.shared.parameters())
    assert module.balancer.grad_norm.min() > 0


def test_task_without_labels_has_zero_loss_and_gradient():
    logits = torch.randn(4, 2, requires_grad=True)
    mask = torch.tensor([[1.0, 0], [1, 0], [0, 0], [1, 0]])
    for norm in ("batch", "labelled"):
        losses = masked_task_losses(logits, torch.ones(4, 2), mask, norm)
        assert losses[1] == 0 and torch.isfinite(losses).all()
        (g,) = torch.autograd.grad(losses.sum(), logits)
        assert (g[:, 1] == 0).all() and (g[2] == 0).all()


def test_task_heads_are_independent_mlps():
    """The batched heads compute, for every m, head m's own ReLU MLP on copy m of h, and the
    gradient that reaches copy m comes from task m's logit alone."""
    torch.manual_seed(0)
    heads = TaskHeads(3, 6, [5, 4], None)
    hs = torch.randn(3, 7, 6, requires_grad=True)  # distinct inputs per head
    logits = heads(hs)
    assert logits.shape == (7, 3)
    for m in range(3):
        x = hs[m]
        for i, layer in enumerate(heads.layers):
            x = x @ layer.weight[m] + layer.bias[m]
            x = torch.relu(x) if i < len(heads.layers) - 1 else x
        torch.testing.assert_close(logits[:, m], x.squeeze(-1))
    (g,) = torch.autograd.grad(logits[:, 1].sum(), hs)
    assert g[1].abs().sum() > 0 and (g[0] == 0).all() and (g[2] == 0).all()
