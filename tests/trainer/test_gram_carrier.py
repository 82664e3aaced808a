"""Through the trainer (DMP + train pipeline, 2 gloo ranks): DDP carries MultiBalance's Gram."""
from tests.dist_utils import run_ranks


def _train_steps(raw: dict, steps: int):
    import itertools

    from launch.config import RunConfig, from_dict
    from trainer.tools.bench import random_batches
    from trainer.build import build_train_module, build_training, init_distributed
    cfg = from_dict(RunConfig, raw)
    env = init_distributed()
    module = build_train_module(cfg.data, cfg.model, cfg.balancer, env.device)
    _, optimizer, pipeline = build_training(module, cfg, env)
    batches = itertools.islice(itertools.cycle(random_batches(cfg, 4, seed=env.rank)), steps)
    for _ in range(steps):
        pipeline.progress(batches)
    mailbox = module.balancer.deferred_gram()
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    return (mailbox.carried, module.balancer.weights.tolist(), id(mailbox.carrier) in optimized,
            mailbox.carrier.detach().abs().sum().item(), mailbox.carrier.grad is not None)


def test_the_trainer_carries_multibalance_gram_on_ddp(tiny_config):
    """DDP holds the carrier (no all-reduce of its own), the optimizer does not (its value stays
    0; its gradient holds the last Gram), and the weights, computed from the carried Gram, agree
    on both ranks and have moved."""
    r0, r1 = run_ranks(_train_steps, (tiny_config, 6))
    for carried, _, optimized, value, has_grad in (r0, r1):
        assert carried and not optimized and value == 0 and has_grad
    w0, w1 = r0[1], r1[1]
    assert w0 == w1
    assert max(abs(w - 1 / 3) for w in w0) > 1e-4
