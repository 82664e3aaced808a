"""`mbrec bench`: training throughput of model variants at the same size, timed side by side
in one job, alternating variants over several rounds (shared machines are noisy):

    equal         the multi-task model, sum of task losses
    multibalance  the same model with MultiBalance on the shared representation, as configured
                  (`multibalance_exact` / `multibalance_deferred`: with `deferred` off / on)
    param_mgda    MGDA on the interaction module's parameters (M extra backward passes)
    dlrm_dcn      torchrec.models.dlrm.DLRM_DCN, single task, same tables / dense / cross sizes

Input: in-memory random batches (default; isolates the model) or the config's Parquet files.
Each variant runs through DMP + TrainPipelineSparseDist exactly as in training.
"""
from __future__ import annotations

import copy
import gc
import itertools
import json
import logging
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional

import torch
import torch.distributed as dist
from torchrec.datasets.utils import Batch as DLRMBatch
from torchrec.models.dlrm import DLRM_DCN, DLRMTrain
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from data.batch import COUNTERS, Batch
from data.reader import DataSource
from models.mtl import build_ebc
from trainer.build import DistEnv, build_optimizer, build_pipeline, build_train_module, build_training, shard
from trainer.precision import AutocastForward, autocast_dtype, precision_context

log = logging.getLogger(__name__)


@dataclass
class BenchConfig:
    variants: List[str] = field(default_factory=lambda: ["equal", "multibalance", "param_mgda", "dlrm_dcn"])
    rounds: int = 3
    warmup_steps: int = 10
    steps: int = 50
    parquet: bool = False  # read the config's train files instead of in-memory batches
    one_at_a_time: bool = False  # build each variant anew per round (GPU memory), else keep all
    distinct_batches: int = 8


# the multi-task variants: name -> (balancer method, MultiBalance's `deferred`, None = as configured)
MULTI_TASK = {"equal": ("equal", None), "multibalance": ("multibalance", None),
              "multibalance_exact": ("multibalance", False), "multibalance_deferred": ("multibalance", True),
              "param_mgda": ("param_mgda", None), "mgda": ("mgda", None)}


def random_batches(cfg, n: int, seed: int) -> List[Batch]:
    """Single-id features, uniform ids, ~20 % positives; the 2nd task labelled on positives of
    the 1st (like CVR on clicks)."""
    g = torch.Generator().manual_seed(seed)
    b, keys = cfg.data.batch_size, [f.name for f in cfg.data.sparse]
    out = []
    for _ in range(n):
        values = torch.cat([torch.randint(0, f.num_embeddings, (b,), generator=g) for f in cfg.data.sparse])
        kjt = KeyedJaggedTensor.from_lengths_sync(keys, values, torch.ones(b * len(keys), dtype=torch.int32))
        labels = (torch.rand(b, len(cfg.data.tasks), generator=g) < 0.2).float()
        mask = torch.ones_like(labels)
        if labels.shape[1] > 1:
            mask[:, 1] = labels[:, 0]
        out.append(Batch(torch.randn(b, len(cfg.data.dense), generator=g), kjt, labels * mask, mask,
                         torch.zeros(len(COUNTERS), dtype=torch.int64)))
    return out


def as_dlrm_batch(batch: Batch) -> DLRMBatch:
    return DLRMBatch(dense_features=batch.dense_features, sparse_features=batch.sparse_features,
                     labels=batch.labels[:, 0].contiguous())


def build_variant(name: str, cfg, env: DistEnv):
    """-> (pipeline, converts a Batch to the variant's input)."""
    torch.manual_seed(0)
    if name == "dlrm_dcn":
        ebc = build_ebc(cfg.data.table_specs(), cfg.model.embedding_dim,
                        torch.device("meta"), cfg.model.embedding_precision)
        if cfg.model.dense_arch[-1] != cfg.model.embedding_dim:
            raise ValueError("dlrm_dcn needs model.dense_arch[-1] == model.embedding_dim")
        model = AutocastForward(DLRMTrain(DLRM_DCN(
            ebc, len(cfg.data.dense), cfg.model.dense_arch, cfg.model.shared_arch + cfg.model.head_arch + [1],
            cfg.model.cross_layers, cfg.model.cross_low_rank, dense_device=env.device)),
            autocast_dtype(cfg.trainer.precision), env.device.type)
        dmp = shard(model, ebc, cfg.optim, cfg.trainer, env, cfg.data.batch_size)
        optimizer = build_optimizer(dmp, cfg.optim)
        return build_pipeline(dmp, optimizer, env), as_dlrm_batch
    if name not in MULTI_TASK:
        raise ValueError(f"unknown bench variant {name!r}; known: {', '.join([*MULTI_TASK, 'dlrm_dcn'])}")
    cfg = copy.deepcopy(cfg)
    cfg.balancer.method, deferred = MULTI_TASK[name]
    if deferred is not None:
        cfg.balancer.multibalance.deferred = deferred
    module = build_train_module(cfg.data, cfg.model, cfg.balancer, env.device, cfg.trainer.loss_normalization,
                                cfg.trainer.precision)
    _, _, pipeline = build_training(module, cfg, env)
    return pipeline, lambda b: b


def _sync(env: DistEnv) -> None:
    if env.device.type == "cuda":
        torch.cuda.synchronize(env.device)
    if dist.is_initialized():
        dist.barrier()


def _run(pipeline, batches: Iterator, steps: int) -> None:
    it = itertools.islice(batches, steps)  # the pipeline drains it: no batch left in flight
    while True:
        try:
            pipeline.progress(it)
        except StopIteration:
            return


def time_steps(pipeline, batches: Iterator, steps: int, warmup: int, env: DistEnv) -> float:
    """Seconds for `steps` training steps after `warmup` ones."""
    _run(pipeline, batches, warmup)
    _sync(env)
    t0 = time.perf_counter()
    _run(pipeline, batches, steps)
    _sync(env)
    return time.perf_counter() - t0


def run_bench(cfg, bench: BenchConfig, env: DistEnv) -> Dict:
    source: Callable[[], Iterator[Batch]]
    if bench.parquet:
        src = DataSource(cfg.data.train, cfg.data, env.rank, env.world_size, env.device.type == "cuda")
        source = lambda: itertools.chain.from_iterable(src.epoch() for _ in itertools.count())  # noqa: E731
    else:
        fixed = random_batches(cfg, bench.distinct_batches, seed=env.rank)
        if env.device.type == "cuda":  # host-to-device copies as fast as the reader's (pinned) batches
            fixed = [b.pin_memory() for b in fixed]
        source = lambda: itertools.cycle(fixed)  # noqa: E731
    built = _build_resident(cfg, bench, env)
    qps: Dict[str, List[float]] = {v: [] for v in bench.variants}
    with precision_context(cfg.trainer.precision, env.device):
        for r in range(bench.rounds):
            order = bench.variants[r % len(bench.variants):] + bench.variants[:r % len(bench.variants)]
            for v in order:  # rotated each round: no variant always runs first

                pipeline, convert = built[v] if v in built else build_variant(v, cfg, env)
                secs = time_steps(pipeline, map(convert, source()), bench.steps, bench.warmup_steps, env)
                qps[v].append(bench.steps * cfg.data.batch_size * env.world_size / secs)
                if env.is_main:
                    log.info("round %d %-13s %12.0f samples/s", r, v, qps[v][-1])
                if v not in built:
                    del pipeline
                    gc.collect()
                    if env.device.type == "cuda":
                        torch.cuda.empty_cache()
    return summarize(qps, cfg, bench, env)


def fits_resident(per_variant: int, free: int, variants: int, headroom: float = 0.6) -> bool:
    """Whether the other `variants - 1` variants, `per_variant` bytes each as built (their
    optimizer state and activations come on top: hence the headroom), fit in `free` bytes."""
    return (variants - 1) * per_variant <= headroom * free


def _build_resident(cfg, bench: BenchConfig, env: DistEnv) -> Dict:
    """Every variant built once and kept, or {} (each built per round and freed) when asked
    or, on a GPU, when the first variant shows that they would not fit together (the ranks
    agree on the choice)."""
    if bench.one_at_a_time:
        return {}
    if env.device.type != "cuda":
        return {v: build_variant(v, cfg, env) for v in bench.variants}
    before = torch.cuda.memory_allocated(env.device)
    built = {bench.variants[0]: build_variant(bench.variants[0], cfg, env)}
    per_variant = torch.cuda.memory_allocated(env.device) - before
    fits = torch.tensor([float(fits_resident(per_variant, torch.cuda.mem_get_info(env.device)[0],
                                             len(bench.variants)))], device=env.device)
    if dist.is_initialized():
        dist.all_reduce(fits, op=dist.ReduceOp.MIN)
    if not bool(fits):
        log.warning("the %d variants do not fit in GPU memory together (%.1f GiB each as built): "
                    "building one at a time", len(bench.variants), per_variant / 2**30)
        built.clear()
        gc.collect()
        torch.cuda.empty_cache()
        bench.one_at_a_time = True
        return {}
    return {**built, **{v: build_variant(v, cfg, env) for v in bench.variants[1:]}}


def summarize(qps: Dict[str, List[float]], cfg, bench: BenchConfig, env: DistEnv) -> Dict:
    base = qps.get("equal")
    rows = {}
    for v, vals in qps.items():
        row = {"best": max(vals), "median": statistics.median(vals), "rounds": vals}
        if base:
            row["ratio_best"] = max(vals) / max(base)
            row["ratio_median"] = statistics.median(vals) / statistics.median(base)
            # the median of same-round ratios: robust to the machine's speed drifting between rounds
            paired = sorted(v / b for v, b in zip(vals, base))
            row["ratio_paired"] = statistics.median(paired)
            row["ratio_paired_ci95"] = median_ci95(paired)
        rows[v] = row
    return {"device": str(env.device) if env.device.type == "cpu" else torch.cuda.get_device_name(env.device),
            "world_size": env.world_size, "batch_size_per_rank": cfg.data.batch_size,
            "precision": cfg.trainer.precision, "embedding_precision": cfg.model.embedding_precision,
            "input": "parquet" if bench.parquet else "in-memory", "steps": bench.steps,
            "one_at_a_time": bench.one_at_a_time, "variants": rows}


def median_ci95(values: List[float]) -> Optional[List[float]]:
    """Distribution-free 95 % confidence interval of the median of `values` (sorted): the order
    statistics k and n + 1 - k with k from the binomial(n, 1/2) normal approximation; None for
    fewer than 8 values, where k < 1: no interval of order statistics reaches 95 %."""
    n = len(values)
    k = math.floor((n - 1.96 * math.sqrt(n)) / 2)  # 1-based rank of the lower bound
    return [values[k - 1], values[n - k]] if k >= 1 else None


def format_table(result: Dict) -> str:
    lines = [f"{result['device']} x {result['world_size']} ranks, batch {result['batch_size_per_rank']}/rank, "
             f"{result['precision']} dense, {result['embedding_precision']} tables, {result['input']} input",
             f"{'variant':<22}{'best QPS':>11}{'median QPS':>11}{'best/equal':>11}{'median/equal':>13}"
             f"{'paired/equal':>13}{'paired 95% CI':>18}"]
    nan = float("nan")
    for v, r in result["variants"].items():
        lines.append(f"{v:<22}{r['best']:>11.0f}{r['median']:>11.0f}{r.get('ratio_best', nan):>11.4f}"
                     f"{r.get('ratio_median', nan):>13.4f}{r.get('ratio_paired', nan):>13.4f}"
                     + (f"{'%.4f-%.4f' % tuple(r['ratio_paired_ci95']):>18}" if r.get("ratio_paired_ci95") else ""))
    return "\n".join(lines)


def write_result(result: Dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
