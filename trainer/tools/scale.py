"""`mbrec bench-scale`: every path that touches the whole model state, at a table size, on the
ranks of a job (each size its own job: the memory of one size must not carry into the next).

    mbrec bench-scale launch/configs/demo.toml --rows 100000,500000,1000000 -j 1x2

The config gives the dense part, the tasks and the optimizers; its tables are replaced by
`--tables` tables of `--rows` x `--dim` (one single-id feature each), and training reads
in-memory random batches of `--batch` rows. Per phase and rank: wall and CPU seconds, the RSS
at the phase's start and its peak (Linux VmHWM, reset per phase), and both as ratios to the
rank's share of the checkpoint (tables and optimizer state). Phases, in order:

- build: model on meta, fused optimizer, plan, DMP (tables drawn once);
- first step, steady step (median of `--steps`);
- save: a checkpoint (`trainer.checkpoint`), and `save async` (its blocking part: the state
  staged to host memory) and `async write` (the rest, in the background: waited for here),
  twice (the second stages into the memory of the first);
- resume: a model built for loading (no draws) and the whole checkpoint loaded; then `raw DCP
  load`, DCP's own load of the same checkpoint into the same model (no digests, no checks), and
  `load`, ours again (both after a first read of the files), for the ratio of the two;
- predict: a model built for loading, its model part loaded, one batch scored;
- export (rank 0; the others wait): `export single int8` (one TorchScript file) and `export
  sharded int8`, each from the checkpoint with the tables read one at a time.
"""
from __future__ import annotations

import copy
import gc
import json
import shutil
import statistics
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, List

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torchrec.optim.keyed import KeyedOptimizerWrapper

from data.schema import SparseFeature
from models.mtl import MultiTaskDCN, build_ebc
from trainer import checkpoint
from trainer.build import DistEnv, build_train_module, build_training
from trainer.tools.bench import random_batches
from trainer.tools.memory import Phase, measured

PHASES = ("build", "first step", "steady step", "save", "save async", "async write", "save async again",
          "async write again", "resume", "raw DCP load", "load", "predict", "export single int8",
          "export sharded int8")


def scale_config(cfg, rows: int, tables: int, dim: int, batch: int):
    """`cfg` with `tables` tables of `rows` x `dim` and per-rank batch `batch`."""
    cfg = copy.deepcopy(cfg)
    cfg.data.sparse = [SparseFeature(name=f"s{i}", num_embeddings=rows) for i in range(tables)]
    cfg.data.tables = []
    cfg.model.embedding_dim, cfg.data.batch_size = dim, batch
    return cfg


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _built(cfg, env: DistEnv, tables_loaded: bool):
    module = build_train_module(cfg.data, cfg.model, cfg.balancer, env.device)
    dmp, optimizer, pipeline = build_training(module, cfg, env, tables_loaded=tables_loaded)
    for _, opt in optimizer.optimizers:  # the dense optimizer's state, as after a step (Adam's moments)
        if isinstance(opt, KeyedOptimizerWrapper):
            opt.init_state()
    return dmp, optimizer, pipeline


def run_scale(cfg, env: DistEnv, out: Path, steps: int) -> Dict:
    """Every phase on this rank -> {"phases": {name: Phase as dict}, "share": bytes, ...}."""
    phases: Dict[str, Phase] = {}
    batches = random_batches(cfg, 4, seed=env.rank)

    @contextmanager
    def phase(name: str) -> Iterator[None]:
        _barrier()  # every rank starts the phase together
        gc.collect()
        with measured() as p:
            yield
        phases[name] = p

    with phase("build"):
        dmp, optimizer, pipeline = _built(cfg, env, tables_loaded=False)
    share = checkpoint.state_bytes(dmp, optimizer)[0]
    with phase("first step"):
        pipeline.progress(iter(batches * 2))
    times: List[Phase] = []
    for k in range(steps):
        with measured() as p:
            pipeline.progress(iter(batches[k % 4:k % 4 + 1] * 2))
        times.append(p)
    phases["steady step"] = sorted(times, key=lambda p: p.wall_s)[len(times) // 2]
    sync = checkpoint.CheckpointDir(out / "checkpoints", keep=1)
    background = checkpoint.CheckpointDir(out / "checkpoints-async", keep=1, asynchronous=True)
    sync.prepare()
    background.prepare()
    with phase("save"):
        ckpt = sync.save(dmp, optimizer, 1)
    with phase("save async"):
        background.save(dmp, optimizer, 1)
    with phase("async write"):
        background.wait()
    with phase("save async again"):  # into the staging memory of the first
        background.save(dmp, optimizer, 2)
    with phase("async write again"):
        background.wait()
    del dmp, optimizer, pipeline, background  # (the background saves' host copies with it)
    _resume(cfg, env, ckpt, phases)
    _predict(cfg, env, ckpt, batches[0], phases)
    _exports(cfg, env, ckpt, out, phases)
    return {"rank": env.rank, "world_size": env.world_size, "share": share,
            "phases": {k: v.as_dict() for k, v in phases.items()}}


def _resume(cfg, env: DistEnv, ckpt: str, phases: Dict[str, Phase]) -> None:
    """resume (a model built for loading, and the load); then DCP's raw load and ours again,
    each after the other has read the files (the page cache alike for both)."""
    _barrier()
    gc.collect()
    with measured() as whole:
        dmp, optimizer, _ = _built(cfg, env, tables_loaded=True)
        checkpoint.load(ckpt, dmp, optimizer)
    phases["resume"] = whole
    _barrier()
    with measured() as raw:  # DCP alone, into the same model: the floor of a load
        dcp.load(checkpoint.checkpoint_state(dmp, optimizer, 0), checkpoint_id=ckpt)
    phases["raw DCP load"] = raw
    _barrier()
    with measured() as load:
        checkpoint.load(ckpt, dmp, optimizer)
    phases["load"] = load


def _predict(cfg, env: DistEnv, ckpt: str, batch, phases: Dict[str, Phase]) -> None:
    _barrier()
    gc.collect()
    with measured() as p:
        dmp, optimizer, _ = _built(cfg, env, tables_loaded=True)
        checkpoint.load(ckpt, dmp, optimizer, ("model", "balancer"))
        dmp.eval()
        with torch.no_grad():
            dmp(batch)
    phases["predict"] = p


def _exports(cfg, env: DistEnv, ckpt: str, out: Path, phases: Dict[str, Phase]) -> None:
    from trainer.serving.export import Served, Tables, write_sharded, write_single
    stats = {"clip": [None] * len(cfg.data.dense), "kinds": [[] for _ in cfg.data.dense],
             "mean": [0.0] * len(cfg.data.dense), "std": [1.0] * len(cfg.data.dense),
             "fill": [0.0] * len(cfg.data.dense)}  # identity transforms: the tables are what is measured
    for layout, write in (("single", write_single), ("sharded", write_sharded)):
        _barrier()
        gc.collect()
        if env.is_main:
            folder = out / f"export-{layout}"
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            with measured() as p:
                model = MultiTaskDCN(build_ebc(cfg.data.table_specs(), cfg.model.embedding_dim, torch.device("meta")),
                                     len(cfg.data.dense), len(cfg.data.tasks), cfg.model, torch.device("cpu"))
                served = Served(model, [f.name for f in cfg.data.sparse], stats, [False] * len(cfg.data.tasks))
                write(served.eval(), Tables(ckpt, model), "int8", folder)
                del model, served
            phases[f"export {layout} int8"] = p
    _barrier()


def format_table(results: List[Dict]) -> str:
    """One table per size: each phase's wall / CPU seconds and peak RSS over the rank's share,
    the largest over the ranks (rank 0 alone for the exports)."""
    lines = []
    for res in results:
        ranks = res["ranks"]
        share = max(r["share"] for r in ranks)
        lines += [f"{res['tables']} tables x {res['rows']:,} rows x {res['dim']}, {len(ranks)} ranks: "
                  f"{share / 2**30:.2f} GiB of tables and optimizer state per rank", "",
                  "phase | wall s | CPU s | peak RSS GiB | peak / share | above the phase's start / share",
                  "---|---|---|---|---|---"]
        for name in PHASES:
            got = [r["phases"][name] for r in ranks if name in r["phases"]]
            if not got:
                continue
            worst = max(got, key=lambda p: p["peak"])
            lines.append(f"{name} | {max(p['wall_s'] for p in got):.2f} | {max(p['cpu_s'] for p in got):.2f} | "
                         f"{worst['peak'] / 2**30:.2f} | {worst['peak'] / share:.2f} | "
                         f"{max(p['peak'] - p['rss_before'] for p in got) / share:.2f}")
        load = statistics.median(r["phases"]["load"]["wall_s"] for r in ranks)
        raw = statistics.median(r["phases"]["raw DCP load"]["wall_s"] for r in ranks)
        lines += ["", f"load / raw DCP load (wall, median over ranks): {load / raw:.2f}", ""]
    return "\n".join(lines)


def write_result(result: Dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
