"""torchx component: `mbrec train` on nnodes x nproc_per_node workers, any torchx scheduler.

    torchx run -s local_cwd launch/components.py:train --config launch/configs/demo.toml -j 1x2
    torchx run -s slurm     launch/components.py:train --config launch/configs/h100.toml -j 4x8 --gpu 8
    torchx run -s kubernetes -cfg queue=default launch/components.py:train --image <img> -j 2x8 --gpu 8

Trailing arguments (after `--`) are config overrides, `section.key=value`.
"""
# No `from __future__ import annotations` here: torchx decodes the parameter types at runtime.

from typing import Dict, Optional, Tuple

from launch.quiet import silence_benign

silence_benign()  # torchx imports this file; fbgemm, imported below it, logs every library it loads

import torchx  # noqa: E402
from torchx import specs  # noqa: E402
from torchx.components import dist  # noqa: E402


def train(
    *overrides: str,
    config: str = "launch/configs/demo.toml",
    j: str = "1x2",
    name: str = "mbrec",
    image: str = torchx.IMAGE,
    h: Optional[str] = None,
    cpu: int = 0,
    gpu: int = 0,
    memMB: int = 0,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    max_restarts: int = 2,
    rdzv_port: int = 0,
) -> specs.AppDef:
    """Trains the multi-task model described by `config`.

    Args:
        overrides: config overrides, section.key=value
        config: TOML run config (path inside the image / working directory)
        j: {nnodes}x{nproc_per_node}
        name: job name
        image: image (local_cwd: ignored; the current directory is used)
        h: named resource (e.g. a cluster's GPU host type)
        cpu: CPUs per replica (a node); 0: sized from the ranks and reader workers (node_resources)
        gpu: GPUs per replica
        memMB: memory per replica in MB; 0: sized from the ranks and reader workers
        env: extra environment variables
        max_retries: retries of the whole job by the scheduler (Slurm, Kubernetes; local_cwd has none)
        max_restarts: restarts of the worker group by torchrun after a rank fails (any scheduler,
            local_cwd included); each restart resumes from the newest complete checkpoint
        rdzv_port: rendezvous port on the first node (0: a free port on a single node, 29500 across nodes)
    """
    args = ["train", config] + [a for o in overrides for a in ("--set", o)]
    cpu, memMB = node_resources(j, _workers(config, overrides), cpu, memMB)
    app = dist.ddp(*args, m="launch.cli", image=image, name=name, h=h, cpu=cpu, gpu=gpu,
                   memMB=memMB, j=j, env={"PYTHONUNBUFFERED": "1", **(env or {})},
                   max_retries=max_retries, rdzv_port=rdzv_port or DEFAULT_RDZV_PORT)
    return with_agent(app, max_restarts, rdzv_port)


def predict(
    *overrides: str,
    config: str = "launch/configs/demo.toml",
    source: str = "",
    data: str = "",
    out: str = "",
    keep: str = "",
    j: str = "1x2",
    name: str = "mbrec-predict",
    image: str = torchx.IMAGE,
    h: Optional[str] = None,
    gpu: int = 0,
    env: Optional[Dict[str, str]] = None,
    rdzv_port: int = 0,
) -> specs.AppDef:
    """Scores Parquet rows with a trained checkpoint (`mbrec predict` on every rank).

    Args:
        overrides: config overrides, section.key=value
        config: TOML run config of the trained model
        source: run directory, checkpoint directory or step-N checkpoint
        data: comma-separated Parquet files, directories, globs or URIs
        out: output directory or URI
        keep: comma-separated input columns copied beside the predictions
        j: {nnodes}x{nproc_per_node}
        name: job name
        image: image (local_cwd: ignored)
        h: named resource
        gpu: GPUs per replica
        env: extra environment variables
        rdzv_port: rendezvous port on the first node (0: a free port on a single node, 29500 across nodes)
    """
    args = ["predict", config, "--from", source, "--out", out, "--data", *data.split(",")]
    args += ["--keep", *keep.split(",")] if keep else []
    args += [a for o in overrides for a in ("--set", o)]
    cpu, memMB = node_resources(j, _workers(config, overrides))
    return with_agent(dist.ddp(*args, m="launch.cli", image=image, name=name, h=h, cpu=cpu, gpu=gpu, memMB=memMB,
                               j=j, env={"PYTHONUNBUFFERED": "1", **(env or {})},
                               rdzv_port=rdzv_port or DEFAULT_RDZV_PORT), port=rdzv_port)


DEFAULT_RDZV_PORT = 29500  # torchx's, for a job across nodes
RANK_CPUS, RANK_MEM_MB = 1, 8192  # per rank process
WORKER_CPUS, WORKER_MEM_MB = 1, 2048  # per DataLoader worker process of a rank


def node_resources(j: str, workers: int, cpu: int = 0, mem_mb: int = 0) -> Tuple[int, int]:
    """(CPUs, MB) to request per replica, which torchx schedules as one node running all of
    its nproc_per_node ranks, each with `workers` DataLoader processes: sized per process
    unless given (> 0). A fixed per-replica request would starve or OOM-kill an 8-rank node."""
    nproc = int(j.split("x")[-1])
    cpu = cpu if cpu > 0 else nproc * (RANK_CPUS + WORKER_CPUS * workers)
    mem_mb = mem_mb if mem_mb > 0 else nproc * (RANK_MEM_MB + WORKER_MEM_MB * workers)
    return cpu, mem_mb


def _workers(config: str, overrides) -> int:
    """data.num_workers of the run; the default where the config exists only inside the image."""
    from launch.config import load_config
    from data.schema import DataConfig
    try:
        return max(load_config(config, list(overrides)).data.num_workers, 0)
    except FileNotFoundError:
        return DataConfig().num_workers


def with_agent(app: specs.AppDef, max_restarts: int = 0, port: int = 0) -> specs.AppDef:
    """The launch command that dist.ddp builds, run by launch.agent (torchrun, with a failure said
    in one line), with torchrun's `--max_restarts` (the agent restarts every rank of the node when
    one fails; dist.ddp has no parameter for it) and, for a single node, the rendezvous on `port`
    (dist.ddp binds localhost:0, a free port; a multi-node job takes rdzv_port)."""
    for role in app.roles:
        args = []
        for a in role.args:
            if isinstance(a, str) and a.startswith("torchrun "):
                a = a.replace("torchrun ", f"python -m launch.agent --max_restarts {max_restarts} ", 1)
                a = a.replace("--rdzv_endpoint localhost:0 ", f"--rdzv_endpoint localhost:{port} ", 1) if port else a
            args.append(a)
        if not any("--max_restarts" in str(a) for a in args):
            raise ValueError(f"cannot set torchrun's --max_restarts in {role.args}")
        role.args = args
    return app


def compare(
    config: str = "launch/configs/demo.toml",
    plan: str = "runs/compare/plan.json",
    j: str = "1x2",
    name: str = "mbrec-compare",
    image: str = torchx.IMAGE,
    h: Optional[str] = None,
    cpu: int = 0,
    gpu: int = 0,
    memMB: int = 0,
    rdzv_port: int = 0,
) -> specs.AppDef:
    """Runs the planned runs of `mbrec compare` one after another in one job.

    Args:
        config: TOML run config
        plan: JSON list of (variant, seed, overrides) written by `mbrec compare`
        j: {nnodes}x{nproc_per_node}
        name: job name
        image: image (local_cwd: ignored)
        h: named resource
        cpu: CPUs per replica (a node); 0: sized from the ranks and reader workers (node_resources)
        gpu: GPUs per replica
        memMB: memory per replica in MB; 0: sized from the ranks and reader workers
        rdzv_port: rendezvous port on the first node (0: a free port on a single node, 29500 across nodes)
    """
    cpu, memMB = node_resources(j, _workers(config, ()), cpu, memMB)
    return with_agent(dist.ddp("compare-worker", config, "--plan", plan, m="launch.cli", image=image, name=name,
                               h=h, cpu=cpu, gpu=gpu, memMB=memMB, j=j, env={"PYTHONUNBUFFERED": "1"},
                               rdzv_port=rdzv_port or DEFAULT_RDZV_PORT), port=rdzv_port)


def bench(
    *args: str,
    worker: str = "bench-worker",
    config: str = "launch/configs/demo.toml",
    j: str = "1x2",
    name: str = "mbrec-bench",
    image: str = torchx.IMAGE,
    h: Optional[str] = None,
    cpu: int = 0,
    gpu: int = 0,
    memMB: int = 0,
    rdzv_port: int = 0,
) -> specs.AppDef:
    """`mbrec bench-worker` (or another benchmark's worker) on every rank (arguments after `--`
    are passed on).

    Args:
        args: the worker's options
        worker: the worker's command (bench-worker, bench-scale-worker)
        config: TOML run config
        j: {nnodes}x{nproc_per_node}
        name: job name
        image: image (local_cwd: ignored)
        h: named resource
        cpu: CPUs per replica (a node); 0: sized from the ranks and reader workers (node_resources)
        gpu: GPUs per replica
        memMB: memory per replica in MB; 0: sized from the ranks and reader workers
        rdzv_port: rendezvous port on the first node (0: a free port on a single node, 29500 across nodes)
    """
    cpu, memMB = node_resources(j, _workers(config, ()), cpu, memMB)
    return with_agent(dist.ddp(worker, config, *args, m="launch.cli", image=image, name=name, h=h, cpu=cpu,
                               gpu=gpu, memMB=memMB, j=j, env={"PYTHONUNBUFFERED": "1"},
                               rdzv_port=rdzv_port or DEFAULT_RDZV_PORT), port=rdzv_port)
