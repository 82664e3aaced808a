"""Build steps: process group -> model on meta -> fused optimizer -> sharding plan -> DMP ->
dense optimizer -> train pipeline (TorchRec's recommended order)."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.embeddingbag import ShardedEmbeddingBagCollection
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.planner.types import PlannerError
from torchrec.distributed.types import ShardingPlan
from torchrec.distributed.sharding_plan import get_default_sharders
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torch.utils._python_dispatch import TorchDispatchMode

from balancing import build_balancer
from balancing.base import DeferredGram, bind_carrier, optimizable
from data.schema import DataConfig
from models.mtl import ModelConfig, MultiTaskDCN, build_ebc
from trainer.config import DEVICES, OptimConfig, TrainerConfig
from trainer.errors import RunError
from trainer.precision import autocast_dtype
from trainer.task_model import MultiTaskTrain

log = logging.getLogger(__name__)

SPARSE_OPTIMIZERS = {"rowwise_adagrad": RowWiseAdagrad, "adagrad": torch.optim.Adagrad,
                     "adam": torch.optim.Adam, "sgd": torch.optim.SGD}
DENSE_OPTIMIZERS = {"adam": torch.optim.Adam, "adagrad": torch.optim.Adagrad, "sgd": torch.optim.SGD}


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(setting: str, local_rank: int, local_world: int, gpus: int) -> torch.device:
    """This rank's device: `trainer.device` "cpu", "cuda" or "auto" (cuda if a GPU is
    visible); local rank i gets visible GPU i, and more ranks on a machine than visible GPUs
    is an error (two ranks would share a GPU, or die on an invalid ordinal)."""
    if setting not in DEVICES:
        raise RunError(f"trainer.device must be one of {DEVICES}, got {setting!r}")
    if setting == "cpu" or (setting == "auto" and gpus == 0):
        return torch.device("cpu")
    if gpus == 0:
        raise RunError("trainer.device = 'cuda' but no CUDA device is visible")
    if local_world > gpus:
        raise RunError(f"{local_world} ranks on this machine but {gpus} visible GPU(s): start at most {gpus} "
                       f"rank(s) per node (-j Nx{gpus}), or set trainer.device = 'cpu'")
    return torch.device("cuda", local_rank)


def init_distributed(timeout_s: float = 600.0, device_setting: str = "auto") -> DistEnv:
    """Reads torchrun/torchx variables (a single process without them); nccl on GPUs, gloo on CPU.
    `timeout_s`: a collective that waits longer (a rank that died or froze) raises instead of
    hanging for the backend's default of 30 minutes."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    device = pick_device(device_setting, local_rank, local_world,
                         torch.cuda.device_count() if torch.cuda.is_available() else 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
        # Denormal floats (tiny gradients late in training) slow CPU arithmetic by large
        # factors; flushing them to zero changes nothing measurable in the results.
        torch.set_flush_denormal(True)
    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29511"))
        timeout = timedelta(seconds=timeout_s)
        dist.init_process_group(backend=backend, store=_attempt_store(rank, world, timeout), rank=rank,
                                world_size=world, timeout=timeout, device_id=device if backend == "nccl" else None)
    return DistEnv(rank, world, local_rank, local_world, device)


def _attempt_store(rank: int, world: int, timeout: timedelta) -> dist.Store:
    """The env:// rendezvous store, under a prefix of its own per restart attempt. torchrun keeps
    its store across the restarts of a worker group (`--max-restarts`), and the process group
    of a restarted attempt would otherwise read the previous attempt's keys: gloo then dials the
    dead processes' addresses (`connectFullMesh ... Connection refused`)."""
    store, _, _ = next(dist.rendezvous("env://", rank, world, timeout=timeout))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"mbrec/attempt-{attempt}/", store)


def build_train_module(data: DataConfig, model_cfg: ModelConfig, balancer_cfg, device: torch.device,
                       loss_normalization: str = "batch", precision: str = "fp32") -> MultiTaskTrain:
    """Embedding tables on meta (the planner decides where they live), dense parts on device."""
    ebc = build_ebc(data.table_specs(), model_cfg.embedding_dim,
                    torch.device("meta"), model_cfg.embedding_precision)
    model = MultiTaskDCN(ebc, len(data.dense), len(data.tasks), model_cfg, device)
    return MultiTaskTrain(model, build_balancer(balancer_cfg, len(data.tasks)).to(device), loss_normalization,
                          autocast_dtype(precision), device.type, [t.kind == "regression" for t in data.tasks])


BASE_RATE_CLAMP = 1e-5  # a binary rate of 0 or 1 in the sample: the bias stays finite (|logit| <= 11.5)


def head_bias(init: str, rates: Sequence[Optional[float]], tasks: Sequence) -> Optional[torch.Tensor]:
    """Each head's output bias at a fresh start (model.head_bias_init) -> [M] float32, or None
    ("uniform": nn.Linear's init stays). "base_rate": logit(p) of a binary task's sampled training
    positive rate p, the mean label of a regression task: the constant predictor with the lowest
    loss, where the loss starts (0 where the sample had no labelled row). "zero": p = 0.5."""
    if init == "uniform":
        return None
    out = torch.zeros(len(tasks), dtype=torch.float64)
    for m, (task, rate) in enumerate(zip(tasks, rates)):
        if init == "base_rate" and rate is not None:
            p = torch.tensor(rate, dtype=torch.float64)
            out[m] = torch.logit(p.clamp(BASE_RATE_CLAMP, 1 - BASE_RATE_CLAMP)) if task.kind == "binary" else p
    return out.float()


# HBM a rank cannot give to tables, optimizer state and activations: the CUDA context, NCCL's
# buffers and fbgemm's workspaces (about 0.5, 1-2 and 1 GiB on an 8-GPU H100 node), rounded up
HBM_RESERVE = 4 * 2**30


def usable_hbm(total_bytes: int) -> int:
    """A GPU's memory as the hardware states it (bytes: "80 GB" is 80e9) less HBM_RESERVE."""
    return max(0, total_bytes - HBM_RESERVE)


def sharding_choices(configured: List[str], dims: Sequence[int], world_size: int,
                     device_type: str) -> List[Tuple[List[str], Optional[int]]]:
    """(sharding types, column-wise shard width) the planner may use, in the order tried (the
    next if the planner finds no plan): trainer.sharding_types if set. Else on a CPU table-wise
    (torchrec plans no row-wise kernel with gloo). On GPUs with fewer tables than GPUs, the
    tables are first split column-wise into shards of `width` columns, about 8 per GPU: torchrec's
    own choice left 6 of 32 GPUs without a table at 4 x 8 with 26 tables (the others 1.23x their
    share); column shards load every GPU (1.08x at 4 x 8 and 16 x 8) and, unlike row-wise ones,
    hold only their columns of the global batch's lookups (row-wise over 128 GPUs: 27 GiB per
    GPU). Then torchrec's choice among all."""
    if configured:
        return [(configured, None)]
    if device_type == "cpu":
        return [(["table_wise"], None)]
    if len(dims) >= world_size:
        return [([], None)]
    width = max(4, sum(dims) // (8 * world_size) // 4 * 4)  # fbgemm: columns in multiples of 4
    return [(["column_wise"], width), ([], None)]


def fuse_sparse_optimizer(ebc: EmbeddingBagCollection, optim: OptimConfig) -> None:
    """The fused embedding optimizer on `ebc`'s tables (the planner sizes its state)."""
    sparse_cls = SPARSE_OPTIMIZERS[optim.sparse]
    kwargs: Dict[str, float] = {"lr": optim.sparse_lr}
    if optim.sparse != "sgd":
        kwargs["eps"] = optim.eps
    apply_optimizer_in_backward(sparse_cls, ebc.parameters(), kwargs)


def plan_tables(module: nn.Module, ebc: EmbeddingBagCollection, configured: List[str], device_type: str,
                world_size: int, local_world_size: int, batch_size: int, hbm_bytes: Optional[int] = None,
                group=None) -> ShardingPlan:
    """torchrec's plan for a topology, real (`group`: planned collectively, every rank the same)
    or simulated (`mbrec plan`); `hbm_bytes`: usable per GPU (usable_hbm)."""
    configs = ebc.embedding_bag_configs()
    choices = sharding_choices(configured, [c.embedding_dim for c in configs], world_size, device_type)
    topology = Topology(world_size=world_size, local_world_size=local_world_size, compute_device=device_type,
                        **({"hbm_cap": hbm_bytes} if hbm_bytes else {}))
    for i, (types, width) in enumerate(choices):
        constraints = {c.name: ParameterConstraints(sharding_types=types, min_partition=width)
                       for c in configs} if types else None
        planner = EmbeddingShardingPlanner(topology=topology, batch_size=batch_size, constraints=constraints)
        try:
            if group is not None:
                return planner.collective_plan(module, get_default_sharders(), group)
            return planner.plan(module, get_default_sharders())
        except PlannerError:
            if i == len(choices) - 1:
                raise
            log.info("no plan with sharding types %s; trying %s", types, choices[i + 1][0] or "torchrec's choice")
    raise AssertionError("unreachable")


class NoTableDraws(TorchDispatchMode):
    """Skips every random draw (`aten.uniform_`) made while DMP builds the tables. torchrec
    draws each table twice as it shards it, with no option not to (its fused kernel in its
    constructor, then ShardedEmbeddingBagCollection.reset_parameters with the table's init_fn,
    which overwrites the first): at 1M rows x 26 tables that is seconds of CPU per rank on every
    start and restart. `shard` then draws a fresh model's tables once, and none of a model whose
    tables a checkpoint overwrites (`checkpoint.load` loads every element of them: check_fits)."""
    skipped = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.uniform_.default:
            self.skipped += 1
            return args[0]
        return func(*args, **(kwargs or {}))


def shard(module: nn.Module, ebc: EmbeddingBagCollection, optim: OptimConfig, trainer: TrainerConfig,
          env: DistEnv, batch_size: int, gram: Optional[DeferredGram] = None,
          tables_loaded: bool = False) -> DistributedModelParallel:
    """Fused embedding optimizer on `ebc` (a submodule of `module`), sharding plan, DMP.
    `gram`: a balancer's deferred Gram, whose carrier DDP then reduces with the dense gradients.
    The tables are drawn once, from each table's configured init (torchrec's `reset_parameters`),
    or not at all when `tables_loaded` (`NoTableDraws`). (DMP's `init_parameters` only allocates
    modules left on meta: the dense parts are built on their device.)"""
    # the planner's memory budget: the real device's memory (its default assumes a smaller GPU)
    hbm = usable_hbm(torch.cuda.get_device_properties(env.device).total_memory) if env.device.type == "cuda" else None
    fuse_sparse_optimizer(ebc, optim)
    plan = plan_tables(module, ebc, trainer.sharding_types, env.device.type, env.world_size, env.local_world_size,
                       batch_size, hbm, dist.GroupMember.WORLD)
    sharders: List = get_default_sharders()
    if env.is_main:
        log.info("sharding plan:\n%s", plan)
    with NoTableDraws():
        dmp = DistributedModelParallel(module=module, device=env.device, plan=plan, sharders=sharders,
                                       init_parameters=False)
    if not tables_loaded:
        for sharded in dmp.modules():
            if isinstance(sharded, ShardedEmbeddingBagCollection):
                sharded.reset_parameters()
    bind_carrier(gram, dmp)
    return dmp


def build_optimizer(dmp: DistributedModelParallel, optim: OptimConfig) -> CombinedOptimizer:
    dense_cls = DENSE_OPTIMIZERS[optim.dense]
    dense_params = dict(optimizable(in_backward_optimizer_filter(dmp.named_parameters())))
    dense = KeyedOptimizerWrapper(dense_params, lambda params: dense_cls(params, lr=optim.dense_lr))
    return CombinedOptimizer([dmp.fused_optimizer, dense])


def build_pipeline(dmp: DistributedModelParallel, optimizer: CombinedOptimizer,
                   env: DistEnv) -> TrainPipelineSparseDist:
    return TrainPipelineSparseDist(dmp, optimizer, env.device, execute_all_batches=True)


def build_training(module: MultiTaskTrain, cfg, env: DistEnv, tables_loaded: bool = False):
    """module (built by build_train_module) -> (dmp, optimizer, pipeline); `tables_loaded`: a
    checkpoint's model will be loaded into it (no random init of the tables)."""
    dmp = shard(module, module.model.ebc, cfg.optim, cfg.trainer, env, cfg.data.batch_size,
                module.balancer.deferred_gram(), tables_loaded)
    optimizer = build_optimizer(dmp, cfg.optim)
    return dmp, optimizer, build_pipeline(dmp, optimizer, env)
