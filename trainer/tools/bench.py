"""`mbrec bench`: training throughput of model variants at the same size, timed side by side
in one job, alternating variants over several rounds (shared machines are noisy):

    equal         the multi-task model, sum of task losses
    multibalance  the same model with MultiBalance on the shared representation, as configured
                  (`multibalance_exact` / `multibalance_deferred`: with `deferred` off / on;
                  `multibalance_paper`: the paper's step on each step's own Gram)
    param_mgda    MGDA on the interaction module's parameters (M extra backward passes)
    dlrm_dcn      torchrec.models.dlrm.DLRM_DCN, single task, same tables / dense / cross sizes

Input: in-memory random batches (default; isolates the model) or the config's Parquet files.
Each variant runs through DMP + TrainPipelineSparseDist exactly as in training.

Three measures per round, each compared with equal weights' in the same round (paired), with the
distribution-free 95 % interval of the median ratio and the rounds an interval of +-1 % needs:
  wall     samples per second over the round (what a job sees; the noisiest)
  step     from the median step time of the round (robust to a step stalled by the machine)
  cpu      from this process's CPU time per step, all its threads (time descheduled not counted)
On a CPU each rank is pinned to its own cores with one intra-op thread per core (`pin`): ranks
that share cores time each other's scheduling more than their own work.
"""
from __future__ import annotations

import copy
import dataclasses
import gc
import itertools
import json
import logging
import math
import os
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
    rounds: int = 0  # 0 (and steps 0): by the device and the mode, see `resolve_counts`
    warmup_steps: int = 10  # before a variant's first round (each round, for one built per round)
    steps: int = 0
    parquet: bool = False  # read the config's train files instead of in-memory batches
    one_at_a_time: bool = False  # build each variant anew per round (GPU memory), else keep all
    distinct_batches: int = 8
    pin: bool = True  # CPU: each rank on its own cores (see the module docstring)
    # the kept variants built anew this many times over the rounds (each build keeps its own
    # memory layout, which moves a variant's speed by up to ~1 % against an identical one's: A/A)
    rebuilds: int = 1


# the multi-task variants: name -> (balancer method, MultiBalance settings over the configured ones)
MULTI_TASK = {"equal": ("equal", {}), "multibalance": ("multibalance", {}),
              "multibalance_exact": ("multibalance", {"deferred": False}),
              "multibalance_deferred": ("multibalance", {"deferred": True}),
              # equal weights built a second time: the A/A control, what the bench reads between two
              # identical variants (its own error, which no number of rounds removes)
              "equal_again": ("equal", {}),
              # the default with its M-sized step in Python instead of compiled C (same results)
              "multibalance_python": ("multibalance", {"compiled_step": False}),
              # the paper's form: its step on this step's Gram (the default tracks the Gram, capped step)
              "multibalance_paper": ("multibalance", {"step": "paper", "gram_ema": 0.0}),
              "param_mgda": ("param_mgda", {}), "mgda": ("mgda", {})}


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
    cfg.balancer.method, settings = MULTI_TASK[name]
    cfg.balancer.multibalance = dataclasses.replace(cfg.balancer.multibalance, **settings)
    module = build_train_module(cfg.data, cfg.model, cfg.balancer, env.device, cfg.trainer.loss_normalization,
                                cfg.trainer.precision)
    _, _, pipeline = build_training(module, cfg, env)
    return pipeline, lambda b: b


def _sync(env: DistEnv) -> None:
    if env.device.type == "cuda":
        torch.cuda.synchronize(env.device)
    if dist.is_initialized():
        dist.barrier()


MEASURES = ("wall", "step", "cpu")


def pin_cpu(env: DistEnv) -> List[int]:
    """On a CPU: this rank's share of the cores the job may use (by local rank), for every
    thread of the process (gloo's, DDP's) and with one intra-op thread per core; -> the cores,
    or [] where there is nothing to pin (an accelerator, more ranks than cores, no affinity)."""
    if env.device.type != "cpu" or not hasattr(os, "sched_setaffinity"):
        return []
    cores = sorted(os.sched_getaffinity(0))
    per = len(cores) // max(env.local_world_size, 1)
    if per < 1:
        return []
    mine = set(cores[env.local_rank * per:(env.local_rank + 1) * per])
    for tid in os.listdir("/proc/self/task"):  # threads started later inherit the main thread's
        try:
            os.sched_setaffinity(int(tid), mine)
        except OSError:  # a thread that ended meanwhile
            pass
    torch.set_num_threads(per)
    return sorted(mine)


def time_steps(pipeline, batches: Iterator, steps: int, warmup: int, env: DistEnv) -> Dict[str, float]:
    """`steps` training steps after `warmup` ones, from an endless `batches` that the pipeline
    keeps between calls (in its steady state: no fill or drain is timed) -> {"secs": wall
    seconds, "step": the median step's seconds, "cpu": CPU seconds per step}, the last two
    averaged over the ranks."""
    for _ in range(warmup):
        pipeline.progress(batches)
    _sync(env)
    per_step = []
    c0, t0 = time.process_time(), time.perf_counter()
    for _ in range(steps):
        s0 = time.perf_counter()
        pipeline.progress(batches)
        per_step.append(time.perf_counter() - s0)
    _sync(env)
    secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    local = torch.tensor([statistics.median(per_step), cpu / steps], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(local)  # (a CPU tensor: gloo; on NCCL the ranks' own are kept)
        local /= env.world_size
    return {"secs": secs, "step": float(local[0]), "cpu": float(local[1])}


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
    pinned = pin_cpu(env) if bench.pin else []
    built = _build_resident(cfg, bench, env)
    resolve_counts(bench, env.device.type)  # after the choice of one at a time, which a GPU may make here
    qps: Dict[str, Dict[str, List[float]]] = {v: {m: [] for m in MEASURES} for v in bench.variants}
    samples = cfg.data.batch_size * env.world_size  # per step
    streams: Dict[str, Iterator] = {}  # a resident variant's batches, kept between rounds with its pipeline
    with precision_context(cfg.trainer.precision, env.device):
        every = rebuild_every(bench) if built else 0
        for r in range(bench.rounds):
            if every and r and r % every == 0:  # a new build of every variant, warmed up again
                built, streams = {}, {}
                gc.collect()
                built = _build_resident(cfg, bench, env)
            order = bench.variants[r % len(bench.variants):] + bench.variants[:r % len(bench.variants)]
            for v in order:  # rotated each round: no variant always runs first
                pipeline, convert = built[v] if v in built else build_variant(v, cfg, env)
                fresh = v not in streams
                batches = streams[v] if not fresh else map(convert, source())
                if v in built:
                    streams[v] = batches  # warmed up once, then timed round after round in its steady state
                warmup = bench.warmup_steps if fresh else 0
                t = time_steps(pipeline, batches, bench.steps, warmup, env)
                for m, x in (("wall", bench.steps * samples / t["secs"]), ("step", samples / t["step"]),
                             ("cpu", samples / t["cpu"])):
                    qps[v][m].append(x)
                if env.is_main and (r + 1) % max(bench.rounds // 10, 1) == 0:  # (few lines: printing costs CPU)
                    log.info("round %d %-13s %12.0f samples/s (%.3f ms median step, %.3f ms CPU per step)", r, v,
                             qps[v]["wall"][-1], 1e3 * t["step"], 1e3 * t["cpu"])
                if v not in built:
                    del pipeline
                    gc.collect()
                    if env.device.type == "cuda":
                        torch.cuda.empty_cache()
    result = summarize(qps, cfg, bench, env)
    result["pinned_cores"], result["threads"] = pinned, torch.get_num_threads()
    return result


def resolve_counts(bench: BenchConfig, device_type: str = "cpu") -> None:
    """Rounds and steps left at 0: on a CPU 200 x 2 with the variants kept built (rounds of
    2 steps pair the variants closely in time); on an accelerator 30 x 20 (a round ends in a
    device sync, which drains the queue that overlaps the host's work with the device's: short
    rounds would hide what the host costs); 5 x 50 with one variant built per round (each round
    then rebuilds every variant)."""
    rounds, steps = (5, 50) if bench.one_at_a_time else (200, 2) if device_type == "cpu" else (30, 20)
    bench.rounds, bench.steps = bench.rounds or rounds, bench.steps or steps


def fits_resident(per_variant: int, free: int, variants: int, headroom: float = 0.6) -> bool:
    """Whether the other `variants - 1` variants, `per_variant` bytes each as built (their
    optimizer state and activations come on top: hence the headroom), fit in `free` bytes."""
    return (variants - 1) * per_variant <= headroom * free


def rebuild_every(bench: BenchConfig) -> int:
    """Rounds between two builds of the kept variants (0: built once), for `bench.rebuilds` builds
    over `bench.rounds` rounds (after `resolve_counts`)."""
    if not 1 <= bench.rebuilds <= bench.rounds:
        raise ValueError(f"bench rebuilds must be between 1 and the rounds ({bench.rounds}), got {bench.rebuilds}")
    return bench.rounds // bench.rebuilds if bench.rebuilds > 1 else 0


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


def summarize(qps: Dict[str, Dict[str, List[float]]], cfg, bench: BenchConfig, env: DistEnv) -> Dict:
    """qps {variant: {measure: [per round]}} -> the result: per variant the wall QPS (best,
    median, rounds) and, against equal weights, each measure's paired ratio and interval."""
    base = qps.get("equal")
    rows = {}
    for v, by in qps.items():
        vals = by["wall"]
        row = {"best": max(vals), "median": statistics.median(vals), "rounds": vals, "measures": {}}
        if base:
            row["ratio_best"] = max(vals) / max(base["wall"])
            row["ratio_median"] = statistics.median(vals) / statistics.median(base["wall"])
            for m in MEASURES:
                row["measures"][m] = paired_ratio(by[m], base[m])
            row["ratio_paired"] = row["measures"]["wall"]["ratio"]
            row["ratio_paired_ci95"] = row["measures"]["wall"]["ci95"]
        rows[v] = row
    return {"device": str(env.device) if env.device.type == "cpu" else torch.cuda.get_device_name(env.device),
            "world_size": env.world_size, "batch_size_per_rank": cfg.data.batch_size,
            "precision": cfg.trainer.precision, "embedding_precision": cfg.model.embedding_precision,
            "input": "parquet" if bench.parquet else "in-memory", "steps": bench.steps,
            "one_at_a_time": bench.one_at_a_time, "rebuilds": bench.rebuilds, "variants": rows}


def paired_ratio(values: List[float], base: List[float], width: float = 0.01) -> Dict:
    """The median of same-round ratios values / base (robust to the machine's speed drifting
    between rounds), its 95 % interval, and the rounds an interval of +-`width` would need: from
    the ratios' spread (1.4826 MAD of their logs, a robust standard deviation) and the median's
    standard error, 1.2533 s / sqrt(n) for normal noise."""
    paired = sorted(v / b for v, b in zip(values, base))
    logs = [math.log(x) for x in paired]
    centre = statistics.median(logs)
    spread = 1.4826 * statistics.median([abs(x - centre) for x in logs])
    need = math.ceil((1.96 * 1.2533 * spread / width) ** 2)
    return {"ratio": statistics.median(paired), "ci95": median_ci95(paired), "rounds_for_1pct": max(need, 8)}


def median_ci95(values: List[float]) -> Optional[List[float]]:
    """Distribution-free 95 % confidence interval of the median of `values` (sorted): the order
    statistics k and n + 1 - k with k from the binomial(n, 1/2) normal approximation; None for
    fewer than 8 values, where k < 1: no interval of order statistics reaches 95 %."""
    n = len(values)
    k = math.floor((n - 1.96 * math.sqrt(n)) / 2)  # 1-based rank of the lower bound
    return [values[k - 1], values[n - k]] if k >= 1 else None


def format_table(result: Dict) -> str:
    pinned = result.get("pinned_cores")
    lines = [f"{result['device']} x {result['world_size']} ranks, batch {result['batch_size_per_rank']}/rank, "
             f"{result['precision']} dense, {result['embedding_precision']} tables, {result['input']} input, "
             f"{len(next(iter(result['variants'].values()))['rounds'])} rounds of {result['steps']} steps"
             + (f", variants built {result['rebuilds']} times" if result.get("rebuilds", 1) > 1 else "")
             + (f", rank 0 pinned to cores {pinned}, {result.get('threads')} thread(s)" if pinned else ""),
             "paired/equal: the median of same-round ratios to equal weights (95 % interval); rounds: what an "
             "interval of +-1 % needs",
             f"{'variant':<22}{'median QPS':>11}" + "".join(f"{m + ' paired/equal':>33}" for m in MEASURES)]
    for v, r in result["variants"].items():
        cells = []
        for m in MEASURES:
            x = r.get("measures", {}).get(m)
            ci = "%.4f-%.4f" % tuple(x["ci95"]) if x and x["ci95"] else "(< 8 rounds)"
            cells.append(f"{x['ratio']:>8.4f} ({ci}) {x['rounds_for_1pct']:>4}" if x else f"{'':>33}")
        lines.append(f"{v:<22}{r['median']:>11.0f}" + "".join(f"{c:>33}" for c in cells))
    return "\n".join(lines)


def write_result(result: Dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
